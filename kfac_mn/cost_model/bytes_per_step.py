"""Bytes one rank sends and receives in a step, from the layer shapes alone: the all-reduce
alternatives (ring model of :mod:`kfac_mn.communicators.traffic`) and the collectives of
``DistributedKFAC`` (its agreement all-gather, ReduceScatterV and AllGatherV with their
trailers, under each algorithm of :mod:`kfac_mn.communicators.v_collectives`), for a step that
refreshes every layer."""
import math

import numpy as np

from kfac_mn.communicators import traffic, v_collectives
from kfac_mn.distributed import assignment, packed_layout

FLOAT64 = 8


def full_and_packed_sizes(items):
    """(gradient values, full statistic values, packed statistic values) of all items."""
    gradients = sum(item.gradient_size() for item in items)
    full = packed = 0
    for item in items:
        for name, shape in item.statistic_shapes().items():
            full += math.prod(shape)
            packed += assignment.packed_size(shape, item.block.symmetric[name])
    return gradients, full, packed


def allreduce_sent(count, itemsize, size):
    """Bytes the most loaded rank sends in a ring all-reduce of ``count`` values."""
    return max(traffic.ring_allreduce_bytes(count, itemsize, size, rank)[0]
               for rank in range(size))


def ours_per_rank(items, owners, size, comm_dtype, adaptive=False, algorithm="native"):
    """[(sent, received)] per rank of one DistributedKFAC step refreshing every layer, its
    variable-count collectives (the agreement's too) run by ``algorithm``."""
    itemsize = np.dtype(comm_dtype).itemsize
    half = np.dtype(comm_dtype) == np.float16
    due = [item.name for item in items if item.block is not None]
    stage2 = packed_layout.reduce_scatter_segments(items, owners, due)
    stage4 = packed_layout.allgather_segments(items, owners)
    # the agreement vector: 2 header values, a count per statistic, a bound per segment (fp16)
    side = 2 + sum(segment.kind == "stat" for segment in stage2) + (len(stage2) if half else 0)
    rs_counts = packed_layout.counts_by_owner(stage2, size)
    ag_counts = packed_layout.counts_by_owner(stage4, size)
    for segment in stage4:  # the trailer: scale exponents and schedule state of the owner
        ag_counts[segment.owner] += 1 if half else 0
    if adaptive:
        for item, owner in zip(items, owners):
            ag_counts[owner] += 2 if item.block is not None else 0
    totals = []
    for rank in range(size):
        parts = [v_collectives.traffic(algorithm, "allgather_v", [side] * size, FLOAT64,
                                       rank),
                 v_collectives.traffic(algorithm, "reduce_scatter_v", rs_counts, itemsize,
                                       rank),
                 v_collectives.traffic(algorithm, "allgather_v", ag_counts, itemsize, rank)]
        totals.append((sum(p.bytes_sent for p in parts), sum(p.bytes_received for p in parts)))
    return totals
