"""Batch-level augmentation: mixup and label smoothing, giving soft targets.

Written with ``xp = get_array_module(x)`` so the same functions run on NumPy batches in the
loader workers or on CuPy batches on the device.
"""
import numpy

from kfac_mn.backend import get_array_module


def one_hot(labels, n_class):
    """int labels (N,) -> float32 (N, n_class) indicator rows."""
    xp = get_array_module(labels)
    targets = xp.zeros((len(labels), n_class), dtype=xp.float32)
    targets[xp.arange(len(labels)), labels] = 1
    return targets


def mixup_lambda(rng, alpha):
    """``lambda ~ Beta(alpha, alpha)`` folded onto [1/2, 1]: ``lambda = max(lambda, 1 - lambda)``
    (Zhang et al. 2018; the fold keeps each mixed example closest to its own label)."""
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def mixup(x, targets, lam, partner):
    """Mix each example with ``partner[i]``: ``x_i <- lam x_i + (1 - lam) x_partner[i]``, and
    the soft targets the same way. ``x`` is updated in place and returned with the new
    targets; ``partner`` is an index array (a permutation of the batch)."""
    xp = get_array_module(x)
    partner = xp.asarray(partner)
    other = x[partner]
    x *= x.dtype.type(lam)
    other *= x.dtype.type(1 - lam)
    x += other
    return x, lam * targets + (1 - lam) * targets[partner]


def smooth_labels(targets, epsilon):
    """Label smoothing (Szegedy et al. 2016, sec. 7): ``q' = (1 - eps) q + eps / K``."""
    return (1 - epsilon) * targets + epsilon / targets.shape[1]


class BatchAugmentation:
    """Mixup (``mixup_alpha > 0``) then label smoothing (``label_smoothing > 0``).

    Called as ``augment(x, labels, rng)`` with float32 x (N, C, H, W) and int labels (N,);
    returns ``(x, targets)`` where targets are the int32 labels when both are off, else
    float32 (N, n_class) soft targets. One lambda and one pairing permutation per batch,
    drawn from ``rng`` in that order.
    """

    def __init__(self, n_class, mixup_alpha=0.0, label_smoothing=0.0):
        if isinstance(n_class, bool) or not isinstance(n_class, int) or n_class < 1:
            raise ValueError(f"n_class must be a positive integer, got {n_class!r}")
        if mixup_alpha < 0:
            raise ValueError(f"mixup alpha must be >= 0 (0 disables it), got {mixup_alpha}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.n_class = n_class
        self.mixup_alpha = float(mixup_alpha)
        self.label_smoothing = float(label_smoothing)

    @property
    def soft_targets(self):
        return self.mixup_alpha > 0 or self.label_smoothing > 0

    def __call__(self, x, labels, rng):
        if not self.soft_targets:
            return x, labels.astype(numpy.int32, copy=False)
        targets = one_hot(labels, self.n_class)
        if self.mixup_alpha > 0:
            lam = mixup_lambda(rng, self.mixup_alpha)
            x, targets = mixup(x, targets, lam, rng.permutation(len(labels)))
        if self.label_smoothing > 0:
            targets = smooth_labels(targets, self.label_smoothing)
        return x, targets.astype(numpy.float32, copy=False)
