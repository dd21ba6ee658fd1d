"""Packing of K-FAC traffic: symmetric factors as upper triangles, buffers as scaled float16.

Both tricks are the paper's (Section "Distributed K-FAC", cost reductions): a Kronecker factor
A = (1/N) sum_n a_n a_n^T is symmetric, so only its d(d+1)/2 upper-triangle values travel; and
factors travel in half precision.  Raw factors can exceed float16's largest value (65504), and
a reduction over P ranks multiplies the largest magnitude by up to P, so a buffer is scaled by
a power of two before the cast (exact in binary floating point) and unscaled after the sum.

Expected error of :func:`to_half_scaled`, a float16 sum over P ranks and
:func:`from_half_scaled`, with u = 2^-11 (float16 unit roundoff, about 4.9e-4):

- each cast rounds an element to 11 significant bits, relative error at most u;
- the reduction rounds once per addition, so the sum of P terms has absolute error at most
  about P * u * sum_i |x_i| (relative error about P * u when the terms share a sign, as the
  diagonals of factors do);
- elements below 2^-28 * P * max|x| become float16 subnormals and keep only an absolute
  accuracy of about 2^-39 * P * max|x| (they vanish below about 2^-38 * P * max|x|).
"""
import math

import numpy

from kfac_mn import backend, cuda_kernels

FLOAT16_SUM_LIMIT = 2.0 ** 15
"""Bound for the scaled sum: half of float16's range, leaving room for rounding."""


def _check_square(matrix):
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"pack_upper_triangle: expected a square matrix, got shape "
                         f"{matrix.shape}")


def pack_upper_triangle(matrix, scale=1.0, dtype=None):
    """The d(d+1)/2 values on and above the diagonal of a d x d matrix, row by row.

    Only the upper triangle is read; for a symmetric matrix nothing is lost.  The values are
    multiplied by ``scale`` (rounded to the matrix's dtype first) and cast to ``dtype``
    (default: the matrix's) in the same pass, e.g. ``pack_upper_triangle(A, 2.0 ** -8,
    numpy.float16)`` for half-precision communication; on the GPU that is one CUDA kernel.
    """
    _check_square(matrix)
    xp = backend.get_array_module(matrix)
    dtype = matrix.dtype if dtype is None else numpy.dtype(dtype)
    d = matrix.shape[0]
    if cuda_kernels.applies(xp, matrix.dtype):
        out = xp.empty(d * (d + 1) // 2, dtype=dtype)
        return cuda_kernels.pack_upper_triangle(matrix, scale, out)
    rows, cols = xp.triu_indices(d)
    values = matrix[rows, cols]
    if scale != 1.0:
        values = values * matrix.dtype.type(scale)
    return values.astype(dtype, copy=False)


def unpack_upper_triangle(vector, d, scale=1.0, dtype=None):
    """The symmetric d x d matrix whose upper triangle is ``vector`` (see pack_upper_triangle).

    Undoes the scale and the cast of :func:`pack_upper_triangle`: the values are cast to
    ``dtype`` (default: the vector's), then divided by ``scale`` (multiplied by ``1 / scale``
    rounded to ``dtype``, exact for a power of two); on the GPU in one CUDA kernel.
    """
    expected = d * (d + 1) // 2
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(f"unpack_upper_triangle: a {d}x{d} triangle has {expected} values, "
                         f"got an array of shape {vector.shape}")
    xp = backend.get_array_module(vector)
    dtype = vector.dtype if dtype is None else numpy.dtype(dtype)
    if cuda_kernels.applies(xp, dtype):
        return cuda_kernels.unpack_upper_triangle(vector, d, 1.0 / scale, dtype)
    values = vector.astype(dtype, copy=False)
    if scale != 1.0:
        values = values * dtype.type(1.0 / scale)
    rows, cols = xp.triu_indices(d)
    matrix = xp.empty((d, d), dtype=dtype)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def half_scale(max_abs, world_size):
    """Largest power of two s with world_size * max_abs * s <= FLOAT16_SUM_LIMIT.

    Any sum over world_size ranks of values scaled by s then stays below 2^15 in magnitude
    (before rounding), far from float16's overflow at 65520.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"half_scale: world_size must be a positive int, got {world_size!r}")
    if not math.isfinite(max_abs) or max_abs < 0:
        raise ValueError(f"half_scale: the largest magnitude is {max_abs!r}; the buffer holds "
                         "inf or nan (or max_abs is negative) and cannot be scaled")
    if max_abs == 0:
        return 1.0
    _, exponent = math.frexp(FLOAT16_SUM_LIMIT / (world_size * max_abs))
    return 2.0 ** (exponent - 1)


def _max_abs(buffer):
    if buffer.size == 0:
        return 0.0
    xp = backend.get_array_module(buffer)
    return float(xp.abs(buffer).max())


def to_half_scaled(buffer, world_size, max_abs=None):
    """(float16 copy of buffer * scale, scale), scale = half_scale(max_abs, world_size).

    ``max_abs`` must be the largest magnitude over ALL ranks' buffers so that every rank picks
    the same scale (the sum of differently scaled buffers is meaningless); it defaults to this
    buffer's own, which is right only for a single rank.  :func:`to_half_scaled_across` agrees
    on it through a communicator.
    """
    xp = backend.get_array_module(buffer)
    if buffer.dtype.kind != "f":
        raise TypeError(f"to_half_scaled: expected a floating-point buffer, got {buffer.dtype}")
    local_max = _max_abs(buffer)
    if max_abs is None:
        max_abs = local_max
    elif local_max > max_abs:
        raise ValueError(f"to_half_scaled: max_abs={max_abs!r} is below this buffer's largest "
                         f"magnitude {local_max!r}; pass the maximum over all ranks")
    scale = half_scale(max_abs, world_size)
    return (buffer * scale).astype(xp.float16), scale


def agreed_max_abs(comm, buffer):
    """The largest magnitude of ``buffer`` over all ranks of ``comm`` (one value per rank)."""
    xp = backend.get_array_module(buffer)
    local = xp.asarray([_max_abs(buffer)], dtype=xp.float64)
    return float(comm.allgather_v(local, [1] * comm.size).max())


def to_half_scaled_across(comm, buffer):
    """:func:`to_half_scaled` with the scale agreed over ``comm`` (same on every rank)."""
    return to_half_scaled(buffer, comm.size, agreed_max_abs(comm, buffer))


def from_half_scaled(buffer, scale, dtype):
    """Undo :func:`to_half_scaled` after the reduction: cast to ``dtype`` and divide by scale."""
    return buffer.astype(dtype) * (1.0 / scale)
