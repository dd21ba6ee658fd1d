"""The per-worker memory estimate of kfac_mn.cost_model.memory, by hand on a small network and
in the large on ResNet-50."""
import math

import numpy as np
import pytest

from kfac_mn.cost_model.memory import memory_per_worker
from kfac_mn.cost_model.trace import trace_model
from models import archs


@pytest.fixture(scope="module")
def small():
    np.random.seed(0)
    return trace_model(archs["resnet_mnist"](), "resnet_mnist", 28, in_channels=1)


def test_each_component_by_hand(small):
    batch = 16
    sgd = memory_per_worker(small, batch, 1, "sgd")
    assert sgd["weights"] == 3 * 19994 * 4
    assert sgd["activations"] == batch * sum(call.elements for call in small.calls) * 4
    assert sgd["workspace"] == batch * max(max(c.patch_values, 2 * c.elements)
                                           for c in small.calls) * 4
    assert sgd["kfac_state"] == sgd["buffers"] == 0
    assert sgd["total"] == sum(value for key, value in sgd.items() if key != "total")
    kfac = memory_per_worker(small, batch, 1, "kfac")
    full = sum(math.prod(shape) for item in small.items if item.block is not None
               for shape in item.statistic_shapes().values())
    assert kfac["kfac_state"] == 3 * full * 4  # one worker owns everything: factors,
    #                                            inverses and the sums of a refresh step
    assert memory_per_worker(small, 2 * batch, 1, "kfac")["activations"] == \
        2 * kfac["activations"]


def test_more_workers_hold_less_kfac_state_and_half_buffers_halve():
    np.random.seed(0)
    profile = trace_model(archs["resnet50"](), "resnet50", 224)
    one, many = (memory_per_worker(profile, 32, workers) for workers in (1, 64))
    assert many["kfac_state"] < one["kfac_state"]
    assert many["weights"] == one["weights"] == 3 * 25_557_032 * 4
    half = memory_per_worker(profile, 32, 64, comm_dtype="float16")
    assert half["buffers"] * 2 == many["buffers"]
    # ResNet-50 at batch 32 needs a few GiB: the H200 run's CuPy pool held 4.1 GiB for SGD
    assert 2 * 2**30 < memory_per_worker(profile, 32, 1, "sgd")["total"] < 8 * 2**30
