"""Graphs are released after backward: 50 training steps do not grow the process's memory."""
import gc

import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.optimizers import KFAC, MomentumSGD
from tests.kfac_models import ConvNet

psutil = pytest.importorskip("psutil")


def rss_mb():
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("optimizer", [MomentumSGD, KFAC])
def test_fifty_steps_do_not_grow_memory(optimizer):
    rng = np.random.default_rng(0)
    # small layers (K-FAC inverts a 1025 x 1025 factor for fc), yet one step's graph holds
    # ~6 MB (input, conv output, relu output): a graph leaked per step would add ~300 MB
    model = ConvNet(in_channels=2, out_channels=4, size=16, n_class=4)
    x = rng.standard_normal((512, 2, 16, 16)).astype(np.float32)
    t = rng.integers(0, 4, 512).astype(np.int32)
    opt = optimizer(lr=0.01)
    opt.setup(model)

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)

    for _ in range(5):
        opt.update(lossfun, x, t)
    gc.collect()
    before = rss_mb()
    gc.disable()  # the graph must be freed by reference counting alone
    try:
        for _ in range(50):
            opt.update(lossfun, x, t)
    finally:
        gc.enable()
    growth = rss_mb() - before
    assert growth < 30, f"RSS grew by {growth:.1f} MB over 50 steps"
