"""Variable-count collectives on NCCL, which takes one count for every rank: plan and padding.

Pure array code (NumPy or CuPy), without MPI or NCCL, so it can be tested anywhere; used by
:class:`~kfac_mn.communicators.nccl_communicator.NcclCommunicator`.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class VariableCountPlan:
    """How a variable-count collective runs on NCCL.

    ``method`` is 'padded' (every segment padded to ``width`` elements, one NCCL
    reduce-scatter or all-gather) or 'allreduce' (one NCCL all-reduce of the whole buffer).
    """

    method: str
    width: int


def plan_variable_counts(counts):
    """Padded segments when they move no more bytes than an all-reduce, else an all-reduce.

    Per rank and direction, a ring reduce-scatter or all-gather of P segments of ``width``
    elements moves (P-1) width elements, a ring all-reduce of B = sum(counts) elements
    2 (P-1)/P B: padding wins iff P * width <= 2 B (always for one rank).
    """
    counts = [int(count) for count in counts]
    width = max(counts, default=0)
    if len(counts) * width <= 2 * sum(counts):
        return VariableCountPlan("padded", width)
    return VariableCountPlan("allreduce", width)


def pad_segments(xp, buffer, counts, width):
    """``(len(counts) * width,)`` array: segment i of ``buffer`` at ``i * width``, zeros after."""
    padded = xp.zeros(len(counts) * width, dtype=buffer.dtype)
    offset = 0
    for index, count in enumerate(counts):
        padded[index * width:index * width + count] = buffer[offset:offset + count]
        offset += count
    return padded


def unpad_segments(xp, padded, counts, width):
    """Undo :func:`pad_segments`: the first ``counts[i]`` elements of each ``width`` block."""
    parts = [padded[index * width:index * width + count] for index, count in enumerate(counts)]
    return xp.concatenate([xp.zeros(0, dtype=padded.dtype)] + parts)
