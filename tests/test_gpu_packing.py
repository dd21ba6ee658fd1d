"""Packing of K-FAC traffic on both backends: triangles with scale and cast, segment scaling.

The ``xp`` tests check both backends against loops written from the definitions; the ``gpu``
tests check the CUDA kernels against the NumPy packing bit for bit on realistic sizes.
"""
import numpy as np
import pytest

from kfac_mn import backend
from kfac_mn.distributed import segment_scaling, triangles


def host(array):
    return backend.to_cpu(array)


def reference_pack(matrix, scale, dtype):
    """Row by row, on and above the diagonal: dtype(value * scale rounded to the matrix dtype)."""
    d = matrix.shape[0]
    scale = matrix.dtype.type(scale)
    return np.array([matrix[r, c] * scale for r in range(d) for c in range(r, d)],
                    dtype=matrix.dtype).astype(dtype)


def reference_unpack(vector, d, scale, dtype):
    dtype = np.dtype(dtype)
    inverse = dtype.type(1.0 / scale)
    matrix = np.empty((d, d), dtype=dtype)
    k = 0
    for r in range(d):
        for c in range(r, d):
            matrix[r, c] = matrix[c, r] = dtype.type(vector[k]) * inverse
            k += 1
    return matrix


def symmetric(rng, d, dtype, magnitude=1.0):
    x = rng.standard_normal((d, d + 2)) * magnitude
    return (x @ x.T).astype(dtype)


