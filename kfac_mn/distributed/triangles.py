"""Symmetric factors travel as their upper triangles (the paper's Section "Distributed
K-FAC", cost reductions): A = (1/N) sum_n a_n a_n^T is symmetric, so only its d(d+1)/2 values
on and above the diagonal are packed into a communication buffer, and the whole matrix is
rebuilt from them after the collective.
"""
import numpy

from kfac_mn import backend, cuda_kernels


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
