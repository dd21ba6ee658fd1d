"""Batched inversion (kfac_mn.fisher.batched_inverse) against one factor at a time: the
batching plan, the same inverses and fallbacks, and the same K-FAC steps."""
import numpy as np
import pytest

from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.fisher import batched_inverse
from kfac_mn.fisher.batched_inverse import (
    InverseRequest,
    batched_damped_inverses,
    batching_plan,
)
from kfac_mn.fisher.inverse import FallbackCounter, InversionError, damped_inverse
from kfac_mn.optimizers import KFAC
from tests.kfac_models import to_float64


def spd(rng, side, dtype=np.float64):
    """A symmetric positive definite matrix."""
    rows = rng.standard_normal((side, side + 3))
    return (rows @ rows.T / rows.shape[1]).astype(dtype)


def requests_of(rng, sides, dtype=np.float64):
    return [InverseRequest(f"M{i}", spd(rng, side, dtype), 10.0 ** -(i % 3), f"/layer{i}/M")
            for i, side in enumerate(sides)]


def test_the_plan_groups_equal_sides_and_dtypes_in_order_of_appearance():
    rng = np.random.default_rng(0)
    requests = requests_of(rng, [4, 2, 4, 1, 2, 4])
    requests.append(InverseRequest("half", spd(rng, 4, np.float32), 0.1, "/f32"))
    assert batching_plan(requests) == [[0, 2, 5], [1, 4], [3], [6]]


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_the_same_inverses_as_one_at_a_time_and_the_factors_untouched(dtype, rtol):
    rng = np.random.default_rng(1)
    requests = requests_of(rng, [5, 3, 5, 1, 3, 5, 8])
    before = [r.matrix.copy() for r in requests]
    counter = FallbackCounter()
    batched = batched_damped_inverses(requests, dtype, counter)
    for request, inverse, original in zip(requests, batched, before):
        single = damped_inverse(request.matrix, request.damping, dtype, request.label)
        assert inverse.dtype == dtype and inverse.shape == request.matrix.shape
        np.testing.assert_allclose(inverse, single, rtol=rtol, atol=rtol * abs(single).max())
        exact = np.linalg.inv(original + request.damping * np.eye(len(original)))
        np.testing.assert_allclose(inverse, exact, rtol=10 * rtol,
                                   atol=10 * rtol * abs(exact).max())
        np.testing.assert_array_equal(request.matrix, original)
    assert not counter and batched_damped_inverses([], dtype) == []


def test_only_a_failing_group_falls_back_factor_by_factor(monkeypatch):
    rng = np.random.default_rng(2)
    requests = requests_of(rng, [4, 4, 3, 3])
    # a factor whose rounding left an eigenvalue just below zero: undamped, no Cholesky
    singular = np.diag([1.0, -1e-7, 2.0, 3.0])
    requests[1] = InverseRequest("S", singular, 0.0, "/singular/A")
    one_at_a_time = []

    def recorded(matrix, damping, dtype, name="", counter=None):
        one_at_a_time.append(name)
        return damped_inverse(matrix, damping, dtype, name, counter)

    monkeypatch.setattr(batched_inverse, "damped_inverse", recorded)
    counter = FallbackCounter()
    inverses = batched_damped_inverses(requests, np.float32, counter)
    assert one_at_a_time == ["/layer0/M", "/singular/A"]  # the side-4 group only
    assert counter["more_damping"] >= 1  # the singular factor's fallback, counted
    assert np.isfinite(inverses[1]).all()
    for request, inverse in zip(requests[2:], inverses[2:]):  # the side-3 group kept its batch
        np.testing.assert_allclose(
            inverse, damped_inverse(request.matrix, request.damping, np.float32), rtol=2e-4,
            atol=2e-4 * abs(inverse).max())


def test_a_factor_with_nan_stops_with_its_layer_named():
    rng = np.random.default_rng(3)
    requests = requests_of(rng, [3, 3])
    broken = requests[1].matrix.copy()
    broken[0, 0] = np.nan
    requests[1] = requests[1]._replace(matrix=broken)
    with pytest.raises(InversionError, match="/layer1/M"):
        batched_damped_inverses(requests, np.float32, FallbackCounter())


class ConvBNNet(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(2, 4, 3, pad=1)
            self.bn1 = L.BatchNormalization(4)
            self.conv2 = L.Convolution2D(4, 4, 3, pad=1)  # A and G of conv1's sides again
            self.fc = L.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.conv2(h)))


@pytest.mark.parametrize("bn_fisher", ["diag", "full"])
def test_kfac_steps_are_the_same_with_batched_inversion(bn_fisher):
    rng = np.random.default_rng(4)
    np.random.seed(4)
    model = to_float64(ConvBNNet())
    np.random.seed(4)
    twin = to_float64(ConvBNNet())
    options = dict(lr=0.1, momentum=0.9, damping=1e-2, inv_dtype=np.float64,
                   bn_fisher=bn_fisher)
    one_by_one = KFAC(**options).setup(model)
    batched = KFAC(batched_inversion=True, **options).setup(twin)
    for _ in range(3):
        x = rng.standard_normal((6, 2, 5, 5))
        t = rng.integers(0, 3, 6).astype(np.int32)
        for net, optimizer in ((model, one_by_one), (twin, batched)):
            optimizer.update(lambda x, t, net=net: F.softmax_cross_entropy(net(x), t), x, t)
    for (name, param), (_, other) in zip(sorted(model.namedparams()),
                                         sorted(twin.namedparams())):
        np.testing.assert_allclose(other.data, param.data, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    inverses = batched.fisher_blocks["/bn1"].inverses["F"]
    assert inverses.shape == ((8, 8) if bn_fisher == "full" else (8,))
