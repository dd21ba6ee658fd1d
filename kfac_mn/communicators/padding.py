"""Variable-count collectives on NCCL, which takes one count for every rank: the padding of
its ``native`` algorithm (every segment padded to the largest).

Pure array code (NumPy or CuPy), without MPI or NCCL, so it can be tested anywhere; used by
:class:`~kfac_mn.communicators.nccl_communicator.NcclCommunicator`.
"""

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
