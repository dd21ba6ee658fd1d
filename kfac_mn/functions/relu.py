"""Rectified linear unit ``max(x, 0)``; backward needs only the sign of the output."""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode


class ReLU(FunctionNode):
    """Retains its output, not its input (``y > 0`` iff ``x > 0``)."""

    def forward(self, inputs):
        x, = inputs
        xp = backend.get_array_module(x)
        self.retain_outputs((0,))
        return (xp.maximum(x, 0),)

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy, = grad_outputs
        return (gy * (y > 0),)  # a boolean factor: much faster than where(y > 0, gy, 0)


def relu(x):
    return ReLU().apply((x,))[0]
