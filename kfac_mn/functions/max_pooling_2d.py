"""2-D max pooling (NCHW), PyTorch conventions: floor output size, padding never wins.

Strided windows make every per-offset operation a strided one, which NumPy runs
several times slower than a contiguous one.  So the input is first split into its
``sy * sx`` stride phases ``x[:, :, py::sy, px::sx]`` (contiguous copies; none for
stride 1): window element ``(i, j)`` of output ``(oy, ox)`` is then element
``(oy + dy, ox + dx)`` of phase ``((i - ph) % sy, (j - pw) % sx)``, with
``dy = (i - ph) // sy`` and ``dx = (j - pw) // sx``, a plain shifted slice.
Both directions work on cache-sized blocks of examples (see ``batch_chunks``).
"""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.array_checks import check_ndim
from kfac_mn.functions.batch_chunks import batch_chunks
from kfac_mn.functions.patches import output_hw, pooling_params


def phase_shapes(shape, stride):
    """Shapes of the stride phases ``x[:, :, py::sy, px::sx]`` of an array of ``shape``."""
    n, c, h, w = shape
    sy, sx = stride
    return {(py, px): (n, c, len(range(py, h, sy)), len(range(px, w, sx)))
            for py in range(sy) for px in range(sx)}


def window_offsets(ksize, stride, pad, out_hw, phase_hw):
    """For each kernel offset in row-major order, the windows for which it is not padding.

    Yields ``(phase key, out_index, phase_index)``: ``y[out_index]`` and
    ``phases[key][phase_index]`` are the windows and their element at that offset.
    """
    (kh, kw), (sy, sx), (ph, pw), (oh, ow) = ksize, stride, pad, out_hw
    for i in range(kh):
        py, dy = (i - ph) % sy, (i - ph) // sy
        for j in range(kw):
            px, dx = (j - pw) % sx, (j - pw) // sx
            hp, wp = phase_hw[(py, px)]
            oy0, oy1 = max(0, -dy), min(oh, hp - dy)
            ox0, ox1 = max(0, -dx), min(ow, wp - dx)
            if oy0 < oy1 and ox0 < ox1:
                yield ((py, px), (Ellipsis, slice(oy0, oy1), slice(ox0, ox1)),
                       (Ellipsis, slice(oy0 + dy, oy1 + dy), slice(ox0 + dx, ox1 + dx)))


class MaxPooling2D(FunctionNode):
    """Keeps its output and the input's stride phases; backward routes each output
    gradient to the first (row-major) element of its window equal to the maximum,
    as PyTorch does."""

    def __init__(self, ksize, stride=None, pad=0):
        self.ksize, self.stride, self.pad = pooling_params("max_pooling_2d", ksize, stride, pad)
        self._phases = None
        self._in_shape = None

    def _offsets(self, out_hw):
        phase_hw = {key: shape[2:] for key, shape in phase_shapes(self._in_shape,
                                                                  self.stride).items()}
        return list(window_offsets(self.ksize, self.stride, self.pad, out_hw, phase_hw))

    def forward(self, inputs):
        x, = inputs
        check_ndim("x", x, (4,), "max_pooling_2d")
        xp = backend.get_array_module(x)
        out_hw = output_hw(x.shape[2:], self.ksize, self.stride, self.pad)
        self._in_shape = x.shape
        sy, sx = self.stride
        if self.stride == (1, 1):
            self._phases = {(0, 0): x}
        else:
            self._phases = {key: xp.empty(shape, dtype=x.dtype)
                            for key, shape in phase_shapes(x.shape, self.stride).items()}
        y = xp.full(x.shape[:2] + out_hw, -xp.inf, dtype=x.dtype)
        offsets = self._offsets(out_hw)
        for chunk in batch_chunks(xp, x.shape[0], y[0].size):
            if self.stride != (1, 1):
                for (py, px), phase in self._phases.items():
                    phase[chunk] = x[chunk, :, py::sy, px::sx]
            y_c = y[chunk]
            for key, out_index, phase_index in offsets:
                window_max = y_c[out_index]
                xp.maximum(window_max, self._phases[key][chunk][phase_index], out=window_max)
        self.retain_outputs((0,))
        return (y,)

    def backward(self, indexes, grad_outputs):
        y, = self.get_retained_outputs()
        gy = grad_outputs[0]
        xp = backend.get_array_module(y)
        sy, sx = self.stride
        chunks = batch_chunks(xp, y.shape[0], y[0].size)
        block = (chunks[0].stop,) + y.shape[1:]
        # Buffers reused by every offset and block: fresh temporaries cost more than
        # the arithmetic.  ``unrouted`` is zeroed where a window's maximum was found.
        unrouted_buf, routed_buf = xp.empty(block, dtype=gy.dtype), xp.empty(block, gy.dtype)
        is_max_buf = xp.empty(block, dtype=bool)
        strided = self.stride != (1, 1)
        g_phase_bufs = {key: xp.empty((block[0],) + phase.shape[1:], dtype=gy.dtype)
                        for key, phase in self._phases.items()} if strided else {}
        gx = xp.empty(self._in_shape, dtype=gy.dtype)
        offsets = self._offsets(y.shape[2:])
        for chunk in chunks:
            m = chunk.stop - chunk.start
            unrouted, routed, is_max = unrouted_buf[:m], routed_buf[:m], is_max_buf[:m]
            y_c = y[chunk]
            unrouted[...] = gy[chunk]
            g_phases = ({key: buf[:m] for key, buf in g_phase_bufs.items()} if strided
                        else {(0, 0): gx[chunk]})
            for g in g_phases.values():
                g.fill(0)
            for key, out_index, phase_index in offsets:
                hit, part, remaining = is_max[out_index], routed[out_index], unrouted[out_index]
                xp.equal(self._phases[key][chunk][phase_index], y_c[out_index], out=hit)
                xp.multiply(remaining, hit, out=part)
                g_phases[key][phase_index] += part
                remaining -= part
            if strided:
                for (py, px), g in g_phases.items():
                    gx[chunk, :, py::sy, px::sx] = g
        return (gx,)


def max_pooling_2d(x, ksize, stride=None, pad=0):
    """Max over ``ksize`` windows every ``stride`` (default ``ksize``), padding ``pad``."""
    return MaxPooling2D(ksize, stride, pad).apply((x,))[0]
