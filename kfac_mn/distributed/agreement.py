"""Stage 2's agreement: one small float64 all-gather that every rank reads the same way.

Before the reduce-scatter, the ranks must agree on two things that no rank knows alone:

* the *global count* of each due statistic (how many examples, or example-positions, its
  sums cover over all ranks), which turns the owner's summed statistics into averages;
* for float16 communication, each segment's largest magnitude over all ranks, from which
  every rank derives the same power-of-two scale (:mod:`kfac_mn.distributed.segment_scaling`).

Each rank fills a vector of the same length at every step: a header (its number of due
statistics and its buffer length, which must match on every rank), its local count of every
statistic of every layer (0 when not due) and, for float16, its largest magnitude in every
segment of a step that refreshes every layer (0 when absent).  After the all-gather every
rank adds the counts (integers: exact in any order) and takes the maxima, so all ranks agree
bit for bit.
"""
import numpy

from kfac_mn.distributed import packed_layout, segment_scaling

_HEADER = 2


def _slot_key(segment):
    return segment.item.name, segment.kind, segment.key


def agreement_slots(items, owners, comm_dtype):
    """Positions in the agreement vector (after its header).

    'count': one per statistic of every layer; 'bound' (float16 only): one per segment of a
    step that refreshes every layer.
    """
    every_layer = [item.name for item in items if item.block is not None]
    segments = packed_layout.reduce_scatter_segments(items, owners, every_layer)
    statistics = [segment for segment in segments if segment.kind == "stat"]
    count = {(segment.item.name, segment.key): _HEADER + i
             for i, segment in enumerate(statistics)}
    bound = {}
    if numpy.dtype(comm_dtype) == numpy.float16:
        bound = {_slot_key(segment): _HEADER + len(count) + i
                 for i, segment in enumerate(segments)}
    return {"count": count, "bound": bound}


def local_agreement(slots, segments, sendbuf, half):
    """This rank's agreement vector for the stage-2 ``segments`` packed in ``sendbuf``."""
    local = numpy.zeros(_HEADER + len(slots["count"]) + len(slots["bound"]))
    local[:_HEADER] = sum(segment.kind == "stat" for segment in segments), sendbuf.size
    for segment in segments:
        if segment.kind == "stat":
            local[slots["count"][segment.item.name, segment.key]] = (
                packed_layout.local_count(segment))
    if half:
        maxima = segment_scaling.segment_max_abs(sendbuf, [s.size for s in segments])
        local[[slots["bound"][_slot_key(segment)] for segment in segments]] = maxima
    return local


def read_agreement(table, slots, segments, half, step):
    """({(layer, statistic): global count}, bound of each segment or None) from the gathered
    ``table`` (one agreement vector per rank); an error when the ranks' headers differ."""
    size = table.shape[0]
    if not numpy.array_equal(table[:, :_HEADER],
                             numpy.broadcast_to(table[0, :_HEADER], (size, _HEADER))):
        raise RuntimeError(
            f"DistributedKFAC step {step}: the ranks disagree on the stage-2 buffer "
            f"((statistics due, length) per rank: {table[:, :_HEADER].astype(int).tolist()}); "
            "the step counts, schedules or models differ between ranks")
    totals = table.sum(axis=0)
    counts = {key: int(totals[slot]) for key, slot in slots["count"].items()}
    if not half:
        return counts, None
    largest = table.max(axis=0)
    return counts, largest[[slots["bound"][_slot_key(segment)] for segment in segments]]
