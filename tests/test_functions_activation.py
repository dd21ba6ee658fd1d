"""relu, softmax and log_softmax."""
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable


def away_from_zero(shape, seed):
    """Random values with |x| >= 0.1: the kink of relu stays out of eps's reach."""
    x = np.random.default_rng(seed).standard_normal(shape)
    return np.where(np.abs(x) < 0.1, 0.5, x)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5, 4)])
def test_relu_backward_matches_central_differences(shape):
    check_backward(F.relu, away_from_zero(shape, 0),
                   np.random.default_rng(1).standard_normal(shape))


def test_relu_retains_its_output_not_its_input():
    x = Variable(away_from_zero((4, 5), 2).astype(np.float32))
    y = F.relu(x)
    node = y.creator
    assert node.inputs[0].data is None
    np.testing.assert_array_equal(node.get_retained_outputs()[0], np.maximum(x.data, 0))
    assert y.dtype == np.float32
    y.grad = np.ones_like(y.data)
    y.backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, (x.data > 0).astype(np.float32))


@pytest.mark.parametrize("function", [F.softmax, F.log_softmax])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3)])
def test_softmax_backward_matches_central_differences(function, shape):
    rng = np.random.default_rng(3)
    check_backward(function, rng.standard_normal(shape), rng.standard_normal(shape))


def test_softmax_is_stable_for_large_logits():
    x = np.array([[1000.0, 1000.0, -1000.0]], np.float32)
    np.testing.assert_allclose(F.softmax(x).data, [[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(F.log_softmax(x).data, [[-np.log(2), -np.log(2), -2000 - np.log(2)]],
                               rtol=1e-6)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["relu", "softmax", "log_softmax"])
def test_activations_match_torch(torch, name):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 7)).astype(np.float32)
    gy = rng.standard_normal((6, 7)).astype(np.float32)
    ours = {"relu": F.relu, "softmax": F.softmax, "log_softmax": F.log_softmax}[name]
    theirs = {"relu": torch.relu, "softmax": lambda t: torch.softmax(t, 1),
              "log_softmax": lambda t: torch.log_softmax(t, 1)}[name]
    xv = Variable(x)
    y = ours(xv)
    y.grad = gy
    y.backward()
    x_t = torch.tensor(x, requires_grad=True)
    y_t = theirs(x_t)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xv.grad, x_t.grad.numpy(), rtol=1e-5, atol=1e-6)
