"""Fully connected layer: ``y = x W^T + b`` with ``W`` laid out (out, in), as Chainer."""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.array_checks import check_same_dtype, check_vector


class LinearFunction(FunctionNode):
    """Inputs ``(x, W)`` or ``(x, W, b)``.  An ``x`` of more than 2 dims is used as (N, -1).

    Retains ``x`` (in its original shape) and ``W``; K-FAC reads them from a hook.
    """

    def forward(self, inputs):
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        if W.ndim != 2:
            raise ValueError(f"linear: W must be (out, in), got shape {W.shape}")
        if x.ndim < 2:
            raise ValueError(f"linear: x must be (N, ...) with at least 2 dims, got {x.shape}")
        check_same_dtype("linear", x=x, W=W, b=b)
        check_vector("linear", "b", b, W.shape[0])
        x2 = x.reshape(len(x), -1)
        if x2.shape[1] != W.shape[1]:
            raise ValueError(f"linear: x has {x2.shape[1]} features per example but W "
                             f"expects {W.shape[1]} (W shape {W.shape})")
        self.retain_inputs((0, 1))
        xp = backend.get_array_module(x, W)
        y = xp.matmul(x2, W.T)
        if b is not None:
            y += b
        return (y,)

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        xp = backend.get_array_module(x, W)
        gy, = grad_outputs
        grads = []
        for i in indexes:
            if i == 0:
                grads.append(xp.matmul(gy, W).reshape(x.shape))
            elif i == 1:
                grads.append(xp.matmul(gy.T, x.reshape(len(x), -1)))
            else:
                grads.append(gy.sum(axis=0))
        return tuple(grads)


def linear(x, W, b=None):
    """``x W^T + b`` for ``x`` (N, in) (or (N, ...) flattened) and ``W`` (out, in)."""
    inputs = (x, W) if b is None else (x, W, b)
    return LinearFunction().apply(inputs)[0]
