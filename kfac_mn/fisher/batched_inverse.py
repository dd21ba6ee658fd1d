"""Damped inverses of many factors at once: factors of equal size inverted as one batch.

A refresh of ResNet-50 inverts 108 factors of a few dozen sizes (64, 128, 256, 576, 1152,
2304, 4608, ...).  One at a time, each inversion on the GPU pays its kernel launches and two
host synchronisations (the Cholesky's success, the result's finiteness), which dominate for
the small factors.  Here the factors are grouped by (side, dtype) and each group is one
batched Cholesky (cuSOLVER's ``potrfBatched`` through ``xp.linalg.cholesky``), one batched
inverse of the triangular factors and one batched product ``L^{-T} L^{-1}``, checked once.

The result is that of :func:`~kfac_mn.fisher.inverse.damped_inverse` for every factor
(docs/SPEC.md, section 3): a group whose Cholesky fails or whose inverses are not finite is
redone factor by factor with :func:`damped_inverse`, which retries in float64 and with more
damping and counts each fallback.  Only that group pays; the other groups keep their batch.
"""
import collections

from kfac_mn import backend
from kfac_mn.fisher.inverse import damped_inverse

#: one matrix to invert: ``(matrix + damping I)^{-1}`` is stored as ``block.inverses[name]``
InverseRequest = collections.namedtuple("InverseRequest", "name matrix damping label")


def batching_plan(requests):
    """Indices of ``requests`` grouped for batching: one group per (side, dtype), in the
    order of each group's first request; the factors of a group are inverted as one batch
    (a group of one is a batch of one)."""
    groups = {}
    for index, request in enumerate(requests):
        key = (request.matrix.shape[0], request.matrix.dtype.str)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _batched_cholesky_inverse(stack):
    """``stack[i]^{-1}`` for a (b, d, d) stack of symmetric matrices, or None when one is
    not positive definite or an inverse is not finite (one synchronisation per check)."""
    xp = backend.get_array_module(stack)
    try:
        if xp is backend.numpy:
            chol = xp.linalg.cholesky(stack)
        else:  # CuPy fills NaN instead of raising unless told to raise
            with backend.cupyx.errstate(linalg="raise"):
                chol = xp.linalg.cholesky(stack)
    except Exception:  # LinAlgError of NumPy or CuPy: some matrix is not PD
        return None
    chol_inv = xp.linalg.inv(chol)
    inverse = xp.matmul(chol_inv.transpose(0, 2, 1), chol_inv)
    if not bool(xp.isfinite(inverse).all()):
        return None
    return inverse


def batched_damped_inverses(requests, dtype, counter=None):
    """``[(r.matrix + r.damping I)^{-1} for r in requests]`` as ``dtype``, a batch per
    group of :func:`batching_plan`; a failing group falls back to :func:`damped_inverse`
    per factor.  The matrices themselves are never modified."""
    if not requests:
        return []
    xp = backend.get_array_module(requests[0].matrix)
    dtype = xp.dtype(dtype)
    inverses = [None] * len(requests)
    for group in batching_plan(requests):
        side = requests[group[0]].matrix.shape[0]
        stack = xp.stack([requests[i].matrix for i in group]).astype(dtype, copy=False)
        dampings = xp.asarray([requests[i].damping for i in group], dtype=dtype)
        diagonal = xp.arange(side)
        stack[:, diagonal, diagonal] += dampings[:, None]
        batch = _batched_cholesky_inverse(stack)
        for position, index in enumerate(group):
            request = requests[index]
            inverses[index] = batch[position] if batch is not None else damped_inverse(
                request.matrix, request.damping, dtype, request.label, counter)
    return inverses
