"""One K-FAC step on both backends: the damped natural-gradient step from first principles.

The expected step is computed on the host in float64 from the definitions of docs/SPEC.md
(explicit im2col patches, per-example output gradients, pi-corrected damping, explicit
inverses), then one ``KFAC.update`` runs on the backend under test.  The stale-statistics
step reuses the inverses of the last refresh.  The ``gpu`` test at the end checks that a
small ResNet with every kind of layer takes the same steps on the GPU as on the CPU.
"""
import numpy as np
import pytest

from kfac_mn import Chain, backend
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.optimizers import KFAC
from tests.kfac_models import ConvNet, explicit_patches, to_float64

LR, DAMPING = 0.1, 1e-2


def host(array):
    return backend.to_cpu(array)


def natural_gradient(A, G, grad):
    """inv(G + sqrt(gamma)/pi I) grad inv(A + pi sqrt(gamma) I), pi from the traces."""
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    root = np.sqrt(DAMPING)
    return (np.linalg.inv(G + root / pi * np.eye(len(G))) @ grad
            @ np.linalg.inv(A + pi * root * np.eye(len(A))))


def expected_step(model, x, t, ksize, stride, pad):
    """{param path: value after one K-FAC step with momentum 0}, computed on the host."""
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward(retain_grad=True)
    n = len(x)
    patches = explicit_patches(x, ksize, stride, pad, bias=True)          # (N, S, K + 1)
    g_conv = model.h_conv.grad.reshape(n, model.h_conv.shape[1], -1) * n  # (N, C_out, S)
    a_fc = np.concatenate([model.a_fc.data.reshape(n, -1), np.ones((n, 1))], axis=1)
    g_fc = model.h_fc.grad * n
    factors = {
        "conv": (np.einsum("nsi,nsj->ij", patches, patches) / n,
                 np.einsum("nis,njs->ij", g_conv, g_conv) / (n * patches.shape[1])),
        "fc": (a_fc.T @ a_fc / n, g_fc.T @ g_fc / n)}
    expected = {}
    for name, (A, G) in factors.items():
        link = getattr(model, name)
        grad = np.concatenate([link.W.grad.reshape(len(G), -1), link.b.grad[:, None]], axis=1)
        step = natural_gradient(A, G, grad)
        expected[f"/{name}/W"] = link.W.data - LR * step[:, :-1].reshape(link.W.shape)
        expected[f"/{name}/b"] = link.b.data - LR * step[:, -1]
    model.cleargrads()
    return expected


def model_and_batch(xp, ksize, stride, pad):
    rng = np.random.default_rng(ksize * 10 + stride + pad)
    np.random.seed(0)
    model = to_float64(ConvNet(ksize=ksize, stride=stride, pad=pad))
    x = rng.standard_normal((6, 2, 7, 7))
    t = rng.integers(0, 5, 6).astype(np.int32)
    expected = expected_step(model, x, t, ksize, stride, pad)
    if xp is not np:
        model.to_gpu()
    return model, xp.asarray(x), xp.asarray(t), expected


def kfac_update(optimizer, model, x, t):
    optimizer.update(lambda a, b: F.softmax_cross_entropy(model(a), b), x, t)


@pytest.mark.parametrize("ksize,stride,pad", [(3, 1, 1), (3, 2, 0), (1, 1, 0)])
def test_one_kfac_step_is_the_damped_natural_gradient_step(xp, ksize, stride, pad):
    model, x, t, expected = model_and_batch(xp, ksize, stride, pad)
    optimizer = KFAC(lr=LR, momentum=0.0, damping=DAMPING, inv_dtype=np.float64)
    optimizer.setup(model)
    kfac_update(optimizer, model, x, t)
    for path, param in model.namedparams():
        assert isinstance(param.data, xp.ndarray)
        np.testing.assert_allclose(host(param.data), expected[path], rtol=1e-9, atol=1e-12,
                                   err_msg=path)


def test_a_stale_step_reuses_the_factors_and_inverses_of_the_last_refresh(xp):
    model, x, t, _ = model_and_batch(xp, 3, 1, 1)
    schedule = StatisticsSchedule("fixed", factor_interval=2, inverse_interval=2)
    optimizer = KFAC(lr=LR, momentum=0.0, damping=DAMPING, inv_dtype=np.float64,
                     schedule=schedule)
    optimizer.setup(model)
    kfac_update(optimizer, model, x, t)  # step 0 refreshes
    kept = {(path, kind, name): host(store[name]) for path, block in
            optimizer.fisher_blocks.items() for kind, store in
            (("factor", block.factors), ("inverse", block.inverses)) for name in store}
    fc = model.fc
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward()
    grad = np.concatenate([host(fc.W.grad), host(fc.b.grad)[:, None]], axis=1)
    before = np.concatenate([host(fc.W.data), host(fc.b.data)[:, None]], axis=1)
    kfac_update(optimizer, model, x, t)  # step 1 is stale: no statistics, old inverses
    for (path, kind, name), value in kept.items():
        store = getattr(optimizer.fisher_blocks[path], kind + "s")
        np.testing.assert_array_equal(host(store[name]), value)
    step = kept["/fc", "inverse", "G"] @ grad @ kept["/fc", "inverse", "A"]
    after = np.concatenate([host(fc.W.data), host(fc.b.data)[:, None]], axis=1)
    np.testing.assert_allclose(after, before - LR * step, rtol=1e-9, atol=1e-12)


class TinyResNet(Chain):
    """Every kind of K-FAC layer (conv, BN, linear) and a residual connection, at toy size."""

    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.conv1 = L.Convolution2D(3, 8, 3, 1, 1, nobias=True)
            self.bn1 = L.BatchNormalization(8)
            self.conv2 = L.Convolution2D(8, 8, 3, 1, 1, nobias=True)
            self.bn2 = L.BatchNormalization(8)
            self.fc = L.Linear(8, 5)

    def forward(self, x):
        # average, not max, pooling: max pooling's routing of near ties may differ between
        # the backends' slightly different activations (max pooling: test_gpu_functions.py)
        h = F.average_pooling_2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.global_average_pooling_2d(F.average_pooling_2d(h, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("bn_fisher,factor_dtype", [("diag", None), ("unit", "float16"),
                                                    ("full", None)])
def test_gpu_kfac_steps_match_the_cpu_on_a_small_resnet(bn_fisher, factor_dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    t = rng.integers(0, 5, 8).astype(np.int32)
    updates = []
    for module in (np, backend.cupy):
        np.random.seed(6)
        model = TinyResNet()
        if module is not np:
            model.to_gpu()
        optimizer = KFAC(lr=LR, damping=DAMPING, bn_fisher=bn_fisher, factor_dtype=factor_dtype)
        optimizer.setup(model)
        start = {path: host(p.data).copy() for path, p in model.namedparams()}
        for _ in range(2):
            kfac_update(optimizer, model, module.asarray(x), module.asarray(t))
        updates.append({path: host(p.data) - start[path] for path, p in model.namedparams()})
    cpu, gpu = updates
    for path in cpu:
        scale = np.abs(cpu[path]).max()
        np.testing.assert_allclose(gpu[path], cpu[path], rtol=2e-3, atol=2e-3 * scale,
                                   err_msg=path)
