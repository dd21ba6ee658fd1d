"""Softmax and log-softmax along axis 1 (the class axis), computed stably."""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode


def log_softmax_array(x, axis=1):
    """``x - log(sum(exp(x)))`` along ``axis``, shifting by the max first."""
    xp = backend.get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    lse = xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    z -= lse
    return z


class Softmax(FunctionNode):
    """``y = exp(x) / sum(exp(x))``; ``gx = y * (gy - sum(gy * y))``."""

    def __init__(self, axis=1):
        self.axis = axis

    def forward(self, inputs):
        x, = inputs
        xp = backend.get_array_module(x)
        self.retain_outputs((0,))
        return (xp.exp(log_softmax_array(x, self.axis)),)

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy, = grad_outputs
        gx = y * gy
        gx -= y * gx.sum(axis=self.axis, keepdims=True)
        return (gx,)


class LogSoftmax(FunctionNode):
    """``y = x - log(sum(exp(x)))``; ``gx = gy - exp(y) * sum(gy)``."""

    def __init__(self, axis=1):
        self.axis = axis

    def forward(self, inputs):
        x, = inputs
        self.retain_outputs((0,))
        return (log_softmax_array(x, self.axis),)

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy, = grad_outputs
        xp = backend.get_array_module(y)
        return (gy - xp.exp(y) * gy.sum(axis=self.axis, keepdims=True),)


def softmax(x, axis=1):
    return Softmax(axis).apply((x,))[0]


def log_softmax(x, axis=1):
    return LogSoftmax(axis).apply((x,))[0]
