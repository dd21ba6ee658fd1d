"""numerical_grad and check_backward: they must accept right gradients and reject wrong ones."""
import numpy as np
import pytest

from kfac_mn.function_node import FunctionNode
from kfac_mn.gradient_check import check_backward, numerical_grad


class Cube(FunctionNode):
    """y = x^3 with a selectable (possibly wrong) derivative factor."""

    def __init__(self, factor=3.0):
        self.factor = factor

    def forward(self, inputs):
        self.retain_inputs((0,))
        return (inputs[0] ** 3,)

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        return (grad_outputs[0] * self.factor * x * x,)


class TwoOutputs(FunctionNode):
    """(a * b, a + b): checks several outputs and several inputs together."""

    def forward(self, inputs):
        self.retain_inputs((0, 1))
        a, b = inputs
        return (a * b, a + b)

    def backward(self, indexes, grad_outputs):
        a, b = self.get_retained_inputs()
        g_prod, g_sum = (np.zeros_like(a) if g is None else g for g in grad_outputs)
        grads = {0: g_prod * b + g_sum, 1: g_prod * a + g_sum}
        return tuple(grads[i] for i in indexes)


def test_numerical_grad_of_a_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    gy = np.array([[1.0, 2.0], [-1.0, 0.5]])
    grad, = numerical_grad(lambda: (x ** 3,), (x,), (gy,), eps=1e-4)
    np.testing.assert_allclose(grad, 3 * x ** 2 * gy, rtol=1e-7)
    np.testing.assert_array_equal(x, [[1.0, -2.0], [0.5, 3.0]])  # restored after probing


def test_numerical_grad_ignores_outputs_without_gradient():
    a, b = np.array([2.0]), np.array([5.0])
    grads = numerical_grad(lambda: (a * b, a + b), (a, b), (None, np.array([1.0])))
    np.testing.assert_allclose(grads, [[1.0], [1.0]], rtol=1e-9)


def test_check_backward_accepts_a_correct_backward():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    check_backward(lambda v: Cube().apply((v,))[0], x, np.ones((3, 4), np.float32))


def test_check_backward_rejects_a_wrong_backward():
    x = np.random.default_rng(1).standard_normal((3, 4))
    with pytest.raises(AssertionError, match="backward of input 0"):
        check_backward(lambda v: Cube(factor=3.01).apply((v,))[0], x, np.ones((3, 4)))


def test_check_backward_with_several_inputs_and_outputs():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(5), rng.standard_normal(5)
    gys = (rng.standard_normal(5), rng.standard_normal(5))
    check_backward(lambda u, v: TwoOutputs().apply((u, v)), (a, b), gys)
    check_backward(lambda u, v: TwoOutputs().apply((u, v)), (a, b), (None, gys[1]))


def test_check_backward_honours_no_grads_and_scalar_outputs():
    from kfac_mn import functions as F

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3))
    w = rng.standard_normal((2, 3))
    # Only x is checked; w is a constant and gets no gradient.
    check_backward(lambda u, v: F.sum(u * v), (x, w), None, no_grads=[False, True])
    with pytest.raises(ValueError, match="no_grads has 1 entries for 2 inputs"):
        check_backward(lambda u, v: F.sum(u * v), (x, w), None, no_grads=[False])


def test_check_backward_rejects_mismatched_grad_outputs():
    x = np.ones((2, 2))
    with pytest.raises(ValueError, match="grad_output of shape"):
        check_backward(lambda v: Cube().apply((v,))[0], x, np.ones(3))
    with pytest.raises(ValueError, match="1 grad_outputs for 2 outputs"):
        check_backward(lambda u: TwoOutputs().apply((u, u)), x, (np.ones((2, 2)),))
