"""CUDA kernels for the few operations where one fused pass beats a chain of CuPy calls.

Importing this module needs no CuPy (CuPy itself is reached through :mod:`kfac_mn.backend`
when a kernel is first compiled); :func:`applies` is the one test, used at every call site,
of whether a kernel takes the work.  Every kernel computes what the NumPy code at its call site
computes: same layout, same casts, scalar arguments rounded to the array's dtype first (as
NumPy does with a Python float), so tests/test_gpu_*.py can compare the two.

* :func:`im2col` / :func:`col2im` (:mod:`kfac_mn.functions.patches`): one thread per output
  element, instead of ``kh * kw`` strided copies or strided adds.
* :func:`batch_norm_forward` / :func:`batch_norm_backward`
  (:mod:`kfac_mn.functions.batch_normalization`): ``x_hat`` and ``y`` in one pass, ``gx`` in
  one pass, instead of four passes each.
* :func:`pack_upper_triangle` / :func:`unpack_upper_triangle`
  (:mod:`kfac_mn.distributed.triangles`): a symmetric factor's upper triangle with the scale
  and the cast (e.g. to float16) in one pass, and back to the full matrix with the cast and
  the unscale in one pass, without the two index arrays of ``triu_indices``.
* :func:`scale_segments` and :func:`segment_max_abs` (:mod:`kfac_mn.distributed.segment_scaling`):
  one launch for the whole packed buffer instead of one or two per segment.
* :func:`max_abs`, :func:`ldexp_to_float16` and :func:`float16_gram`
  (:mod:`kfac_mn.fisher.factor_products`): float16 x float16 products with float32
  accumulation on the tensor cores (cuBLAS ``gemmEx``), the paper's half-precision factors.

The elementwise kernels come in a 32-bit and a 64-bit index variant; the 64-bit one is used
only for arrays of 2^31 elements or more.  Patch and batch-norm kernels are compiled for
float32 and float64 (:data:`KERNEL_DTYPES`); other dtypes take the generic CuPy code.
"""
import functools

import numpy

from kfac_mn import backend

KERNEL_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def applies(xp, *dtypes):
    """Do the kernels take this work: CuPy arrays whose dtypes are all one of
    :data:`KERNEL_DTYPES`?  (Other dtypes, and NumPy, take the generic code.)"""
    return xp is not numpy and all(numpy.dtype(dtype) in KERNEL_DTYPES for dtype in dtypes)

_INT32_LIMIT = 2 ** 31
_SEGMENT_BLOCK = 256  # threads per segment in segment_max_abs (a power of two)


def _index_type(*sizes):
    return "long long" if max(sizes, default=0) >= _INT32_LIMIT else "int"


@functools.lru_cache(maxsize=None)
def _elementwise(name, in_params, out_params, body, index_type="long long"):
    """A cached ElementwiseKernel; ``I`` in ``body`` is the index type."""
    suffix = "i64" if index_type == "long long" else "i32"
    return backend.cupy.ElementwiseKernel(
        in_params, out_params, f"typedef {index_type} I;\n{body}", f"kfac_mn_{name}_{suffix}")


# -- im2col / col2im --------------------------------------------------------------------------
_GEOMETRY = ("int32 h, int32 w, int32 oh, int32 ow, int32 kh, int32 kw, int32 sy, int32 sx, "
             "int32 ph, int32 pw")

# col[plane, ky, kx, oy, ox] = img[plane, oy * sy + ky - ph, ox * sx + kx - pw], 0 in the padding
# (plane = n * C + c; the layout of kfac_mn.functions.patches.im2col).
_IM2COL = """
const I idx = i;
const I ox = idx % ow;
const I oy = idx / ow % oh;
const I kx = idx / ((I)ow * oh) % kw;
const I ky = idx / ((I)ow * oh * kw) % kh;
const I plane = idx / ((I)ow * oh * kw * kh);
const I y = oy * sy + ky - ph;
const I x = ox * sx + kx - pw;
col = (0 <= y && y < h && 0 <= x && x < w) ? img[(plane * h + y) * w + x] : (T)0;
"""

