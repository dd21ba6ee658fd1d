"""Variable-count collectives: the algorithms, their exact traffic and their alpha-beta time.

With one owner per layer the segments of distributed K-FAC's ReduceScatterV and AllGatherV
are very uneven (ResNet-50's largest is the res5 3x3 layer, A of 4608 x 4608).  Three ways to
run them (``ALGORITHMS``), over a buffer of B bytes cut into segments s_0 .. s_{P-1}:

* ``native``: the library's own V collective (MPI_Reduce_scatter, MPI_Allgatherv).  A ring
  (or pairwise exchange) is paced by the largest segment at each of its P-1 steps:
  (P-1) (alpha + max_i s_i / beta).
* ``allreduce``: the authors' stand-in: all-reduce the whole buffer and keep one's segment
  (for AllGatherV: every rank places its segment in a zero buffer first):
  2 (P-1) (alpha + B / P / beta).
* ``two_phase``: equal chunks, then a redistribution (the standard construction when only
  equal-count collectives are fast; Thakur, Rabenseifner and Gropp 2005 for their costs).
  The buffer is padded to P k values, k = ceil(n / P); chunk r is values [r k, (r+1) k).
  ReduceScatterV = the library's equal-count reduce-scatter of the chunks
  (MPI_Reduce_scatter_block, ncclReduceScatter; rank r ends with the sum of chunk r), then
  every chunk holder sends each owner the part of its chunk that overlaps the owner's segment
  (:func:`exchange_plan`: one MPI_Alltoallv, or grouped ncclSend / ncclRecv).  AllGatherV is
  the mirror: every owner sends each chunk holder the part of its segment that falls in that
  chunk, then an equal-count all-gather (MPI_Allgather, ncclAllGather).  Per rank about
  (P-1)/P B + s_max bytes instead of (P-1) s_max or 2 B: two library calls,
  (P-1) (alpha + k / beta) + max over ranks (messages alpha + bytes / beta).

:func:`traffic` gives what one rank sends and receives (bytes and messages) in each: for
``two_phase`` the equal-count phase as a ring moves it ((P-1) chunks each way; recursive
halving or doubling moves the same bytes in fewer messages) and the redistribution exactly as
posted; for the other two the ring model of the library's algorithm
(:mod:`kfac_mn.communicators.traffic`).  :func:`seconds` is the slowest rank's time under the
alpha-beta model, with ``call_overhead`` per library call; :func:`choose` is ``auto``: the
cheapest, ties to ``native``.  The cost model (:mod:`kfac_mn.cost_model.stage_costs`) uses the
same functions.
"""
import dataclasses
import functools

from kfac_mn.communicators import traffic as ring

ALGORITHMS = ("native", "two_phase", "allreduce")
CHOICES = ALGORITHMS + ("auto",)
OPERATIONS = ("reduce_scatter_v", "allgather_v")


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one rank moves in one call: bytes and messages, each way."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0

    def __add__(self, other):
        return Traffic(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))


