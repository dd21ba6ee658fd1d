"""Where each tensor of a distributed K-FAC step sits in the two packed buffers.

Stage 2 (ReduceScatterV) sends one buffer grouped by owner rank: for rank 0's items, then rank
1's, and so on, each item contributes its parameters' gradients and then, if its layer is due
for a refresh, its statistic sums (symmetric matrices as upper triangles, d(d+1)/2 values;
see :mod:`kfac_mn.distributed.triangles`).  Rank r receives the segment of its own items.
Stage 4 (AllGatherV) sends the gradients alone, grouped the same way.

Every rank builds the same list of :class:`Segment` from the work items, their owners and the
due layers, all of which every rank knows, so the buffers line up without any exchange.
"""
import dataclasses
import math

from kfac_mn.distributed.triangles import pack_upper_triangle, unpack_upper_triangle


@dataclasses.dataclass(frozen=True)
class Segment:
    """One tensor in a packed buffer.

    ``kind`` is 'grad' (``key`` is the parameter's path) or 'stat' (``key`` is the statistic's
    name, e.g. 'A'); ``triangle`` says it travels as an upper triangle.
    """

    owner: int
    item: object
    kind: str
    key: str
    shape: tuple
    triangle: bool = False

    @property
    def size(self):
        """Number of values in the buffer."""
        if self.triangle:
            return self.shape[0] * (self.shape[0] + 1) // 2
        return math.prod(self.shape)

    def param(self):
        """The parameter of a 'grad' segment."""
        return dict(self.item.params)[self.key]

    @property
    def label(self):
        """Human-readable name, e.g. '/fc/W grad' or '/fc A'."""
        return f"{self.key} grad" if self.kind == "grad" else f"{self.item.name} {self.key}"


def _gradient_segments(owner, item):
    return [Segment(owner, item, "grad", path, param.data.shape) for path, param in item.params]


def _statistic_segments(owner, item):
    return [Segment(owner, item, "stat", name, shape, item.block.symmetric[name])
            for name, shape in item.statistic_shapes().items()]


def _by_owner(items, owners):
    """(owner, item) grouped by owner rank, items in their own order within a group."""
    for index in sorted(range(len(items)), key=lambda i: (owners[i], i)):
        yield owners[index], items[index]


def reduce_scatter_segments(items, owners, due):
    """Stage 2 layout: per owner, per item, the gradients then (if due) the statistics."""
    due = set(due)
    segments = []
    for rank, item in _by_owner(items, owners):
        segments.extend(_gradient_segments(rank, item))
        if item.block is not None and item.name in due:
            segments.extend(_statistic_segments(rank, item))
    return segments


def allgather_segments(items, owners):
    """Stage 4 layout: per owner, per item, the (preconditioned) gradients."""
    segments = []
    for rank, item in _by_owner(items, owners):
        segments.extend(_gradient_segments(rank, item))
    return segments


def sizes(segments):
    """Number of values of each segment, in order."""
    return [segment.size for segment in segments]


def owned_by(segments, rank):
    """The segments that ``rank`` owns, in order."""
    return [segment for segment in segments if segment.owner == rank]


def counts_by_owner(segments, size):
    """Number of values each rank owns in the buffer (the counts of the V collectives)."""
    counts = [0] * size
    for segment in segments:
        counts[segment.owner] += segment.size
    return counts


def local_value(segment):
    """This rank's tensor for the segment: a gradient (zeros when None) or a statistic sum.

    A due statistic that this rank did not collect (its layer did not run) is zeros, with
    count 0 (see :func:`local_count`).
    """
    if segment.kind == "grad":
        param = segment.param()
        if param.grad is None:
            return param.xp.zeros(segment.shape, dtype=param.dtype)
        return param.grad
    block = segment.item.block
    value = block.sums.get(segment.key)
    if value is None:
        param = segment.item.params[0][1]
        return param.xp.zeros(segment.shape, dtype=param.dtype)
    if value.shape != segment.shape:
        raise ValueError(f"{block.path}: statistic {segment.key} has shape {value.shape}, the "
                         f"layout expects {segment.shape} from the layer's parameters")
    return value


def local_count(segment):
    """How many examples (or example-positions) this rank's sum of a statistic covers."""
    return segment.item.block.counts.get(segment.key, 0)


def pack(segments, xp, dtype):
    """One 1-D ``xp`` buffer of ``dtype`` with the segments' local values, in order.

    Segments marked ``triangle`` contribute their upper triangle; no segments give an empty
    buffer.
    """
    parts = [xp.zeros(0, dtype=dtype)]
    for segment in segments:
        value = local_value(segment)
        part = pack_upper_triangle(value) if segment.triangle else value.ravel()
        parts.append(part.astype(dtype, copy=False))
    return xp.concatenate(parts)


def unpack(buffer, segments):
    """(segment, tensor of the segment's shape) for consecutive segments of ``buffer``."""
    expected = sum(segment.size for segment in segments)
    if buffer.size != expected:
        raise ValueError(f"unpack: the buffer has {buffer.size} values, the segments "
                         f"{expected}")
    offset = 0
    for segment in segments:
        part = buffer[offset:offset + segment.size]
        offset += segment.size
        if segment.triangle:
            yield segment, unpack_upper_triangle(part, segment.shape[0])
        else:
            yield segment, part.reshape(segment.shape)
