"""softmax_cross_entropy (integer labels, soft targets, label smoothing) and accuracy."""
import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable


def soft_targets(rng, n, c):
    t = rng.random((n, c))
    return t / t.sum(axis=1, keepdims=True)


def reference_loss(x, q, smoothing):
    q = (1 - smoothing) * q + smoothing / x.shape[1]
    z = x - x.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -(q * log_p).sum() / len(x)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_values_match_the_definition(smoothing):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)) * 3
    t = rng.integers(0, 5, 6)
    one_hot = np.eye(5)[t]
    np.testing.assert_allclose(F.softmax_cross_entropy(x, t, smoothing).data,
                               reference_loss(x, one_hot, smoothing), rtol=1e-12)
    q = soft_targets(rng, 6, 5)
    np.testing.assert_allclose(F.softmax_cross_entropy(x, q, smoothing).data,
                               reference_loss(x, q, smoothing), rtol=1e-12)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_backward_matches_central_differences(smoothing, soft):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 7))
    t = soft_targets(rng, 4, 7) if soft else rng.integers(0, 7, 4)
    check_backward(lambda x, t: F.softmax_cross_entropy(x, t, smoothing), (x, t), None,
                   no_grads=[False, True])


def test_gradient_scales_with_the_output_gradient_and_keeps_float32():
    rng = np.random.default_rng(2)
    x = Variable(rng.standard_normal((3, 4)).astype(np.float32))
    loss = F.softmax_cross_entropy(x, np.array([0, 3, 1]))
    assert loss.shape == () and loss.dtype == np.float32
    loss.grad = np.array(2.0, np.float32)
    loss.backward()
    assert x.grad.dtype == np.float32
    p = np.exp(x.data) / np.exp(x.data).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(x.grad, 2 * (p - np.eye(4)[[0, 3, 1]]) / 3, rtol=1e-5)


def test_softmax_cross_entropy_rejects_bad_targets():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        F.softmax_cross_entropy(x, np.array([0, 3]))
    with pytest.raises(ValueError, match="3 labels for 2 examples"):
        F.softmax_cross_entropy(x, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="must be integers"):
        F.softmax_cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape of x"):
        F.softmax_cross_entropy(x, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="label_smoothing"):
        F.softmax_cross_entropy(x, np.array([0, 1]), label_smoothing=1.0)


def test_accuracy_top1_topk_and_soft_targets():
    y = np.array([[0.1, 0.5, 0.4], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.3, 0.45, 0.25]],
                 np.float32)
    t = np.array([1, 1, 0, 2])
    acc = F.accuracy(y, t)
    assert isinstance(acc, Variable) and acc.creator is None and acc.dtype == np.float32
    assert float(acc.data) == pytest.approx(0.25)
    assert float(F.accuracy(y, t, top_k=2).data) == pytest.approx(0.5)
    assert float(F.accuracy(y, t, top_k=3).data) == pytest.approx(1.0)
    soft = 0.7 * np.eye(3)[t] + 0.3 * np.eye(3)[[0, 0, 1, 1]]
    assert float(F.accuracy(Variable(y), soft).data) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="top_k"):
        F.accuracy(y, t, top_k=4)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("soft", [False, True])
def test_softmax_cross_entropy_matches_torch(torch, smoothing, soft):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 10)) * 2).astype(np.float32)
    t = soft_targets(rng, 8, 10).astype(np.float32) if soft else rng.integers(0, 10, 8)
    xv = Variable(x)
    loss = F.softmax_cross_entropy(xv, t, smoothing)
    loss.backward()
    x_t = torch.tensor(x, requires_grad=True)
    loss_t = torch.nn.functional.cross_entropy(x_t, torch.tensor(t), label_smoothing=smoothing)
    loss_t.backward()
    np.testing.assert_allclose(loss.data, loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(xv.grad, x_t.grad.numpy(), rtol=1e-5, atol=1e-7)
