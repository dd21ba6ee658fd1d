"""2-D average pooling (NCHW, padding counted in the divisor) and global average pooling."""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.array_checks import check_ndim
from kfac_mn.functions.patches import (
    add_offset_to_image,
    offset_slices,
    output_hw,
    pooling_params,
)


class AveragePooling2D(FunctionNode):
    """Mean over each window, zero padding included (PyTorch's ``count_include_pad=True``).

    One strided add per kernel offset in each direction; the padding is never built.
    """

    def __init__(self, ksize, stride=None, pad=0):
        self.ksize, self.stride, self.pad = pooling_params(
            "average_pooling_2d", ksize, stride, pad)
        self._in_shape = None

    def forward(self, inputs):
        x, = inputs
        check_ndim("x", x, (4,), "average_pooling_2d")
        xp = backend.get_array_module(x)
        n, c, h, w = x.shape
        out_hw = output_hw((h, w), self.ksize, self.stride, self.pad)
        y = xp.zeros((n, c) + out_hw, dtype=x.dtype)
        kh, kw = self.ksize
        for i in range(kh):
            for j in range(kw):
                where = offset_slices((i, j), self.stride, self.pad, out_hw, (h, w))
                if where is not None:
                    y[where[0]] += x[where[1]]
        y *= 1.0 / (kh * kw)
        self._in_shape = x.shape
        return (y,)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        xp = backend.get_array_module(gy)
        kh, kw = self.ksize
        share = gy * (1.0 / (kh * kw))
        gx = xp.zeros(self._in_shape, dtype=gy.dtype)
        for i in range(kh):
            for j in range(kw):
                add_offset_to_image(gx, share, (i, j), self.stride, self.pad)
        return (gx,)


class GlobalAveragePooling2D(FunctionNode):
    """(N, C, H, W) -> (N, C): the mean over all positions of each channel."""

    def forward(self, inputs):
        x, = inputs
        check_ndim("x", x, (4,), "global_average_pooling_2d")
        xp = backend.get_array_module(x)
        self._in_shape = x.shape
        n, c, h, w = x.shape
        # einsum sums short rows much faster than .sum(axis=-1).
        return (xp.einsum("ncs->nc", x.reshape(n, c, h * w)) * (1.0 / (h * w)),)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        xp = backend.get_array_module(gy)
        n, c, h, w = self._in_shape
        gx = xp.empty(self._in_shape, dtype=gy.dtype)
        gx[...] = (gy * (1.0 / (h * w)))[:, :, None, None]
        return (gx,)


def average_pooling_2d(x, ksize, stride=None, pad=0):
    """Mean over ``ksize`` windows every ``stride`` (default ``ksize``), zero padding counted."""
    return AveragePooling2D(ksize, stride, pad).apply((x,))[0]


def global_average_pooling_2d(x):
    """Mean over the spatial axes: (N, C, H, W) -> (N, C)."""
    return GlobalAveragePooling2D().apply((x,))[0]
