"""Half-precision factor products (``factor_dtype='float16'``) on both backends.

The stated bound (kfac_mn/fisher/factor_products.py): with float16 inputs and float32
accumulation, |A16_ij - A_ij| <= (2^-10 + 2^-22) sqrt(A_ii A_jj) plus the float32
accumulation error, which for the sizes here stays below 2^-16 sqrt(A_ii A_jj).
"""
import numpy as np
import pytest

from kfac_mn import backend
from kfac_mn import functions as F
from kfac_mn.fisher.factor_products import check_factor_dtype, gram
from kfac_mn.optimizers import KFAC, DistributedKFAC
from tests.kfac_models import ConvNet
from tests.test_distributed_kfac import NoCollectives

BOUND = 2.0 ** -10 + 2.0 ** -16


def host(array):
    return backend.to_cpu(array)


def assert_within_diagonal_bound(actual, exact, bound=BOUND):
    diagonal = np.sqrt(np.abs(np.diag(exact)))
    limit = bound * np.outer(diagonal, diagonal)
    excess = np.abs(actual - exact) - limit
    assert excess.max() <= 0, f"worst excess {excess.max():.3g} at {np.argmax(excess)}"


@pytest.mark.parametrize("magnitude", [1e-7, 1.0, 3e3])
def test_float16_gram_is_within_the_stated_bound_at_any_magnitude(xp, magnitude):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((256, 40)) * rng.lognormal(0, 1.5, 40)  # columns of mixed size
    rows = (rows * magnitude).astype(np.float32)
    result = gram(xp.asarray(rows), "float16")
    assert result.dtype == np.float32
    exact = rows.astype(np.float64).T @ rows.astype(np.float64)
    assert_within_diagonal_bound(host(result).astype(np.float64), exact)
    # plain float16 products would overflow here (entries up to ~1e9) or underflow (~1e-12)
    assert np.all(np.isfinite(host(result)))


def test_float16_gram_of_zeros_and_of_no_rows(xp):
    np.testing.assert_array_equal(host(gram(xp.zeros((5, 3), np.float32), "float16")),
                                  np.zeros((3, 3)))
    np.testing.assert_array_equal(host(gram(xp.zeros((0, 3), np.float32), "float16")),
                                  np.zeros((3, 3)))


def test_other_factor_dtypes_cast_multiply_and_cast_back(xp):
    rows = np.random.default_rng(1).standard_normal((30, 6))
    result = gram(xp.asarray(rows), "float32")
    assert result.dtype == np.float64
    cast = rows.astype(np.float32)
    np.testing.assert_allclose(host(result), cast.T @ cast, rtol=1e-6)
    np.testing.assert_array_equal(host(gram(xp.asarray(rows))), rows.T @ rows)


def kfac_factors(xp, factor_dtype):
    rng = np.random.default_rng(2)
    np.random.seed(3)
    model = ConvNet(in_channels=3, out_channels=8, size=9)
    x = rng.standard_normal((16, 3, 9, 9)).astype(np.float32)
    t = rng.integers(0, 5, 16).astype(np.int32)
    if xp is not np:
        model.to_gpu()
    optimizer = KFAC(lr=0.0, momentum=0.0, factor_dtype=factor_dtype)
    optimizer.setup(model)
    optimizer.update(lambda a, b: F.softmax_cross_entropy(model(a), b), xp.asarray(x),
                     xp.asarray(t))
    return {(path, name): host(value) for path, block in optimizer.fisher_blocks.items()
            for name, value in block.factors.items()}


def test_kfac_float16_factors_agree_with_float32_factors_within_the_bound(xp):
    half, single = kfac_factors(xp, "float16"), kfac_factors(xp, None)
    assert sorted(half) == [("/conv", "A"), ("/conv", "G"), ("/fc", "A"), ("/fc", "G")]
    for key, value in half.items():
        assert value.dtype == np.float32, key
        # float32 factors carry their own (much smaller) rounding: allow 2^-14 more
        assert_within_diagonal_bound(value.astype(np.float64),
                                     single[key].astype(np.float64), BOUND + 2.0 ** -14)
        relative = np.linalg.norm(value - single[key]) / np.linalg.norm(single[key])
        assert 0 < relative < 2.0 ** -10, (key, relative)


def test_factor_dtype_is_checked_with_a_clear_message():
    assert check_factor_dtype(None, "KFAC") is None
    assert check_factor_dtype("float16", "KFAC") == np.float16
    with pytest.raises(ValueError, match=r"KFAC factor_dtype must be None, 'float16', "
                                         r"'float32' or 'float64', not 'int8'"):
        KFAC(factor_dtype="int8")
    with pytest.raises(ValueError, match=r"factor_dtype must be .* not 'half-ish'"):
        KFAC(factor_dtype="half-ish")
    with pytest.raises(ValueError, match=r"KFAC factor_dtype must be .* not 'int8'"):
        DistributedKFAC(NoCollectives(), factor_dtype="int8")
    assert DistributedKFAC(NoCollectives(), factor_dtype="float16").factor_dtype == np.float16
