"""Classification accuracy (not differentiable)."""
from kfac_mn import backend
from kfac_mn.variable import Variable, as_array


def accuracy(y, t, top_k=1):
    """Fraction of rows of ``y`` (N, C) whose label is among the ``top_k`` largest scores.

    ``t`` is integer labels (N,) or soft targets (N, C), whose argmax is the label.
    Returns a Variable holding a scalar of ``y``'s dtype; it has no creator.
    """
    y, t = as_array(y), as_array(t)
    if y.ndim != 2:
        raise ValueError(f"accuracy: y must be (N, C) scores, got shape {y.shape}")
    if t.ndim == 2:
        t = t.argmax(axis=1)
    if t.shape != (y.shape[0],):
        raise ValueError(f"accuracy: t must be ({y.shape[0]},) labels or {y.shape} soft "
                         f"targets, got shape {t.shape}")
    if not 1 <= top_k <= y.shape[1]:
        raise ValueError(f"accuracy: top_k must be in [1, {y.shape[1]}], got {top_k}")
    xp = backend.get_array_module(y)
    if top_k == 1:
        correct = y.argmax(axis=1) == t
    else:
        top = xp.argpartition(y, -top_k, axis=1)[:, -top_k:]
        correct = (top == t[:, None]).any(axis=1)
    return Variable(xp.asarray(correct.mean(), dtype=y.dtype), requires_grad=False)
