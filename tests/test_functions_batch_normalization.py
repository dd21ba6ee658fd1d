"""batch_normalization (training) and fixed_batch_normalization (evaluation)."""
import importlib

import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.function_hook import FunctionHook
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable

SHAPES = [(5, 3), (3, 4, 3, 2), (2, 3, 5, 1)]


def params(rng, c, dtype=np.float64):
    gamma = (rng.random(c) + 0.5).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return gamma, beta


@pytest.mark.parametrize("shape", SHAPES)
def test_training_backward_matches_central_differences(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 2 + 1
    check_backward(lambda *v: F.batch_normalization(*v, eps=1e-3), (x, *params(rng, shape[1])),
                   rng.standard_normal(shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_fixed_backward_matches_central_differences(shape):
    rng = np.random.default_rng(1)
    c = shape[1]
    inputs = (rng.standard_normal(shape), *params(rng, c), rng.standard_normal(c),
              rng.random(c) + 0.5)
    check_backward(F.fixed_batch_normalization, inputs, rng.standard_normal(shape))


def test_training_forward_normalizes_and_keeps_x_hat_and_inv_std():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5, 5)) * 3 + 2
    gamma, beta = params(rng, 3)
    y = F.batch_normalization(Variable(x), gamma, beta, eps=1e-5)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    x_hat = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    np.testing.assert_allclose(y.data, x_hat * gamma[:, None, None] + beta[:, None, None],
                               rtol=1e-10, atol=1e-10)
    node = y.creator
    assert isinstance(node, F.BatchNormalization)
    np.testing.assert_allclose(node.x_hat, x_hat, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(node.inv_std, 1 / np.sqrt(var + 1e-5), rtol=1e-10)


def test_running_statistics_are_updated_in_place_with_unbiased_variance():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 2, 2))
    gamma, beta = params(rng, 3)
    running_mean, running_var = rng.standard_normal(3), rng.random(3) + 1
    expected_mean = 0.7 * running_mean + 0.3 * x.mean(axis=(0, 2, 3))
    expected_var = 0.7 * running_var + 0.3 * x.var(axis=(0, 2, 3), ddof=1)
    mean_id, var_id = id(running_mean), id(running_var)
    F.batch_normalization(x, gamma, beta, 2e-5, running_mean, running_var, decay=0.7)
    assert id(running_mean) == mean_id and id(running_var) == var_id
    np.testing.assert_allclose(running_mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(running_var, expected_var, rtol=1e-12)


def test_hook_can_form_per_example_gamma_and_beta_gradients():
    # K-FAC's BN Fisher: g_gamma[n] = sum_s gy[n] x_hat[n], g_beta[n] = sum_s gy[n];
    # summed over the batch they are the parameter gradients.
    rng = np.random.default_rng(4)
    x = Variable(rng.standard_normal((5, 3, 4, 4)).astype(np.float32))
    gamma, beta = (Variable(p) for p in params(rng, 3, np.float32))
    per_example = {}

    class PerExample(FunctionHook):
        def backward_preprocess(self, function, in_data, out_grad):
            if isinstance(function, F.BatchNormalization):
                gy = out_grad[0]
                per_example["gamma"] = (gy * function.x_hat).sum(axis=(2, 3))
                per_example["beta"] = gy.sum(axis=(2, 3))
                assert in_data[0] is None, "x itself is not retained"

    y = F.batch_normalization(x, gamma, beta)
    y.grad = rng.standard_normal(y.shape).astype(np.float32)
    with PerExample():
        y.backward()
    np.testing.assert_allclose(per_example["gamma"].sum(axis=0), gamma.grad, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(per_example["beta"].sum(axis=0), beta.grad, rtol=1e-4,
                               atol=1e-4)


def test_float32_stays_float32():
    rng = np.random.default_rng(5)
    x = Variable(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    gamma, beta = (Variable(p) for p in params(rng, 3, np.float32))
    running = [np.zeros(3, np.float32), np.ones(3, np.float32)]
    y = F.batch_normalization(x, gamma, beta, 2e-5, *running)
    assert y.dtype == np.float32 and y.creator.x_hat.dtype == np.float32
    assert y.creator.inv_std.dtype == np.float32
    y.grad = np.ones_like(y.data)
    y.backward()
    assert x.grad.dtype == gamma.grad.dtype == beta.grad.dtype == np.float32
    assert running[0].dtype == running[1].dtype == np.float32


def test_batch_normalization_rejects_bad_inputs():
    x = np.zeros((2, 3, 4, 4), np.float32)
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="gamma must have shape"):
        F.batch_normalization(x, np.ones(4, np.float32), beta)
    with pytest.raises(ValueError, match="running_var must have shape"):
        F.batch_normalization(x, gamma, beta, running_var=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="2 or 4 dims"):
        F.batch_normalization(x[0], gamma, beta)
    with pytest.raises(TypeError, match="dtype"):
        F.fixed_batch_normalization(x, gamma, beta, np.zeros(3), np.ones(3))


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(6, 5), (4, 5, 7, 3)])
def test_training_matches_torch(torch, shape):
    rng = np.random.default_rng(6)
    c = shape[1]
    arrays = [(rng.standard_normal(shape) * 2 + 1).astype(np.float32),
              *params(rng, c, np.float32)]
    running = [rng.standard_normal(c).astype(np.float32), (rng.random(c) + 1).astype(np.float32)]
    running_t = [torch.tensor(r) for r in running]
    ours = [Variable(a) for a in arrays]
    y = F.batch_normalization(*ours, 1e-3, *running, decay=0.9)
    gy = rng.standard_normal(shape).astype(np.float32)
    y.grad = gy
    y.backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y_t = torch.nn.functional.batch_norm(theirs[0], *running_t, theirs[1], theirs[2],
                                         training=True, momentum=0.1, eps=1e-3)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-4, atol=1e-4)
    for v, t in zip(ours, theirs):
        np.testing.assert_allclose(v.grad, t.grad.numpy(), rtol=1e-4, atol=1e-4)
    for r, r_t in zip(running, running_t):
        np.testing.assert_allclose(r, r_t.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_fixed_matches_torch_eval_mode(torch):
    rng = np.random.default_rng(7)
    shape = (3, 4, 5, 6)
    arrays = [rng.standard_normal(shape).astype(np.float32), *params(rng, 4, np.float32)]
    mean = rng.standard_normal(4).astype(np.float32)
    var = (rng.random(4) + 0.5).astype(np.float32)
    ours = [Variable(a) for a in arrays]
    y = F.fixed_batch_normalization(*ours, mean, var, eps=1e-3)
    gy = rng.standard_normal(shape).astype(np.float32)
    y.grad = gy
    y.backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y_t = torch.nn.functional.batch_norm(theirs[0], torch.tensor(mean), torch.tensor(var),
                                         theirs[1], theirs[2], training=False, eps=1e-3)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    for v, t in zip(ours, theirs):
        np.testing.assert_allclose(v.grad, t.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (6, 4)])
