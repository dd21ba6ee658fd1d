"""linear: gradients, flattening of N-d inputs, and PyTorch parity."""
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable


@pytest.mark.parametrize("x_shape", [(5, 6), (3, 2, 3), (2, 1, 2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_central_differences(x_shape, bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape)
    W = rng.standard_normal((4, 6))
    inputs = (x, W, rng.standard_normal(4)) if bias else (x, W)
    check_backward(F.linear, inputs, rng.standard_normal((x_shape[0], 4)))


def test_linear_flattens_and_keeps_the_input_shape():
    rng = np.random.default_rng(1)
    x = Variable(rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    W = Variable(rng.standard_normal((5, 12)).astype(np.float32))
    y = F.linear(x, W)
    np.testing.assert_allclose(y.data, x.data.reshape(2, 12) @ W.data.T, rtol=1e-6)
    assert isinstance(y.creator, F.LinearFunction)
    y.grad = np.ones_like(y.data)
    y.backward()
    assert x.grad.shape == x.shape and x.grad.dtype == np.float32
    assert W.grad.dtype == np.float32


def test_linear_rejects_bad_inputs():
    x = np.zeros((2, 6), np.float32)
    with pytest.raises(ValueError, match="6 features per example but W expects 5"):
        F.linear(x, np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="b must have shape"):
        F.linear(x, np.zeros((4, 6), np.float32), np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="dtype"):
        F.linear(x, np.zeros((4, 6)))


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(torch, bias):
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((7, 30)).astype(np.float32),
              rng.standard_normal((11, 30)).astype(np.float32)]
    if bias:
        arrays.append(rng.standard_normal(11).astype(np.float32))
    ours = [Variable(a) for a in arrays]
    y = F.linear(*ours)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.grad = gy
    y.backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y_t = torch.nn.functional.linear(*theirs)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
    for v, t in zip(ours, theirs):
        np.testing.assert_allclose(v.grad, t.grad.numpy(), rtol=1e-5, atol=1e-5)