@pytest.mark.parametrize("d", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("source,target,scale", [
    (np.float32, np.float16, 2.0 ** -6), (np.float32, np.float32, 1.0),
    (np.float64, np.float32, 3.0), (np.float64, np.float64, 2.0 ** 10)])
def test_pack_and_unpack_with_scale_and_cast_match_loops(xp, d, source, target, scale):
    rng = np.random.default_rng(d)
    matrix = symmetric(rng, d, source, magnitude=30.0)
    matrix[0:1, 1:] += 0.5  # an asymmetric upper triangle: only it may be read
    packed = triangles.pack_upper_triangle(xp.asarray(matrix), scale, target)
    expected = reference_pack(matrix, scale, target)
    assert packed.dtype == np.dtype(target) and packed.shape == (d * (d + 1) // 2,)
    np.testing.assert_array_equal(host(packed), expected)
    back = triangles.unpack_upper_triangle(packed, d, scale, source)
    assert back.dtype == np.dtype(source)
    np.testing.assert_array_equal(host(back), reference_unpack(expected, d, scale, source))


def test_half_packing_of_a_factor_round_trips_within_float16_rounding(xp):
    rng = np.random.default_rng(1)
    factor = symmetric(rng, 40, np.float32, magnitude=100.0)  # entries up to ~5e5 > 65504
    scale = segment_scaling.half_scale(float(np.abs(factor).max()), world_size=1)
    half = triangles.pack_upper_triangle(xp.asarray(factor), scale, np.float16)
    assert np.all(np.isfinite(host(half)))
    back = host(triangles.unpack_upper_triangle(half, 40, scale, np.float32))
    bound = 2.0 ** -11 * np.abs(factor) + 2.0 ** -24 / scale
    assert np.all(np.abs(back - factor) <= bound)


def segment_reference(buffer, sizes, exponents, cast):
    parts, offset = [], 0
    for size, exponent in zip(sizes, exponents):
        parts.append(cast(buffer[offset:offset + size], exponent))
        offset += size
    return np.concatenate(parts)


SIZES = [3, 0, 5, 1, 0, 7]
EXPONENTS = np.array([-3, 4, 0, 8, -20, 7])  # no overflow: values stay below 2^15


def test_segment_scaling_matches_per_segment_loops(xp):
    rng = np.random.default_rng(2)
    buffer = (rng.standard_normal(sum(SIZES)) * 50).astype(np.float32)
    half = segment_scaling.to_float16(xp.asarray(buffer), SIZES, EXPONENTS)
    expected = segment_reference(buffer, SIZES, EXPONENTS, lambda part, k: (
        part * np.float32(2.0 ** k)).astype(np.float16))
    assert half.dtype == np.float16
    np.testing.assert_array_equal(host(half), expected)
    back = segment_scaling.from_float16(half, SIZES, EXPONENTS, np.float64)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(host(back), segment_reference(
        expected, SIZES, EXPONENTS, lambda part, k: part.astype(np.float64) * 2.0 ** -k))
    scaled = segment_scaling.scale_segments(xp.asarray(buffer), SIZES, EXPONENTS)
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(host(scaled), segment_reference(
        buffer, SIZES, EXPONENTS, lambda part, k: part * np.float32(2.0 ** k)))


def test_segment_max_abs_gives_zero_for_empty_segments_and_keeps_nan(xp):
    buffer = np.array([1.0, -7.5, 2.0, 3.0, -0.5, np.nan, 4.0, 9.0], dtype=np.float32)
    maxima = segment_scaling.segment_max_abs(xp.asarray(buffer), [3, 0, 2, 2, 1])
    assert isinstance(maxima, np.ndarray) and maxima.dtype == np.float64
    np.testing.assert_array_equal(maxima, [7.5, 0.0, 3.0, np.nan, 9.0])


# -- the CUDA kernels against the NumPy packing, bit for bit ----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("d", [0, 1, 2, 257, 1153])
def test_gpu_triangle_kernels_equal_numpy_packing(d):
    cupy = backend.cupy
    rng = np.random.default_rng(3)
    matrix = symmetric(rng, d, np.float32, magnitude=10.0)
    scale = segment_scaling.half_scale(float(np.abs(matrix).max()) if d else 0.0, world_size=4)
    for target, s in ((np.float16, scale), (np.float32, 1.0), (np.float64, 0.1)):
        on_cpu = triangles.pack_upper_triangle(matrix, s, target)
        on_gpu = triangles.pack_upper_triangle(cupy.asarray(matrix), s, target)
        assert isinstance(on_gpu, cupy.ndarray) and on_gpu.dtype == on_cpu.dtype
        np.testing.assert_array_equal(host(on_gpu), on_cpu)
        for dtype in (np.float32, np.float64):
            np.testing.assert_array_equal(
                host(triangles.unpack_upper_triangle(on_gpu, d, s, dtype)),
                triangles.unpack_upper_triangle(on_cpu, d, s, dtype))
    view = cupy.zeros(d * (d + 1) // 2 + 5, dtype=np.float32)[5:]  # a slice of a buffer
    from kfac_mn import cuda_kernels

    cuda_kernels.pack_upper_triangle(cupy.asarray(matrix), 1.0, view)
    np.testing.assert_array_equal(host(view), triangles.pack_upper_triangle(matrix))


@pytest.mark.gpu
def test_gpu_segment_kernels_equal_numpy_on_a_long_buffer():
    cupy = backend.cupy
    rng = np.random.default_rng(4)
    sizes = rng.integers(0, 3000, 300).tolist()
    exponents = rng.integers(-30, 30, 300)
    buffer = (rng.standard_normal(sum(sizes)) * rng.lognormal(0, 4, sum(sizes))).astype(
        np.float32)
    np.testing.assert_array_equal(segment_scaling.segment_max_abs(cupy.asarray(buffer), sizes),
                                  segment_scaling.segment_max_abs(buffer, sizes))
    half_cpu = segment_scaling.to_float16(buffer, sizes, exponents)
    half_gpu = segment_scaling.to_float16(cupy.asarray(buffer), sizes, exponents)
    np.testing.assert_array_equal(host(half_gpu), half_cpu)
    np.testing.assert_array_equal(
        host(segment_scaling.from_float16(half_gpu, sizes, exponents, np.float32)),
        segment_scaling.from_float16(half_cpu, sizes, exponents, np.float32))
