"""Softmax cross-entropy, batch mean, with integer labels or soft targets (mixup).

With ``p = softmax(x)`` and the target distribution ``q`` of an example (one-hot
for an integer label, the given row for soft targets), label smoothing ``e`` uses
``q' = (1 - e) q + e / C``; the loss is ``mean_n(-sum_c q'_c log p_c)`` and its
gradient ``(p * sum_c q'_c - q') / N``.
"""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.softmax import log_softmax_array


def _check_targets(x, t):
    if x.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: x must be (N, C) logits, got shape {x.shape}")
    if t.ndim == 1:
        if t.dtype.kind not in "iu":
            raise TypeError(f"softmax_cross_entropy: labels t must be integers, got {t.dtype}")
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"softmax_cross_entropy: {t.shape[0]} labels for "
                             f"{x.shape[0]} examples")
        if t.size:
            xp = backend.get_array_module(t)
            low, high = (int(v) for v in backend.to_cpu(xp.stack([t.min(), t.max()])))
            if low < 0 or high >= x.shape[1]:
                raise ValueError(f"softmax_cross_entropy: labels must be in "
                                 f"[0, {x.shape[1]}), got values in [{low}, {high}]")
    elif t.ndim == 2:
        if t.shape != x.shape:
            raise ValueError(f"softmax_cross_entropy: soft targets t must have the shape of x "
                             f"{x.shape}, got {t.shape}")
        if t.dtype.kind != "f":
            raise TypeError(f"softmax_cross_entropy: soft targets must be floats, got {t.dtype}")
    else:
        raise ValueError(f"softmax_cross_entropy: t must be (N,) labels or (N, C) soft "
                         f"targets, got shape {t.shape}")


class SoftmaxCrossEntropy(FunctionNode):
    """Inputs ``(x, t)``: logits (N, C) and labels (N,) or soft targets (N, C).

    Not differentiable with respect to ``t``.  Keeps ``softmax`` (N, C) for backward.
    """

    def __init__(self, label_smoothing=0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("softmax_cross_entropy: label_smoothing must be in [0, 1), "
                             f"got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.softmax = None

    def forward(self, inputs):
        x, t = inputs
        _check_targets(x, t)
        xp = backend.get_array_module(x)
        self.retain_inputs((1,))
        n, c = x.shape
        log_p = log_softmax_array(x)
        keep = 1.0 - self.label_smoothing
        if t.ndim == 1:
            target_term = log_p[xp.arange(n), t].sum()
        else:
            target_term = _total_dot(t.astype(x.dtype, copy=False), log_p)
        loss = -(keep * target_term + (self.label_smoothing / c) * log_p.sum()) / n
        self.softmax = xp.exp(log_p)
        return (xp.asarray(loss, dtype=x.dtype),)

    def backward(self, indexes, grad_outputs):
        if 0 not in indexes:
            return (None,) * len(indexes)
        t, = self.get_retained_inputs()
        xp = backend.get_array_module(t)
        gloss, = grad_outputs
        p = self.softmax
        n, c = p.shape
        keep = 1.0 - self.label_smoothing
        if t.ndim == 1:
            gx = p.copy()
            gx[xp.arange(n), t] -= keep
        else:
            q = t.astype(p.dtype, copy=False)
            gx = p * (keep * q.sum(axis=1, keepdims=True) + self.label_smoothing)
            gx -= keep * q
        gx -= self.label_smoothing / c
        gx *= gloss * (1.0 / n)
        return tuple(gx if i == 0 else None for i in indexes)


def _total_dot(a, b):
    """``sum(a * b)`` over all elements."""
    xp = backend.get_array_module(a, b)
    return xp.vdot(a.ravel(), b.ravel())


def softmax_cross_entropy(x, t, label_smoothing=0.0):
    """Mean over the batch of the cross-entropy between ``softmax(x)`` and the targets ``t``.

    ``t``: integer labels (N,) or soft targets (N, C) (e.g. mixed by mixup).
    """
    return SoftmaxCrossEntropy(label_smoothing).apply((x, t))[0]
