"""im2col / col2im: the patches a convolution multiplies, shared with K-FAC and pooling.

Layout (NCHW images): ``im2col(x)`` has shape ``(N, C, kh, kw, OH, OW)`` with
``col[n, c, i, j, oy, ox] = x_padded[n, c, oy * sy + i, ox * sx + j]``, so that
``col.reshape(N, C * kh * kw, OH * OW)`` is free and its rows line up with
``W.reshape(C_out, -1)`` for a weight ``W`` of shape ``(C_out, C, kh, kw)``.
Output sizes use floor division, as PyTorch (``(h + 2 * p - k) // s + 1``).
On the GPU, im2col and col2im of float32/float64 arrays are one CUDA kernel each
(:mod:`kfac_mn.cuda_kernels`); the NumPy code below defines what they compute.
"""
from kfac_mn import backend, cuda_kernels


def pair(value, name="value"):
    """``3 -> (3, 3)``; a pair passes through.  Values must be non-negative ints."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        result = tuple(value)
    else:
        result = (value, value)
    for v in result:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be non-negative int(s), got {value!r}")
    return result


def conv_outsize(size, k, s, p):
    """Number of windows of size ``k``, stride ``s`` over ``size`` padded by ``p`` both sides."""
    out = (size + 2 * p - k) // s + 1
    if out <= 0:
        raise ValueError(
            f"window {k} (stride {s}, pad {p}) does not fit an input of size {size}")
    return out


def pooling_params(function, ksize, stride, pad):
    """Validated ``(ksize, stride, pad)`` pairs; ``stride=None`` means ``ksize``."""
    ksize = pair(ksize, "ksize")
    stride = ksize if stride is None else pair(stride, "stride")
    pad = pair(pad, "pad")
    if 0 in ksize or 0 in stride:
        raise ValueError(f"{function}: ksize and stride must be positive, got ksize={ksize}, "
                         f"stride={stride}")
    if pad[0] * 2 > ksize[0] or pad[1] * 2 > ksize[1]:
        raise ValueError(f"{function}: pad {pad} must be at most half of ksize {ksize}")
    return ksize, stride, pad


def _check_windows(x, ksize, stride, pad):
    if x.ndim != 4:
        raise ValueError(f"expected an NCHW array (4 dims), got shape {x.shape}")
    kh, kw = pair(ksize, "ksize")
    sy, sx = pair(stride, "stride")
    ph, pw = pair(pad, "pad")
    if kh == 0 or kw == 0 or sy == 0 or sx == 0:
        raise ValueError(f"ksize and stride must be positive, got ksize={ksize!r}, "
                         f"stride={stride!r}")
    return kh, kw, sy, sx, ph, pw


def output_hw(in_hw, ksize, stride, pad):
    """``(OH, OW)`` of windows ``ksize`` every ``stride`` over ``in_hw`` padded by ``pad``."""
    return tuple(conv_outsize(size, k, s, p) for size, k, s, p in zip(in_hw, ksize, stride, pad))


def zero_padded(x, pad):
    """``x`` (N, C, H, W) with ``pad = (ph, pw)`` rows and columns of zeros on each side."""
    ph, pw = pad
    if not (ph or pw):
        return x
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    padded = xp.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    if ph:
        padded[:, :, :ph] = 0
        padded[:, :, -ph:] = 0
    if pw:
        padded[:, :, ph:ph + h, :pw] = 0
        padded[:, :, ph:ph + h, -pw:] = 0
    padded[:, :, ph:ph + h, pw:pw + w] = x
    return padded


def window_view(x, ksize, stride, pad):
    """A strided view ``(N, C, kh, kw, OH, OW)`` of the zero-padded windows of ``x``.

    Never write to the view: its windows overlap.
    """
    kh, kw, sy, sx, ph, pw = _check_windows(x, ksize, stride, pad)
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    oh, ow = output_hw((h, w), (kh, kw), (sy, sx), (ph, pw))
    x = zero_padded(x, (ph, pw))
    s0, s1, s2, s3 = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, shape=(n, c, kh, kw, oh, ow), strides=(s0, s1, s2, s3, s2 * sy, s3 * sx))


def im2col(x, ksize, stride, pad, out=None):
    """Patches of ``x`` (N, C, H, W) as a C-contiguous ``(N, C, kh, kw, OH, OW)`` array.

    Padding is with zeros.  With ``out`` (a C-contiguous array of that shape) the
    patches are written there.  Without it, for a 1x1, stride-1, unpadded window the
    patches are ``x`` itself: the result is then a reshaped view of (a C-contiguous
    copy of) ``x`` and may share its memory; treat it as read-only.
    """
    kh, kw, sy, sx, ph, pw = _check_windows(x, ksize, stride, pad)
    xp = backend.get_array_module(x)
    n, c, h, w = x.shape
    shape = (n, c, kh, kw) + output_hw((h, w), (kh, kw), (sy, sx), (ph, pw))
    if out is None:
        if (kh, kw, sy, sx, ph, pw) == (1, 1, 1, 1, 0, 0):
            return xp.ascontiguousarray(x).reshape(shape)
        out = xp.empty(shape, dtype=x.dtype)
    elif out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"im2col: out must be a C-contiguous array of shape {shape}, "
                         f"got shape {out.shape}")
    if cuda_kernels.applies(xp, x.dtype) and out.dtype == x.dtype:
        return cuda_kernels.im2col(x, (kh, kw), (sy, sx), (ph, pw), out)
    if (sy, sx) == (1, 1) and shape[4:] == (h, w):
        _im2col_same_size(xp.ascontiguousarray(x), ph, pw, out)
    elif kh * kw >= 4 * sy * sx > 4:
        _im2col_strided(zero_padded(x, (ph, pw)), (sy, sx), out)
    else:
        out[...] = window_view(x, (kh, kw), (sy, sx), (ph, pw))
    return out


def _im2col_strided(padded, stride, out):
    """Patches for stride > 1 from the stride phases ``padded[:, :, py::sy, px::sx]``.

    Element ``(i, j)`` of window ``(oy, ox)`` is element ``(oy + i // sy, ox + j // sx)``
    of phase ``(i % sy, j % sx)``: once the phases are copied out, every offset is a
    copy of rows with unit stride instead of a strided gather.  Each phase costs a
    strided copy of ``1 / (sy * sx)`` of the image, so this pays only for windows
    large compared to the stride (measured: 7x7/2 yes, 3x3/2 no).
    """
    xp = backend.get_array_module(padded)
    (sy, sx), (kh, kw, oh, ow) = stride, out.shape[2:]
    phases = {}
    for i in range(kh):
        for j in range(kw):
            key = (i % sy, j % sx)
            if key not in phases:
                phases[key] = xp.ascontiguousarray(padded[:, :, key[0]::sy, key[1]::sx])
            top, left = i // sy, j // sx
            out[:, :, i, j] = phases[key][:, :, top:top + oh, left:left + ow]


def _flat_shifts(kh, kw, ph, pw, h, w):
    """Stride-1 windows with output size = input size, on images flattened to ``h * w``.

    Kernel element ``(i, j)`` of output ``q`` is input ``q + d`` with
    ``d = (i - ph) * w + (j - pw)``: one long contiguous run per offset instead of
    ``h`` short ones.  Yields ``(i, j, d, q0, q1, wrapped)``: outputs ``q0 <= q < q1``
    have ``q + d`` inside the flat image, and the output columns ``wrapped`` crossed
    the left or right edge into the neighbouring row (they are padding).
    """
    hw = h * w
    for i in range(kh):
        for j in range(kw):
            dx = j - pw
            d = (i - ph) * w + dx
            wrapped = range(min(-dx, w)) if dx < 0 else range(max(w - dx, 0), w)
            yield i, j, d, max(0, -d), min(hw, hw - d), wrapped


def _im2col_same_size(x, ph, pw, out):
    n, c, kh, kw, h, w = out.shape
    x_flat = x.reshape(n, c, h * w)
    col_flat = out.reshape(n, c, kh, kw, h * w)
    for i, j, d, q0, q1, wrapped in _flat_shifts(kh, kw, ph, pw, h, w):
        dst = col_flat[:, :, i, j]
        dst[..., q0:q1] = x_flat[..., q0 + d:q1 + d]
        dst[..., :q0] = 0
        dst[..., q1:] = 0
        for column in wrapped:
            dst[..., column::w] = 0


def _col2im_same_size(col, ph, pw, out):
    n, c, kh, kw, h, w = col.shape
    img_flat = out.reshape(n, c, h * w)
    col_flat = col.reshape(n, c, kh, kw, h * w)
    out.fill(0)
    for i, j, d, q0, q1, wrapped in _flat_shifts(kh, kw, ph, pw, h, w):
        src = col_flat[:, :, i, j]
        img_flat[..., q0 + d:q1 + d] += src[..., q0:q1]
        for column in wrapped:  # take back what crossed an edge into the next row
            first = column + max(0, -(-(q0 - column) // w)) * w
            img_flat[..., first + d:q1 + d:w] -= src[..., first:q1:w]


def _valid_range(out_size, in_size, offset, stride, pad):
    """Output positions ``o`` whose input ``o * stride + offset - pad`` is in the image.

    Returns ``(o_begin, o_end, i_begin)`` with ``i_begin`` the input index of ``o_begin``.
    """
    begin = max(0, -(-(pad - offset) // stride))
    end = min(out_size, (in_size - 1 + pad - offset) // stride + 1)
    return begin, max(begin, end), begin * stride + offset - pad


def offset_slices(offset, stride, pad, out_hw, in_hw):
    """Where the kernel element ``offset = (i, j)`` of every window lands in the image.

    Returns ``(out_index, in_index)``: ``out[..., out_index]`` are the windows whose
    element ``(i, j)`` is inside the image, ``img[..., in_index]`` those image values
    (same shape); ``None`` when the element is padding for every window.
    """
    index = []
    for k, s, p, o, n in zip(offset, stride, pad, out_hw, in_hw):
        o0, o1, i0 = _valid_range(o, n, k, s, p)
        if o0 == o1:
            return None
        index.append((slice(o0, o1), slice(i0, i0 + (o1 - o0 - 1) * s + 1, s)))
    (out_rows, in_rows), (out_cols, in_cols) = index
    return (Ellipsis, out_rows, out_cols), (Ellipsis, in_rows, in_cols)


def add_offset_to_image(img, values, offset, stride, pad):
    """``img[n, c, o * s + offset - pad] += values[n, c, o]`` (both axes), in place.

    ``values`` (N, C, OH, OW) are what the windows' element at kernel position
    ``offset = (i, j)`` receives; positions that fall in the padding are dropped.
    """
    where = offset_slices(offset, stride, pad, values.shape[2:], img.shape[2:])
    if where is not None:
        img[where[1]] += values[where[0]]


def col2im(col, stride, pad, h, w, out=None):
    """Adjoint of :func:`im2col`: add every patch back to where it came from.

    ``col`` is ``(N, C, kh, kw, OH, OW)``; the result is ``(N, C, h, w)``, C-contiguous
    (written into ``out``, a C-contiguous array, when given).  Each of the ``kh * kw``
    kernel offsets is one strided add (one contiguous add over flattened images for
    stride-1 windows that keep the image size); padded positions are dropped.
    """
    if col.ndim != 6:
        raise ValueError(f"col2im expects (N, C, kh, kw, OH, OW), got shape {col.shape}")
    stride = pair(stride, "stride")
    pad = pair(pad, "pad")
    if 0 in stride:
        raise ValueError(f"stride must be positive, got {stride!r}")
    xp = backend.get_array_module(col)
    n, c, kh, kw, oh, ow = col.shape
    if out is None:
        out = xp.empty((n, c, h, w), dtype=col.dtype)
    elif out.shape != (n, c, h, w) or not out.flags.c_contiguous:
        raise ValueError(f"col2im: out must be a C-contiguous array of shape {(n, c, h, w)}, "
                         f"got shape {out.shape}")
    if (kh, kw, oh, ow) == (1, 1, h, w) and stride == (1, 1) and pad == (0, 0):
        out[...] = col.reshape(n, c, h, w)
        return out
    if cuda_kernels.applies(xp, col.dtype) and out.dtype == col.dtype:
        return cuda_kernels.col2im(col, stride, pad, out)
    if stride == (1, 1) and (oh, ow) == (h, w):
        _col2im_same_size(xp.ascontiguousarray(col), pad[0], pad[1], out)
        return out
    out.fill(0)
    for i in range(kh):
        for j in range(kw):
            add_offset_to_image(out, col[:, :, i, j], (i, j), stride, pad)
    return out
