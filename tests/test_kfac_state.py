"""Save, load and continue: K-FAC state makes the next updates bit-identical."""
import numpy as np
import pytest

from kfac_mn import Chain, serializers
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.optimizers import KFAC


class Net(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv = L.Convolution2D(1, 4, 3, 1, 1)
            self.bn = L.BatchNormalization(4)
            self.fc = L.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))))


class Classifier(Chain):
    """Keeps the logits of its last call as ``.y`` (what fisher_type='mc' samples from)."""

    def __init__(self, predictor):
        super().__init__()
        with self.init_scope():
            self.predictor = predictor

    def forward(self, x, t):
        self.y = self.predictor(x)
        return F.softmax_cross_entropy(self.y, t)


def make(fisher_type, seed=0):
    np.random.seed(seed)
    model = Classifier(Net())
    schedule = StatisticsSchedule("adaptive", warmup_steps=2, threshold=0.5, max_interval=4)
    opt = KFAC(lr=0.05, momentum=0.9, damping=1e-2, cov_ema_decay=0.5,
               fisher_type=fisher_type, schedule=schedule, seed=1)
    opt.setup(model)
    return model, opt


@pytest.mark.parametrize("fisher_type", ["emp", "mc"])
def test_resume_gives_bit_identical_updates(tmp_path, fisher_type):
    rng = np.random.default_rng(2)
    data = [(rng.standard_normal((6, 1, 6, 6)).astype(np.float32),
             rng.integers(0, 3, 6).astype(np.int32)) for _ in range(8)]
    model, opt = make(fisher_type)
    for x, t in data[:5]:
        opt.update(model, x, t)
    serializers.save_npz(tmp_path / "model.npz", model)
    serializers.save_npz(tmp_path / "opt.npz", opt)
    for x, t in data[5:]:
        opt.update(model, x, t)

    resumed, resumed_opt = make(fisher_type, seed=123)  # different initial weights
    serializers.load_npz(tmp_path / "model.npz", resumed)
    serializers.load_npz(tmp_path / "opt.npz", resumed_opt)
    assert resumed_opt.t == 5
    for x, t in data[5:]:
        resumed_opt.update(resumed, x, t)
    for (path, a), (_, b) in zip(model.namedparams(), resumed.namedparams()):
        assert np.array_equal(a.data, b.data), path
    assert resumed_opt.intervals() == opt.intervals()
