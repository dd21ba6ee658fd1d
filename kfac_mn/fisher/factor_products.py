"""The Gram products behind the Kronecker factors (A ~ a^T a, G ~ g^T g), in a chosen precision.

``factor_dtype`` (KFAC's argument of that name) is the precision of the inputs of these
products:

* ``None`` (the default): the data's own dtype, ``rows.T @ rows``.
* ``float16``: the paper's tensor-core path ("half precision for computing factors").  Each
  input is scaled by a power of two ``2^k`` chosen on the device from its largest magnitude,
  so that ``max|x| 2^k`` lies in [2^14, 2^15) (no overflow, nothing flushed to zero that
  matters), rounded to float16, multiplied with float32 accumulation, and the result is
  unscaled by ``2^-2k`` (exact).  On the GPU the product is cuBLAS ``gemmEx`` with float16
  inputs and a float32 output (:func:`kfac_mn.cuda_kernels.float16_gram`), because
  ``cupy.matmul`` of float16 arrays returns float16, whose range (65504) a sum over
  thousands of patches exceeds.  On the CPU the float16 values are multiplied by a float32
  GEMM, which is the same arithmetic: a product of two float16 numbers (11 significant bits
  each) is exact in float32.
* ``float32`` / ``float64``: cast, multiply in that dtype, cast back.

The result always has the dtype of ``rows``.  Error of the float16 path, with u = 2^-11
(float16's unit roundoff): each input is rounded with relative error at most u (absolute
error at most 2^-39 max|x| for elements below 2^-28 max|x|, float16's subnormals), so each
product a_mi a_mj carries a relative error of at most 2u + u^2 and, by Cauchy-Schwarz,

    |A16_ij - A_ij| <= (2^-10 + 2^-22) sqrt(A_ii A_jj)  (+ float32 accumulation error),

a bound relative to the diagonal: 0.1 % of the entry's natural scale.  A NaN or inf input is
not caught here (the largest magnitude then gives no useful scale): it reaches the factor and
the inversion, which reports the layer (:mod:`kfac_mn.fisher.inverse`).
"""
import numpy

from kfac_mn import backend, cuda_kernels

FACTOR_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
                 numpy.dtype(numpy.float64))

#: the scaled largest magnitude lies in [2^(TOP_EXPONENT - 1), 2^TOP_EXPONENT)
TOP_EXPONENT = 15


def check_factor_dtype(factor_dtype, owner):
    """``None`` or the numpy dtype of ``factor_dtype``; a clear error naming ``owner`` else."""
    if factor_dtype is None:
        return None
    try:
        dtype = numpy.dtype(factor_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype not in FACTOR_DTYPES:  # (numpy compares None as float64)
        raise ValueError(f"{owner} factor_dtype must be None, 'float16', 'float32' or "
                         f"'float64', not {factor_dtype!r}")
    return dtype


def gram(rows, factor_dtype=None):
    """``rows.T @ rows`` for ``rows`` (M, K), computed in ``factor_dtype`` (see module doc)."""
    if factor_dtype is None or numpy.dtype(factor_dtype) == rows.dtype:
        return rows.T @ rows
    factor_dtype = numpy.dtype(factor_dtype)
    if factor_dtype == numpy.float16:
        return float16_gram(rows).astype(rows.dtype, copy=False)
    cast = rows.astype(factor_dtype)
    return (cast.T @ cast).astype(rows.dtype)


def _scale_exponent(xp, rows):
    """k (a 0-d int32 array on the rows' device) with max|rows| 2^k in [2^14, 2^15)."""
    if xp is backend.numpy:
        largest = xp.abs(rows).max() if rows.size else rows.dtype.type(0)
    else:
        largest = cuda_kernels.max_abs(rows)
    _, exponent = xp.frexp(largest)  # largest = m 2^exponent, m in [0.5, 1); 0 for 0
    return xp.asarray(TOP_EXPONENT - exponent, dtype=xp.int32)


def float16_gram(rows):
    """``rows.T @ rows`` from float16-rounded, power-of-two-scaled inputs, float32 accumulation.

    Returns float32.  No value leaves the device: the scale is chosen and undone there, by
    ``ldexp``, which never forms 2^k itself (so no intermediate overflow or underflow).
    """
    xp = backend.get_array_module(rows)
    k = _scale_exponent(xp, rows)
    if xp is backend.numpy:
        scaled = xp.ldexp(rows, k).astype(xp.float16).astype(xp.float32)
        product = scaled.T @ scaled
    else:
        half = cuda_kernels.ldexp_to_float16(xp.ascontiguousarray(rows), k)
        product = cuda_kernels.float16_gram(half)
    return xp.ldexp(product, -2 * k)
