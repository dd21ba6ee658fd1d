"""2-D convolution (NCHW, cross-correlation as in every framework): im2col + GEMM.

With ``col = im2col(x)`` viewed as ``(N, K, S)`` (``K = C * kh * kw`` patch values,
``S = OH * OW`` output positions) and ``W2 = W.reshape(C_out, K)``:

    y[n]  = W2 @ col[n] + b                      (forward)
    gW    = sum_n gy[n] @ col[n]^T               (weight gradient)
    gcol  = W2^T @ gy[n],  gx = col2im(gcol)     (input gradient)
    gb    = sum_{n, s} gy[n, :, s]

The patches are ``kh * kw`` times the size of ``x``.  On the CPU they are built a few
examples at a time into one reused buffer, so that the GEMM reads them from the
cache, and they are rebuilt in backward rather than kept: no patch array of the
whole batch is ever stored.  On the GPU the whole batch is one block, or, with
``backend.set_conv_backend('cudnn')``, cuDNN computes ``y``, ``gx`` and ``gW`` from graphs
(:mod:`kfac_mn.cudnn_graphs`) and no patches are built; K-FAC builds its own for A
(:func:`~kfac_mn.functions.im2col`) on the steps that refresh it.
"""
from kfac_mn import backend, cudnn_graphs
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.array_checks import check_ndim, check_same_dtype, check_vector
from kfac_mn.functions.batch_chunks import batch_chunks
from kfac_mn.functions.patches import col2im, im2col, output_hw, pair

PATCH_BLOCK_ELEMENTS = 1 << 21  # patches (or their gradients) per block: 8 MiB of float32


