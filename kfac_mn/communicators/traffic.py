"""Byte accounting of collectives under the standard ring (and chain) algorithm model, and the
per-rank traffic log.  (Variable-count collectives whose algorithm we run ourselves are
counted exactly instead: :mod:`kfac_mn.communicators.v_collectives`.)

The numbers are what one rank would send and receive if each collective ran the textbook
algorithm on a ring of P ranks (rank r sends to r+1 and receives from r-1, indices mod P).
They describe the algorithm, not what a particular MPI library chose to do on this call; they
are the figures to compare layouts, precisions and intervals with.  Every size is in bytes.

Notation: segment s_i is the payload that ends up owned by rank i (for ReduceScatterV the
summed slice rank i receives; for AllGatherV the slice rank i contributes); B = sum_i s_i.

- Ring reduce-scatter (Figure 1 of the paper, step 2).  In step k = 0 .. P-2 rank r sends the
  partial sum of segment (r-k-1) to r+1 and receives segment (r-k-2) from r-1, adding its own
  contribution; after P-1 steps it holds the full sum of segment r.  Rank r therefore sends
  every segment but its own and receives every segment but that of r-1:
  sent = B - s_r, received = B - s_{r-1}.  Equal segments give (P-1)/P * B each way.
- Ring all-gather (Figure 1, step 4).  In step k rank r forwards segment (r-k) to r+1 and
  receives segment (r-k-1) from r-1: sent = B - s_{r+1}, received = B - s_r.
- Ring all-reduce = ring reduce-scatter then ring all-gather of the same buffer, cut into P
  segments as numpy.array_split cuts it: sent = (B - s_r) + (B - s_{r+1}),
  received = (B - s_{r-1}) + (B - s_r); equal segments give 2 (P-1)/P * B each way.
- Chain broadcast from root (root -> root+1 -> ... -> root-1): every rank but the last in the
  chain sends B, every rank but the root receives B.
- Direct gather to root: each other rank sends its own payload once; the root receives the sum
  of the others' payloads and sends nothing.
- Barrier: no payload.

With P = 1 every formula gives zero.
"""
import dataclasses


def ring_reduce_scatter_bytes(segment_bytes, rank):
    """(sent, received) of ``rank`` in a ring reduce-scatter with the given segment sizes."""
    size = len(segment_bytes)
    total = sum(segment_bytes)
    return total - segment_bytes[rank], total - segment_bytes[(rank - 1) % size]


def ring_allgather_bytes(segment_bytes, rank):
    """(sent, received) of ``rank`` in a ring all-gather with the given segment sizes."""
    size = len(segment_bytes)
    total = sum(segment_bytes)
    return total - segment_bytes[(rank + 1) % size], total - segment_bytes[rank]


def ring_allreduce_bytes(count, itemsize, size, rank):
    """(sent, received) of ``rank`` in a ring all-reduce of ``count`` elements.

    The buffer is cut into ``size`` segments the way ``numpy.array_split`` cuts it; the
    all-reduce is the reduce-scatter of those segments followed by their all-gather.
    """
    base, extra = divmod(count, size)
    segments = [(base + (i < extra)) * itemsize for i in range(size)]
    rs_sent, rs_received = ring_reduce_scatter_bytes(segments, rank)
    ag_sent, ag_received = ring_allgather_bytes(segments, rank)
    return rs_sent + ag_sent, rs_received + ag_received


def chain_bcast_bytes(nbytes, size, rank, root):
    """(sent, received) of ``rank`` in a chain broadcast of ``nbytes`` from ``root``."""
    position = (rank - root) % size
    sent = nbytes if position < size - 1 else 0
    received = nbytes if position > 0 else 0
    return sent, received


@dataclasses.dataclass
class OperationTotals:
    """Totals over the calls of one collective on this rank; ``algorithms`` counts the calls
    of each variable-count algorithm (:mod:`kfac_mn.communicators.v_collectives`)."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    seconds: float = 0.0
    algorithms: dict = dataclasses.field(default_factory=dict)


class TrafficLog:
    """Per-operation totals of calls, bytes, messages and wall time on this rank."""

    def __init__(self):
        self._totals = {}

    def record(self, operation, bytes_sent, bytes_received, seconds, messages_sent=0,
               messages_received=0, algorithm=None):
        totals = self._totals.setdefault(operation, OperationTotals())
        totals.calls += 1
        totals.bytes_sent += int(bytes_sent)
        totals.bytes_received += int(bytes_received)
        totals.messages_sent += int(messages_sent)
        totals.messages_received += int(messages_received)
        totals.seconds += seconds
        if algorithm is not None:
            totals.algorithms[algorithm] = totals.algorithms.get(algorithm, 0) + 1

    def snapshot(self):
        """{operation: {calls, bytes_sent, bytes_received, messages_sent, messages_received,
        seconds, algorithms}}, operations sorted."""
        return {name: dataclasses.asdict(self._totals[name]) for name in sorted(self._totals)}

    def reset(self):
        self._totals = {}

