"""K-FAC statistics against first principles (float64 brute force)."""
import itertools
import math

import numpy as np
import pytest

from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.optimizers import KFAC
from tests.kfac_models import (
    ConvNet,
    explicit_patches,
    per_example_output_grads,
    per_example_param_grads,
    to_float64,
)


def one_step(model, x, t, **kwargs):
    opt = KFAC(lr=0.0, momentum=0.0, inv_dtype=np.float64, **kwargs)
    opt.setup(model)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    return opt


@pytest.mark.parametrize("ksize,stride,pad,bias",
                         list(itertools.product([1, 3], [1, 2], [0, 1], [True, False])))
def test_conv_and_linear_factors_equal_explicit_per_example_sums(ksize, stride, pad, bias):
    rng = np.random.default_rng(ksize * 100 + stride * 10 + pad + bias)
    model = to_float64(ConvNet(ksize=ksize, stride=stride, pad=pad, bias=bias))
    x = rng.standard_normal((4, 2, 7, 7))
    t = rng.integers(0, 5, 4).astype(np.int32)
    g = per_example_output_grads(model, x, t, ["h_conv", "h_fc"])
    opt = one_step(model, x, t)
    n = len(x)

    patches = explicit_patches(x, ksize, stride, pad, bias)           # (N, S, K)
    positions = patches.shape[1]
    A_conv = np.einsum("nsi,nsj->ij", patches, patches) / n
    g_conv = g["h_conv"].reshape(n, g["h_conv"].shape[1], -1)         # (N, Cout, S)
    G_conv = np.einsum("nis,njs->ij", g_conv, g_conv) / (n * positions)
    conv = opt.fisher_blocks["/conv"]
    np.testing.assert_allclose(conv.A, A_conv, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(conv.G, G_conv, rtol=1e-10, atol=1e-14)

    a_fc = model.a_fc.data.reshape(n, -1)
    a_fc = np.concatenate([a_fc, np.ones((n, 1))], axis=1)
    fc = opt.fisher_blocks["/fc"]
    np.testing.assert_allclose(fc.A, a_fc.T @ a_fc / n, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fc.G, g["h_fc"].T @ g["h_fc"] / n, rtol=1e-10, atol=1e-14)


class OneLinear(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_one_example_kronecker_product_is_the_exact_fisher_block_and_solve_matches():
    rng = np.random.default_rng(1)
    model = to_float64(OneLinear())
    x = rng.standard_normal((1, 4))
    t = np.array([2], dtype=np.int32)
    model.cleargrads()
    F.softmax_cross_entropy(model(x), t).backward()
    grad = np.concatenate([model.fc.W.grad, model.fc.b.grad[:, None]], axis=1)  # out x (in+1)
    W0, b0 = model.fc.W.data.copy(), model.fc.b.data.copy()

    damping = 0.03
    opt = KFAC(lr=1.0, momentum=0.0, damping=damping, inv_dtype=np.float64)
    opt.setup(model)
    opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    block = opt.fisher_blocks["/fc"]
    A, G = block.A, block.G
    # row-major vec of [dW | db] = kron(g, [a; 1]); its outer product is kron(G, A)
    flat = grad.ravel()
    np.testing.assert_allclose(np.kron(G, A), np.outer(flat, flat), rtol=1e-12, atol=1e-15)

    pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    A_d = A + pi * math.sqrt(damping) * np.eye(A.shape[0])
    G_d = G + math.sqrt(damping) / pi * np.eye(G.shape[0])
    dense = np.linalg.solve(np.kron(G_d, A_d), flat).reshape(grad.shape)
    step = np.concatenate([W0 - model.fc.W.data, (b0 - model.fc.b.data)[:, None]], axis=1)
    np.testing.assert_allclose(step, dense, rtol=1e-8, atol=1e-12)


class BNNet(Chain):
    def __init__(self, channels=3, size=4, n_class=4):
        super().__init__()
        with self.init_scope():
            self.bn = L.BatchNormalization(channels, dtype=np.float64)
            self.fc = L.Linear(channels * size * size, n_class)

    def forward(self, x):
        return self.fc(self.bn(x))


@pytest.mark.parametrize("kind", ["diag", "unit", "full"])
@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (5, 3)])
def test_batchnorm_fisher_equals_per_example_gradient_statistics(kind, shape):
    rng = np.random.default_rng(7)
    size = shape[2] if len(shape) == 4 else 1
    model = to_float64(BNNet(channels=shape[1], size=size))
    x = rng.standard_normal(shape) * 2.0 + 0.5
    t = rng.integers(0, 4, shape[0]).astype(np.int32)
    g = per_example_param_grads(model, x, t, {"gamma": model.bn.gamma, "beta": model.bn.beta})
    opt = one_step(model, x, t, bn_fisher=kind)
    F_ours = opt.fisher_blocks["/bn"].F
    both = np.concatenate([g["gamma"], g["beta"]], axis=1)  # (N, 2C)
    n, c = both.shape[0], shape[1]
    if kind == "diag":
        expected = (both ** 2).mean(axis=0)
    elif kind == "unit":
        pairs = np.stack([g["gamma"], g["beta"]], axis=2)    # (N, C, 2)
        expected = np.einsum("nci,ncj->cij", pairs, pairs) / n
    else:
        expected = both.T @ both / n
    assert F_ours.shape == expected.shape
    np.testing.assert_allclose(F_ours, expected, rtol=1e-10, atol=1e-14)
    assert c == shape[1]


