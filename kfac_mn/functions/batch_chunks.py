"""Cache-sized slices of the batch axis, for multi-pass work on the CPU.

NumPy runs each operation as its own pass over memory.  Running a sequence of
passes on one block of examples at a time keeps that block in the CPU cache
between them, so main memory is crossed once instead of once per pass.  On the
GPU (CuPy) one large launch per pass is best: the whole batch is one block.
"""
import numpy

CACHE_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32: well inside L2 + L3 of any current CPU


def batch_chunks(xp, batch, per_example, budget=None):
    """Slices covering ``range(batch)`` of about ``budget`` elements each (default
    ``CACHE_BLOCK_ELEMENTS``), at least one example each."""
    if xp is not numpy:
        return (slice(0, batch),)
    if budget is None:
        budget = CACHE_BLOCK_ELEMENTS
    step = max(1, budget // max(per_example, 1))
    return tuple(slice(i, min(i + step, batch)) for i in range(0, batch, step))