def chunk_length(total, size):
    """k: the values of each equal chunk (the buffer padded to ``size * k``)."""
    return -(-total // size)


def pieces(counts):
    """The overlaps of chunks and segments, in buffer order: ``(chunk r, segment q, length,
    offset in chunk r, offset in segment q)``, at most 2 P of them."""
    size = len(counts)
    k = chunk_length(sum(counts), size)
    found, position = [], 0
    for q, count in enumerate(counts):
        start, end = position, position + count
        while start < end:
            r = start // k
            stop = min(end, (r + 1) * k)
            found.append((r, q, stop - start, start - r * k, start - position))
            start = stop
        position = end
    return found


@functools.lru_cache(maxsize=256)
def _exchange_plan(counts, rank, to_owners):
    sends, receives, local = [], [], []
    for r, q, length, in_chunk, in_segment in pieces(counts):
        source, target = (r, q) if to_owners else (q, r)
        offsets = (in_chunk, in_segment) if to_owners else (in_segment, in_chunk)
        if source == rank == target:
            local.append((rank, *offsets, length))
        elif source == rank:
            sends.append((target, *offsets, length))
        elif target == rank:
            receives.append((source, *offsets, length))
    return tuple(sends), tuple(receives), tuple(local)


def exchange_plan(counts, rank, to_owners):
    """What ``rank`` does in the redistribution, as ``(sends, receives, local)`` lists of
    ``(peer, source offset, target offset, length)``: chunk holders send owners the pieces of
    their segments (``to_owners``, ReduceScatterV: source = the holder's chunk, target = the
    owner's segment) or owners send chunk holders (AllGatherV: the reverse); a rank's piece
    of its own chunk is copied locally.  Every communicator runs this one plan.  Plans are
    cached: a step's counts repeat (at 1,024 ranks a plan takes about 0.4 ms of Python)."""
    sends, receives, local = _exchange_plan(tuple(int(c) for c in counts), int(rank),
                                            bool(to_owners))
    return list(sends), list(receives), list(local)


def exchange_traffic(counts, itemsize, to_owners):
    """:class:`Traffic` of every rank in the redistribution of :func:`exchange_plan` (one
    pass over the pieces)."""
    sent, received = [0] * len(counts), [0] * len(counts)
    messages_sent, messages_received = [0] * len(counts), [0] * len(counts)
    for r, q, length, _, _ in pieces(counts):
        source, target = (r, q) if to_owners else (q, r)
        if source != target:
            sent[source] += length * itemsize
            messages_sent[source] += 1
            received[target] += length * itemsize
            messages_received[target] += 1
    return [Traffic(*values) for values in zip(sent, received, messages_sent,
                                                 messages_received)]


def equal_chunks_traffic(total, size, itemsize):
    """:class:`Traffic` of ``two_phase``'s equal-count phase over ``total`` values: (P-1)
    chunks each way, as a ring or pairwise exchange moves them (recursive halving or doubling
    moves the same bytes in fewer messages)."""
    k = chunk_length(total, size)
    steps = size - 1 if k else 0
    return Traffic(steps * k * itemsize, steps * k * itemsize, steps, steps)


def traffic(algorithm, operation, counts, itemsize, rank):
    """:class:`Traffic` of ``rank`` in one call of ``operation`` with ``counts``."""
    counts = [int(c) for c in counts]
    size = len(counts)
    if size == 1:
        return Traffic()
    if algorithm == "two_phase":
        # reduce-scatter: ring, then chunk holders -> owners; all-gather: owners -> chunk
        # holders, then ring
        return equal_chunks_traffic(sum(counts), size, itemsize) + exchange_traffic(
            counts, itemsize, to_owners=operation == "reduce_scatter_v")[rank]
    segment_bytes = [c * itemsize for c in counts]
    if algorithm == "native":
        if operation == "reduce_scatter_v":
            sent, received = ring.ring_reduce_scatter_bytes(segment_bytes, rank)
        else:
            sent, received = ring.ring_allgather_bytes(segment_bytes, rank)
        return Traffic(sent, received, size - 1, size - 1)
    if algorithm == "allreduce":
        sent, received = ring.ring_allreduce_bytes(sum(counts), itemsize, size, rank)
        return Traffic(sent, received, 2 * (size - 1), 2 * (size - 1))
    raise ValueError(f"unknown variable-count algorithm {algorithm!r}; valid: "
                     f"{', '.join(ALGORITHMS)}")


def seconds(algorithm, operation, counts, itemsize, alpha, bandwidth, call_overhead=0.0):
    """Alpha-beta time of the slowest rank (see the module docstring)."""
    counts = [int(c) for c in counts]
    size = len(counts)
    if size == 1:
        return 0.0
    total = sum(counts)
    if algorithm == "native":
        steps = (size - 1) * (alpha + max(counts) * itemsize / bandwidth)
    elif algorithm == "allreduce":
        steps = 2 * (size - 1) * (alpha + total * itemsize / size / bandwidth)
    elif algorithm == "two_phase":  # two library calls: equal chunks and the redistribution
        k = chunk_length(total, size)
        steps = call_overhead + (size - 1) * (alpha + k * itemsize / bandwidth) if k else 0.0
        steps += max(max(moved.messages_sent, moved.messages_received) * alpha
                     + max(moved.bytes_sent, moved.bytes_received) / bandwidth
                     for moved in exchange_traffic(counts, itemsize,
                                                   operation == "reduce_scatter_v"))
    else:
        raise ValueError(f"unknown variable-count algorithm {algorithm!r}; valid: "
                         f"{', '.join(ALGORITHMS)}")
    return call_overhead + steps


def choose(operation, counts, itemsize, alpha, bandwidth, allowed=ALGORITHMS):
    """``auto``: the algorithm of ``allowed`` with the least :func:`seconds` (ties: the
    earlier in ``allowed``).  It depends only on values every rank shares, so every rank
    picks the same one."""
    return min(allowed, key=lambda name: (
        seconds(name, operation, counts, itemsize, alpha, bandwidth), allowed.index(name)))
