"""float16 communication that cannot overflow: one power-of-two scale per segment.

A packed K-FAC buffer mixes tensors of very different magnitudes (statistic sums over
thousands of patches next to gradients of 1e-3), so one scale for the whole buffer would push
the small ones into float16's subnormals.  Each segment ``i`` therefore gets its own scale
``2^k_i`` with ``k_i = log2(half_scale(bound_i, world_size))`` (see
:func:`half_scale`): a sum over ``world_size`` ranks of values
bounded by ``bound_i`` stays below 2^15 after scaling, half of float16's range.  Powers of two
scale exactly; unscaling after the collective divides by the same power.

Exponents are clamped to [-MAX_EXPONENT, MAX_EXPONENT] so that ``2^k`` is a normal number even
in float32 (the product is formed in the buffer's dtype).  Clamping from above only shrinks a
scale (still safe); a bound so large that even ``2^-MAX_EXPONENT`` overflows is an error, and so
is a bound that is inf or nan.  The exponents are small integers, exact in any float dtype, so
they can travel inside a float16 buffer.

Expected error of :func:`to_float16`, a float16 sum over P ranks and
:func:`from_float16`, with u = 2^-11 (float16 unit roundoff, about 4.9e-4):

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

MAX_EXPONENT = 100


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


def segment_max_abs(buffer, sizes):
    """Largest magnitude in each consecutive segment of ``buffer`` (float64 NumPy array).

    Computed on the buffer's device (one CUDA kernel on the GPU) and copied to the host once.
    """
    xp = backend.get_array_module(buffer)
    if cuda_kernels.applies(xp, buffer.dtype):
        maxima = cuda_kernels.segment_max_abs(buffer, [int(size) for size in sizes])
        return backend.to_cpu(maxima).astype(numpy.float64)
    maxima, offset = [], 0
    for size in sizes:
        part = buffer[offset:offset + size]
        offset += size
        maxima.append(xp.abs(part).max() if size else xp.zeros((), dtype=buffer.dtype))
    if not maxima:
        return numpy.zeros(0)
    return backend.to_cpu(xp.stack(maxima)).astype(numpy.float64)


def scale_exponents(bounds, world_size, labels):
    """k_i with ``world_size * bounds[i] * 2^k_i <= 2^15`` (int64 NumPy array).

    ``labels`` name the segments in the errors.
    """
    exponents = numpy.zeros(len(bounds), dtype=numpy.int64)
    for i, bound in enumerate(bounds):
        if not math.isfinite(bound):
            raise FloatingPointError(
                f"float16 communication: {labels[i]} holds inf or nan (largest magnitude "
                f"{bound!r}); the step cannot be communicated")
        k = int(math.log2(half_scale(float(bound), world_size)))
        if k < -MAX_EXPONENT:
            raise OverflowError(
                f"float16 communication: {labels[i]} has magnitude {bound:.3g}, beyond "
                f"{FLOAT16_SUM_LIMIT * 2.0 ** MAX_EXPONENT / world_size:.3g}, the largest "
                f"that {world_size} ranks can sum in float16")
        exponents[i] = min(k, MAX_EXPONENT)
    return exponents


def _powers(exponents):
    return 2.0 ** numpy.asarray(exponents, dtype=numpy.float64)  # exact for integers


def scale_segments(buffer, sizes, exponents):
    """``buffer`` with segment i multiplied by ``2^exponents[i]`` (same dtype, new array)."""
    xp = backend.get_array_module(buffer)
    sizes = [int(size) for size in sizes]
    if cuda_kernels.applies(xp, buffer.dtype):
        return cuda_kernels.scale_segments(buffer, sizes, _powers(exponents), buffer.dtype,
                                           buffer.dtype)
    factors = xp.asarray(_powers(exponents), dtype=buffer.dtype)
    return buffer * xp.repeat(factors, sizes)


def to_float16(buffer, sizes, exponents):
    """Scale each segment and cast to float16 (on the GPU: one CUDA kernel)."""
    xp = backend.get_array_module(buffer)
    if cuda_kernels.applies(xp, buffer.dtype):
        return cuda_kernels.scale_segments(buffer, [int(size) for size in sizes],
                                           _powers(exponents), buffer.dtype, numpy.float16)
    return scale_segments(buffer, sizes, exponents).astype(xp.float16)


def from_float16(buffer, sizes, exponents, dtype):
    """Undo :func:`to_float16` (after a sum or a gather): cast to ``dtype``, then unscale
    (on the GPU: one CUDA kernel)."""
    xp = backend.get_array_module(buffer)
    unscale = -numpy.asarray(exponents)
    if cuda_kernels.applies(xp, dtype):
        return cuda_kernels.scale_segments(buffer, [int(size) for size in sizes],
                                           _powers(unscale), dtype, dtype)
    return scale_segments(buffer.astype(dtype), sizes, unscale)


def encode(buffer, sizes, exponents, comm_dtype):
    """``buffer`` as it travels: with ``exponents`` (float16 communication) each segment
    scaled and cast (:func:`to_float16`); without, cast to ``comm_dtype``."""
    if exponents is None:
        return buffer.astype(comm_dtype, copy=False)
    return to_float16(buffer, sizes, exponents)


def decode(buffer, sizes, exponents, dtype):
    """Undo :func:`encode` after the collective, to ``dtype``."""
    if exponents is None:
        return buffer.astype(dtype, copy=False)
    return from_float16(buffer, sizes, exponents, dtype)