class Convolution2DFunction(FunctionNode):
    """Inputs ``(x, W)`` or ``(x, W, b)``; ``x`` is (N, C, H, W), ``W`` is (C_out, C, kh, kw).

    ``stride`` and ``pad`` are (y, x) pairs, ``ksize`` is set by ``forward``: the
    geometry K-FAC passes to :func:`~kfac_mn.functions.im2col` for the very same
    patches.  Retains ``x`` and ``W``.
    """

    def __init__(self, stride=1, pad=0):
        self.stride = pair(stride, "stride")
        self.pad = pair(pad, "pad")
        if 0 in self.stride:
            raise ValueError(f"convolution_2d: stride must be positive, got {stride!r}")
        self.ksize = None

    def forward(self, inputs):
        x, W = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        check_ndim("x", x, (4,), "convolution_2d")
        check_ndim("W", W, (4,), "convolution_2d")
        check_same_dtype("convolution_2d", x=x, W=W, b=b)
        if x.shape[1] != W.shape[1]:
            raise ValueError(f"convolution_2d: x has {x.shape[1]} channels but W expects "
                             f"{W.shape[1]} (W shape {W.shape})")
        c_out = W.shape[0]
        check_vector("convolution_2d", "b", b, c_out)
        self.ksize = tuple(W.shape[2:])
        xp = backend.get_array_module(x, W)
        self.retain_inputs((0, 1))
        if backend.uses_cudnn(xp):
            y = cudnn_graphs.conv2d_forward(x, W, self.stride, self.pad)
            if y is not None:
                if b is not None:
                    y += b[:, None, None]
                return (y,)
        n = x.shape[0]
        out_hw = output_hw(x.shape[2:], self.ksize, self.stride, self.pad)
        w2 = W.reshape(c_out, -1)
        y = xp.empty((n, c_out, out_hw[0] * out_hw[1]), dtype=x.dtype)
        for chunk, col in self._patch_blocks(x):
            xp.matmul(w2, col, out=y[chunk])
        if b is not None:
            y += b[:, None]
        return (y.reshape((n, c_out) + out_hw),)

    def _is_pointwise(self):
        return self.ksize == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0)

    def _patch_blocks(self, x):
        """Yield ``(batch slice, patches (n_block, K, S))`` over blocks of examples."""
        xp = backend.get_array_module(x)
        n, c = x.shape[:2]
        if self._is_pointwise():
            yield slice(0, n), xp.ascontiguousarray(x).reshape(n, c, -1)
            return
        (kh, kw), out_hw = self.ksize, output_hw(x.shape[2:], self.ksize, self.stride, self.pad)
        block_shape = (c, kh, kw) + out_hw
        per_example = c * kh * kw * out_hw[0] * out_hw[1]
        chunks = batch_chunks(xp, n, per_example, budget=PATCH_BLOCK_ELEMENTS)
        buffer = xp.empty((chunks[0].stop,) + block_shape, dtype=x.dtype)
        for chunk in chunks:
            block = buffer[:chunk.stop - chunk.start]
            im2col(x[chunk], self.ksize, self.stride, self.pad, out=block)
            yield chunk, block.reshape(len(block), c * kh * kw, -1)

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        xp = backend.get_array_module(x, W)
        n, c_out = x.shape[0], W.shape[0]
        grads = {}
        if backend.uses_cudnn(xp):
            gy = grad_outputs[0]
            if 1 in indexes:
                grads[1] = cudnn_graphs.conv2d_backward_filter(x, gy, W.shape, self.stride,
                                                               self.pad)
            if 0 in indexes:
                grads[0] = cudnn_graphs.conv2d_backward_data(gy, W, x.shape, self.stride,
                                                             self.pad)
            grads = {i: g for i, g in grads.items() if g is not None}  # else: im2col below
        gy = xp.ascontiguousarray(grad_outputs[0]).reshape(n, c_out, -1)
        w2 = W.reshape(c_out, -1)
        if 1 in indexes and 1 not in grads:
            gw = None
            for chunk, col in self._patch_blocks(x):
                part = weight_grad(gy[chunk], col)
                gw = part if gw is None else xp.add(gw, part, out=gw)
            grads[1] = gw.reshape(W.shape)
        if 0 in indexes and 0 not in grads:
            grads[0] = self._input_grad(w2, gy, x.shape)
        if 2 in indexes:
            grads[2] = gy.sum(axis=(0, 2))
        return tuple(grads[i] for i in indexes)

    def _input_grad(self, w2, gy, x_shape):
        """``col2im(W2^T gy)``, a block of examples at a time (the patch gradients stay
        in the cache between the GEMM and col2im)."""
        xp = backend.get_array_module(w2, gy)
        if self._is_pointwise():
            return xp.matmul(w2.T, gy).reshape(x_shape)
        n, k, s = gy.shape[0], w2.shape[1], gy.shape[2]
        (kh, kw), out_hw = self.ksize, output_hw(x_shape[2:], self.ksize, self.stride, self.pad)
        chunks = batch_chunks(xp, n, k * s, budget=PATCH_BLOCK_ELEMENTS)
        buffer = xp.empty((chunks[0].stop, k, s), dtype=gy.dtype)
        gx = xp.empty(x_shape, dtype=gy.dtype)
        for chunk in chunks:
            gcol = xp.matmul(w2.T, gy[chunk], out=buffer[:chunk.stop - chunk.start])
            col2im(gcol.reshape((-1, x_shape[1], kh, kw) + out_hw), self.stride, self.pad,
                   x_shape[2], x_shape[3], out=gx[chunk])
        return gx


def weight_grad(gy, col):
    """``sum_n gy[n] @ col[n]^T`` for ``gy`` (n, C_out, S) and ``col`` (n, K, S).

    Either n GEMMs and a sum of n (C_out, K) products, or one GEMM over n * S
    columns after transposing copies of ``gy`` and ``col``: whichever moves less
    memory (the first for large images, the second for the small late layers).
    """
    n, c_out, s = gy.shape
    k = col.shape[1]
    xp = backend.get_array_module(gy, col)
    if c_out * k <= s * (c_out + k):
        return xp.matmul(gy, col.transpose(0, 2, 1)).sum(axis=0)
    gy_t = gy.transpose(1, 0, 2).reshape(c_out, n * s)
    col_t = col.transpose(1, 0, 2).reshape(k, n * s)
    return xp.matmul(gy_t, col_t.T)


def convolution_2d(x, W, b=None, stride=1, pad=0):
    """2-D convolution of ``x`` (N, C, H, W) with ``W`` (C_out, C, kh, kw) and bias ``b``.

    ``stride`` and ``pad`` are ints or (y, x) pairs; zero padding; output size
    ``(H + 2 * pad - kh) // stride + 1`` (floor, as PyTorch).
    """
    inputs = (x, W) if b is None else (x, W, b)
    return Convolution2DFunction(stride, pad).apply(inputs)[0]
