"""Mixup and label smoothing: lambda distribution and the mixing arithmetic."""
import numpy
import pytest
from scipy import special, stats

from utils.data.batch_augmentation import (
    BatchAugmentation,
    mixup,
    mixup_lambda,
    one_hot,
    smooth_labels,
)


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mixup_lambda_follows_the_folded_beta(alpha):
    """lambda = max(L, 1 - L) with L ~ Beta(a, a): P(lambda <= m) = 2 I_m(a, a) - 1."""
    rng = numpy.random.default_rng(0)
    lams = numpy.array([mixup_lambda(rng, alpha) for _ in range(4000)])
    assert lams.min() >= 0.5 and lams.max() <= 1.0
    folded_cdf = lambda m: 2 * special.betainc(alpha, alpha, m) - 1  # noqa: E731
    assert stats.kstest(lams, folded_cdf).pvalue > 1e-3
    # The unfolded Beta(a, a) is clearly rejected: the fold matters.
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue < 1e-6


def test_mixup_is_the_convex_combination_with_the_partner():
    rng = numpy.random.default_rng(1)
    x = rng.standard_normal((6, 3, 4, 4)).astype(numpy.float32)
    labels = numpy.array([0, 1, 2, 3, 4, 0])
    partner = numpy.array([5, 4, 3, 2, 1, 0])
    expected_x = 0.7 * x + 0.3 * x[partner]
    mixed, targets = mixup(x.copy(), one_hot(labels, 5), 0.7, partner)
    numpy.testing.assert_allclose(mixed, expected_x, rtol=1e-6, atol=1e-6)
    assert targets[1, 1] == pytest.approx(0.7) and targets[1, 4] == pytest.approx(0.3)
    assert targets[0, 0] == pytest.approx(1.0)  # partner has the same class
    numpy.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-6)


def test_label_smoothing_values():
    targets = smooth_labels(one_hot(numpy.array([2, 0]), 4), 0.1)
    numpy.testing.assert_allclose(targets[0], [0.025, 0.025, 0.925, 0.025], rtol=1e-6)
    numpy.testing.assert_allclose(targets.sum(axis=1), 1, rtol=1e-6)


def test_batch_augmentation_modes():
    x = numpy.random.default_rng(2).standard_normal((8, 3, 5, 5)).astype(numpy.float32)
    labels = numpy.arange(8) % 3
    plain_x, plain_t = BatchAugmentation(3)(x.copy(), labels, numpy.random.default_rng(0))
    assert plain_t.dtype == numpy.int32 and numpy.array_equal(plain_x, x)
    mixed_x, soft = BatchAugmentation(3, mixup_alpha=0.4, label_smoothing=0.1)(
        x.copy(), labels, numpy.random.default_rng(0))
    assert soft.dtype == numpy.float32 and soft.shape == (8, 3)
    numpy.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-6)
    assert soft.min() >= 0.1 / 3 - 1e-6
    # Each mixed example is lam * itself + (1 - lam) * one partner, lam >= 1/2.
    rng = numpy.random.default_rng(0)
    lam = mixup_lambda(rng, 0.4)
    partner = rng.permutation(8)
    numpy.testing.assert_allclose(mixed_x, lam * x + (1 - lam) * x[partner], atol=1e-5)


def test_bad_batch_augmentation_parameters_are_named():
    with pytest.raises(ValueError, match="n_class must be a positive integer"):
        BatchAugmentation(0)
    with pytest.raises(ValueError, match="mixup alpha must be >= 0"):
        BatchAugmentation(10, mixup_alpha=-1)
    with pytest.raises(ValueError, match=r"label smoothing must be in \[0, 1\)"):
        BatchAugmentation(10, label_smoothing=1.0)