def test_damping_and_pi_follow_the_formula():
    rng = np.random.default_rng(3)
    model = to_float64(ConvNet())
    x = rng.standard_normal((4, 2, 7, 7))
    t = rng.integers(0, 5, 4).astype(np.int32)
    damping = 0.02
    opt = one_step(model, x, t, damping=damping)
    for path in ("/conv", "/fc"):
        block = opt.fisher_blocks[path]
        A, G = block.A, block.G
        pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
        root = math.sqrt(damping)
        np.testing.assert_allclose(block.inverses["A"],
                                   np.linalg.inv(A + pi * root * np.eye(len(A))), rtol=1e-8)
        np.testing.assert_allclose(block.inverses["G"],
                                   np.linalg.inv(G + root / pi * np.eye(len(G))), rtol=1e-8)


def test_running_average_after_k_steps_is_the_hand_average_without_damping():
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((4, 2, 7, 7)), rng.integers(0, 5, 4).astype(np.int32))
               for _ in range(3)]
    model = to_float64(ConvNet())
    fresh = []
    for x, t in batches:  # each step's own statistics (r = 1), same weights (lr = 0)
        opt = one_step(model, x, t, damping=0.5)
        fresh.append({p: (b.A.copy(), b.G.copy()) for p, b in opt.fisher_blocks.items()})
    r = 0.3
    opt = KFAC(lr=0.0, momentum=0.0, damping=0.5, cov_ema_decay=r, inv_dtype=np.float64)
    opt.setup(model)
    for x, t in batches:
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    for path, block in opt.fisher_blocks.items():
        for i, name in enumerate("AG"):
            expected = fresh[0][path][i]
            for step in fresh[1:]:
                expected = (1 - r) * expected + r * step[path][i]
            np.testing.assert_allclose(block.factors[name], expected, rtol=1e-12)


class ZeroInputNet(Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.fc1 = L.Linear(3, 4, nobias=True)
            self.fc2 = L.Linear(3, 4)

    def forward(self, x):
        return self.fc1(x * 0.0) + self.fc2(x)


def test_singular_factor_triggers_the_fallback_and_no_nan_reaches_the_weights():
    rng = np.random.default_rng(5)
    model = ZeroInputNet()
    x = rng.standard_normal((2, 3)).astype(np.float32)
    t = np.array([0, 1], dtype=np.int32)
    opt = KFAC(lr=0.1, damping=0.0)
    opt.setup(model)
    for _ in range(3):
        opt.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    assert opt.fallbacks["float64"] > 0
    assert opt.fallbacks["more_damping"] > 0
    for param in model.params():
        assert np.isfinite(param.data).all()


def test_stats_batchsize_uses_the_first_examples_with_full_batch_scaling():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 2, 7, 7))
    t = rng.integers(0, 5, 6).astype(np.int32)
    model = to_float64(ConvNet())
    g = per_example_output_grads(model, x, t, ["h_conv", "h_fc"])
    opt = one_step(model, x, t, stats_batchsize=4)
    a_fc = np.concatenate([model.a_fc.data.reshape(6, -1), np.ones((6, 1))], axis=1)[:4]
    fc = opt.fisher_blocks["/fc"]
    np.testing.assert_allclose(fc.A, a_fc.T @ a_fc / 4, rtol=1e-10)
    np.testing.assert_allclose(fc.G, g["h_fc"][:4].T @ g["h_fc"][:4] / 4, rtol=1e-10)
    patches = explicit_patches(x[:4], 3, 1, 1, True)
    conv = opt.fisher_blocks["/conv"]
    np.testing.assert_allclose(conv.A, np.einsum("nsi,nsj->ij", patches, patches) / 4,
                               rtol=1e-10)
    with pytest.raises(ValueError, match="stats_batchsize"):
        KFAC(stats_batchsize=0)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_damped_inverse_equals_the_dense_inverse_and_leaves_the_factor_alone(dtype, rtol):
    from kfac_mn.fisher.inverse import FallbackCounter, damped_inverse

    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 30))
    factor = (x.T @ x / 40).astype(dtype)
    before = factor.copy()
    counter = FallbackCounter()
    inverse = damped_inverse(factor, 1e-2, dtype, "/test", counter)
    expected = np.linalg.inv(factor.astype(np.float64) + 1e-2 * np.eye(30))
    assert inverse.dtype == dtype and inverse.flags.c_contiguous
    np.testing.assert_allclose(inverse, expected, rtol=rtol, atol=rtol * np.abs(expected).max())
    np.testing.assert_array_equal(inverse, inverse.T)  # exactly symmetric
    np.testing.assert_array_equal(factor, before)
    assert not counter


def test_damped_inverse_of_a_singular_factor_falls_back_to_more_damping():
    from kfac_mn.fisher.inverse import FallbackCounter, InversionError, damped_inverse

    singular = np.diag([1.0, 0.0, 2.0]).astype(np.float32)  # PSD, rank 2, no damping
    counter = FallbackCounter()
    inverse = damped_inverse(singular, 0.0, np.float32, "/singular", counter)
    assert counter["float64"] == 1 and counter["more_damping"] == 1
    assert inverse.dtype == np.float32 and np.isfinite(inverse).all()
    np.testing.assert_allclose(np.diag(inverse)[[0, 2]], [1.0, 0.5], rtol=1e-4)
    with pytest.raises(InversionError, match="/indefinite"):  # not PSD: no damping helps
        damped_inverse(np.diag([1.0, -1.0]), 0.0, np.float32, "/indefinite", FallbackCounter())