# img[plane, y, x] = sum of the patch values taken from (y, x): kernel offset (ky, kx) of the
# window (oy, ox) with oy * sy + ky - ph = y, ox * sx + kx - pw = x, added in (ky, kx) order.
_COL2IM = """
const I idx = i;
const int x = idx % w;
const int y = idx / w % h;
const I plane = idx / ((I)w * h);
T total = 0;
for (int ky = 0; ky < kh; ++ky) {
    const int ty = y + ph - ky;
    if (ty < 0 || ty % sy != 0 || ty / sy >= oh) continue;
    for (int kx = 0; kx < kw; ++kx) {
        const int tx = x + pw - kx;
        if (tx < 0 || tx % sx != 0 || tx / sx >= ow) continue;
        total += col[(((plane * kh + ky) * kw + kx) * oh + ty / sy) * ow + tx / sx];
    }
}
img = total;
"""


def im2col(x, ksize, stride, pad, out):
    """Write the patches of ``x`` (N, C, H, W) into ``out`` (N, C, kh, kw, OH, OW); returns it."""
    cupy = backend.cupy
    n, c, h, w = x.shape
    kh, kw, oh, ow = out.shape[2:]
    img = cupy.ascontiguousarray(x).reshape(-1)
    kernel = _elementwise("im2col", "raw T img, " + _GEOMETRY, "T col", _IM2COL,
                          _index_type(img.size, out.size))
    kernel(img, h, w, oh, ow, kh, kw, stride[0], stride[1], pad[0], pad[1], out)
    return out


def col2im(col, stride, pad, out):
    """Add the patches ``col`` (N, C, kh, kw, OH, OW) back into ``out`` (N, C, h, w); returns it."""
    cupy = backend.cupy
    h, w = out.shape[2:]
    kh, kw, oh, ow = col.shape[2:]
    flat = cupy.ascontiguousarray(col).reshape(-1)
    kernel = _elementwise("col2im", "raw T col, " + _GEOMETRY, "T img", _COL2IM,
                          _index_type(flat.size, out.size))
    kernel(flat, h, w, oh, ow, kh, kw, stride[0], stride[1], pad[0], pad[1], out)
    return out


# -- batch normalization ----------------------------------------------------------------------
def batch_norm_forward(x3, mean, inv_std, gamma, beta):
    """``x_hat = (x - mean) * inv_std`` and ``y = x_hat * gamma + beta`` in one pass.

    ``x3`` is (N, C, S); the statistics and parameters are (C,).  Returns ``(x_hat, y)``.
    """
    kernel = _elementwise(
        "batch_norm_forward", "T x, T mean, T inv_std, T gamma, T beta", "T x_hat, T y",
        "const T h = (x - mean) * inv_std;\nx_hat = h;\ny = h * gamma + beta;",
        _index_type(x3.size))
    return kernel(x3, mean[:, None], inv_std[:, None], gamma[:, None], beta[:, None])


def batch_norm_backward(gy3, x_hat3, slope, offset, scale):
    """``gx = scale * (gy - (x_hat * slope + offset))`` in one pass (per-channel (C,) terms)."""
    kernel = _elementwise(
        "batch_norm_backward", "T gy, T x_hat, T slope, T offset, T scale", "T gx",
        "gx = scale * (gy - (x_hat * slope + offset));", _index_type(gy3.size))
    return kernel(gy3, x_hat3, slope[:, None], offset[:, None], scale[:, None])


# -- symmetric factors as upper triangles ------------------------------------------------------
# Row r of the upper triangle starts at r * d - r * (r - 1) / 2 (rows 0 .. r-1 hold d, d-1, ...).
_PACK_TRIANGLE = """
const long long row = i / d;
const long long column = i % d;
if (column >= row) {
    packed[row * d - row * (row - 1) / 2 + (column - row)] = (O)(matrix[i] * scale);
}
"""