def test_blocks_of_examples_give_the_same_results(monkeypatch, shape):
    chunks = importlib.import_module("kfac_mn.functions.batch_chunks")
    rng = np.random.default_rng(8)
    arrays = (rng.standard_normal(shape) * 3 + 5, *params(rng, shape[1]))
    gy = rng.standard_normal(shape)
    results = []
    for budget in (chunks.CACHE_BLOCK_ELEMENTS, 1):  # one block, then one example per block
        monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", budget)
        running = [np.zeros(shape[1]), np.ones(shape[1])]
        variables = [Variable(a.copy()) for a in arrays]
        y = F.batch_normalization(*variables, 2e-5, *running)
        y.grad = gy
        y.backward()
        results.append([y.data] + [v.grad for v in variables] + running)
    for one_block, per_example in zip(*results):
        np.testing.assert_allclose(per_example, one_block, rtol=1e-10, atol=1e-12)


def test_float32_statistics_survive_a_large_mean():
    # A naive E[x^2] - E[x]^2 in float32 loses the variance of data centred far from 0.
    rng = np.random.default_rng(9)
    x = (1000 + rng.standard_normal((4, 2, 8, 8))).astype(np.float32)
    running_var = np.zeros(2, np.float32)
    F.batch_normalization(x, np.ones(2, np.float32), np.zeros(2, np.float32), 2e-5,
                          None, running_var, decay=0.0)
    expected = x.astype(np.float64).var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(running_var, expected, rtol=1e-3)
