"""Stale statistics: interval growth and shrinkage, inverse reuse; the paper's lr schedules."""
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.fisher.blocks import relative_change
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.lr_schedules import PolynomialDecay, ScaledWith, ScheduleSet, StepDecay
from kfac_mn.optimizers import KFAC, MomentumSGD
from tests.kfac_models import ConvNet


def drive(schedule, factors, steps):
    """Feed a synthetic factor sequence; returns the steps at which the layer refreshed."""
    refreshed, last = [], None
    for step in range(steps):
        if schedule.factors_due("/layer", step):
            new = factors(step)
            schedule.report_change("/layer", step, relative_change(new, last))
            last = new
            refreshed.append(step)
    return refreshed


def test_interval_grows_while_factors_stay_put_then_caps():
    schedule = StatisticsSchedule("adaptive", warmup_steps=3, threshold=0.05, max_interval=8)
    refreshed = drive(schedule, lambda s: np.eye(3) * (1 + 1e-4 * s), 60)
    assert refreshed[:4] == [0, 1, 2, 3]            # warm-up: every step, then the first check
    gaps = np.diff(refreshed[3:]).tolist()
    assert gaps[:4] == [2, 4, 8, 8]                 # doubling, capped at max_interval
    assert schedule.interval("/layer") == 8


def test_interval_shrinks_when_factors_move():
    schedule = StatisticsSchedule("adaptive", warmup_steps=0, threshold=0.05, max_interval=16)
    calm = drive(schedule, lambda s: np.eye(2), 30)
    assert schedule.interval("/layer") == 16 and calm[-1] < 30
    # now the statistics jump at every refresh: the interval halves each time down to 1
    intervals = []
    for step in range(31, 80):
        if schedule.factors_due("/layer", step):
            schedule.report_change("/layer", step, 1.0)
            intervals.append(schedule.interval("/layer"))
    assert intervals[:5] == [8, 4, 2, 1, 1]


def test_fixed_schedule_and_bad_settings():
    schedule = StatisticsSchedule("fixed", factor_interval=2, inverse_interval=4)
    assert [s for s in range(9) if schedule.factors_due("/x", s)] == [0, 2, 4, 6, 8]
    assert [s for s in range(9) if schedule.inverse_due("/x", s)] == [0, 4, 8]
    with pytest.raises(ValueError, match="multiple of factor_interval"):
        StatisticsSchedule("fixed", factor_interval=2, inverse_interval=3)
    with pytest.raises(ValueError, match="mode"):
        StatisticsSchedule("sometimes")


def test_inverses_are_reused_between_refreshes():
    rng = np.random.default_rng(0)
    model = ConvNet()
    x = rng.standard_normal((8, 2, 7, 7)).astype(np.float32)
    t = rng.integers(0, 5, 8).astype(np.int32)
    schedule = StatisticsSchedule("adaptive", warmup_steps=2, threshold=10.0, max_interval=4)
    opt = KFAC(lr=1e-3, schedule=schedule)
    opt.setup(model)
    seen = []
    for _ in range(10):
        step = opt.t
        before = opt.fisher_blocks["/conv"].inverses.get("A")
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
        after = opt.fisher_blocks["/conv"].inverses["A"]
        seen.append((step, after is before))
    reused = [step for step, same in seen if same]
    refreshed = [step for step, same in seen if not same]
    assert refreshed == [0, 1, 2, 4, 8]   # warm-up, then intervals 2 and 4 (threshold huge)
    assert reused == [3, 5, 6, 7, 9]
    assert opt.intervals()["/conv"] == 4


def test_polynomial_decay_warmup_and_momentum_scaling():
    lr = PolynomialDecay(8.18e-3, power=11, start_epoch=1, end_epoch=53)
    assert lr(0.5) == pytest.approx(8.18e-3)
    assert lr(27) == pytest.approx(8.18e-3 * (1 - 26 / 52) ** 11)
    assert lr(60) == 0.0
    momentum = ScaledWith(0.997, lr)
    assert momentum(0.2) == pytest.approx(0.997)
    assert momentum(27) == pytest.approx(0.997 * (1 - 26 / 52) ** 11)
    warm = PolynomialDecay(1.0, 2, start_epoch=5, end_epoch=10, warmup_epochs=5)
    assert warm(0) == 0.0 and warm(2.5) == pytest.approx(0.5) and warm(5) == 1.0
    with pytest.raises(ValueError, match="end_epoch"):
        PolynomialDecay(1.0, 2, start_epoch=5, end_epoch=5)
    goyal = StepDecay(0.1 * 4096 / 256, [30, 60, 80], warmup_epochs=5)
    assert goyal(40) == pytest.approx(1.6 * 0.1) and goyal(85) == pytest.approx(1.6e-3)


def test_schedule_set_drives_sgd_and_kfac_hyperparameters():
    for opt in (MomentumSGD(lr=1.0), KFAC(lr=1.0)):
        lr = PolynomialDecay(0.5, 1, start_epoch=0, end_epoch=10)
        schedules = {"lr": lr, "momentum": ScaledWith(0.9, lr)}
        if isinstance(opt, KFAC):
            schedules["damping"] = PolynomialDecay(1e-3, 1, start_epoch=0, end_epoch=10)
        ScheduleSet(**schedules).apply(opt, 5.0)
        assert opt.lr == pytest.approx(0.25) and opt.momentum == pytest.approx(0.45)
    with pytest.raises(AttributeError, match="damping"):
        ScheduleSet(damping=lr).apply(MomentumSGD(), 1.0)