_UNPACK_TRIANGLE = """
const long long row = i / d;
const long long column = i % d;
const long long low = row < column ? row : column;
const long long high = row < column ? column : row;
matrix = (O)packed[low * d - low * (low - 1) / 2 + (high - low)] * inv_scale;
"""


def pack_upper_triangle(matrix, scale, out):
    """``out[:] = (upper triangle of matrix, row by row) * scale`` cast to ``out.dtype``.

    ``scale`` is rounded to ``matrix.dtype`` first, as NumPy rounds a Python float multiplied
    with an array.  ``out`` is a 1-D array (a slice of a larger buffer is fine).
    """
    d = matrix.shape[0]
    if d == 0:
        return out
    kernel = _elementwise("pack_upper_triangle", "raw T matrix, int64 d, T scale",
                          "raw O packed", _PACK_TRIANGLE)
    kernel(backend.cupy.ascontiguousarray(matrix).reshape(-1), d, scale, out, size=d * d)
    return out


def unpack_upper_triangle(vector, d, inv_scale, dtype):
    """The symmetric (d, d) matrix of ``dtype`` with upper triangle ``vector`` * ``inv_scale``.

    The values are cast to ``dtype`` before the multiplication by ``inv_scale`` (itself
    rounded to ``dtype``).
    """
    cupy = backend.cupy
    matrix = cupy.empty((d, d), dtype=dtype)
    if d == 0:
        return matrix
    kernel = _elementwise("unpack_upper_triangle", "raw T packed, int64 d, O inv_scale",
                          "O matrix", _UNPACK_TRIANGLE)
    kernel(cupy.ascontiguousarray(vector), d, inv_scale, matrix)
    return matrix


# -- per-segment scaling -----------------------------------------------------------------------
# Element i belongs to the first segment whose end offset exceeds i (empty segments skipped).
_SCALE_SEGMENTS = """
int low = 0, high = segments - 1;
while (low < high) {
    const int middle = (low + high) / 2;
    if (ends[middle] > i) high = middle; else low = middle + 1;
}
scaled = (Z)((Y)value * factors[low]);
"""


def _segment_bounds(sizes, buffer, what):
    """(starts, ends) of the consecutive segments, which must cover ``buffer`` exactly."""
    sizes = numpy.asarray(sizes, dtype=numpy.int64)
    ends = numpy.cumsum(sizes)
    covered = int(ends[-1]) if len(ends) else 0
    if covered != buffer.size:
        raise ValueError(f"{what}: the segments cover {covered} values, the buffer has "
                         f"{buffer.size}")
    return ends - sizes, ends


def scale_segments(buffer, sizes, factors, compute_dtype, out_dtype):
    """``(buffer[k] as compute_dtype) * factors[segment of k]`` cast to ``out_dtype``.

    ``factors`` (one per segment, host values) are rounded to ``compute_dtype``.
    """
    cupy = backend.cupy
    _, ends = _segment_bounds(sizes, buffer, "scale_segments")
    scaled = cupy.empty(buffer.shape, dtype=out_dtype)
    if buffer.size == 0:
        return scaled
    kernel = _elementwise(
        "scale_segments", "X value, raw int64 ends, raw Y factors, int32 segments", "Z scaled",
        _SCALE_SEGMENTS, _index_type(buffer.size))
    kernel(buffer, cupy.asarray(ends), cupy.asarray(factors, dtype=compute_dtype),
           len(ends), scaled)
    return scaled


_SEGMENT_MAX_ABS = """
extern "C" __global__ void kfac_mn_segment_max_abs_{name}(
        const {ctype}* values, const long long* starts, const long long* ends,
        {ctype}* maxima) {{
    __shared__ {ctype} partial[{block}];
    {ctype} best = 0;
    for (long long k = starts[blockIdx.x] + threadIdx.x; k < ends[blockIdx.x];
         k += blockDim.x) {{
        const {ctype} v = {fabs}(values[k]);
        if (v > best || v != v) best = v;  // a NaN, once seen, stays
    }}
    partial[threadIdx.x] = best;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {{
        if (threadIdx.x < stride) {{
            const {ctype} other = partial[threadIdx.x + stride];
            if (other > partial[threadIdx.x] || other != other) partial[threadIdx.x] = other;
        }}
        __syncthreads();
    }}
    if (threadIdx.x == 0) maxima[blockIdx.x] = partial[0];
}}
"""

_C_TYPES = {numpy.dtype(numpy.float32): ("float", "fabsf"),
            numpy.dtype(numpy.float64): ("double", "fabs")}


@functools.lru_cache(maxsize=None)
def _segment_max_abs_kernel(dtype):
    ctype, fabs = _C_TYPES[dtype]
    source = _SEGMENT_MAX_ABS.format(name=ctype, ctype=ctype, fabs=fabs, block=_SEGMENT_BLOCK)
    return backend.cupy.RawKernel(source, f"kfac_mn_segment_max_abs_{ctype}")


def segment_max_abs(buffer, sizes):
    """Largest magnitude of each segment of a float32/float64 ``buffer`` (device array).

    One thread block per segment; an empty segment gives 0, a NaN anywhere in a segment
    gives NaN (as ``xp.abs(part).max()`` does).
    """
    cupy = backend.cupy
    starts, ends = _segment_bounds(sizes, buffer, "segment_max_abs")
    maxima = cupy.zeros(len(sizes), dtype=buffer.dtype)
    if len(sizes) == 0:
        return maxima
    kernel = _segment_max_abs_kernel(numpy.dtype(buffer.dtype))
    kernel((len(sizes),), (_SEGMENT_BLOCK,),
           (cupy.ascontiguousarray(buffer), cupy.asarray(starts), cupy.asarray(ends), maxima))
    return maxima


# -- float16 factor products --------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _max_abs_kernel():
    return backend.cupy.ReductionKernel("T x", "T y", "x < 0 ? -x : x", "a > b ? a : b",
                                        "y = a", "0", "kfac_mn_max_abs")


def max_abs(x):
    """``max(|x|)`` as a 0-d device array, without an ``|x|`` temporary (0 for an empty x)."""
    return _max_abs_kernel()(x)


def ldexp_to_float16(x, exponent):
    """``x * 2^exponent`` as float16 in one pass; ``exponent`` is a 0-d int32 device array."""
    kernel = _elementwise("ldexp_to_float16", "T x, int32 exponent", "float16 y",
                          "y = ldexp(x, exponent);", _index_type(x.size))
    return kernel(x, exponent)


def float16_gram(rows):
    """``rows^T rows`` (K, K) in float32 for C-contiguous float16 ``rows`` (M, K).

    cuBLAS ``gemmEx`` with float16 inputs, a float32 output and float32 computation (tensor
    cores where the device has them).  The row-major (M, K) array is, for column-major
    cuBLAS, the K x M matrix R = rows^T with leading dimension K, so the product is
    ``R R^T``: no transposed copy is made.
    """
    cupy = backend.cupy
    cublas = cupy.cuda.cublas
    runtime = cupy.cuda.runtime
    m, k = rows.shape
    gram = cupy.zeros((k, k), dtype=numpy.float32)
    if m == 0 or k == 0:
        return gram
    one = numpy.array(1.0, dtype=numpy.float32)   # host scalars: CuPy's handles use host
    zero = numpy.array(0.0, dtype=numpy.float32)  # pointer mode
    cublas.gemmEx(cupy.cuda.device.get_cublas_handle(), cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T,
                  k, k, m, one.ctypes.data, rows.data.ptr, runtime.CUDA_R_16F, k,
                  rows.data.ptr, runtime.CUDA_R_16F, k, zero.ctypes.data, gram.data.ptr,
                  runtime.CUDA_R_32F, k, runtime.CUDA_R_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return gram
