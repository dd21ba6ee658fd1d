"""Which rank owns which layer: greedy balancing of estimated cost, or the authors' split.

The owner of a layer receives its summed statistics, inverts its factors and preconditions its
gradient (stages 2-4 of the paper's Figure 1), so a rank's work is the sum over its layers of

* inversion ~ d^3 for each d x d factor (A, G, a full BN block; 8 per 2x2 unit-wise BN block,
  1 per entry of a diagonal BN Fisher): each block's
  :meth:`~kfac_mn.fisher.blocks.FisherBlock.inversion_cost`, and
* communication ~ d^2: the values it receives, the packed statistics (upper triangles of the
  symmetric factors) plus the gradient.

Both terms count elementary operations and are added as they are; the cost is a Python int, so
the assignment is exact and identical on every rank.

:func:`assign_balanced` is the longest-processing-time greedy rule: items by decreasing cost
(ties: earlier item first), each to the least-loaded rank (ties: lowest rank).  Its most loaded rank
is within (4/3 - 1/(3 ranks)) of the optimum (Graham 1969); with more ranks than items every
item gets a rank of its own and the other ranks own nothing.  No assignment can do better than
``max(largest item, total / ranks)`` for the most loaded rank; :func:`lower_bound` gives it.
:func:`assign_equal_count` is the authors' split (``np.array_split`` of the layer list into
contiguous chunks of equal count), kept for comparison.
"""
import heapq
import math

import numpy


def packed_size(shape, symmetric):
    """Values that travel for a statistic: d(d+1)/2 for a symmetric d x d matrix."""
    if symmetric:
        return shape[0] * (shape[0] + 1) // 2
    return math.prod(shape)


def estimated_cost(item):
    """Inversion plus communication cost of a
    :class:`~kfac_mn.distributed.work_items.WorkItem`."""
    cost = item.gradient_size()
    if item.block is not None:
        cost += item.block.inversion_cost()
    for name, shape in item.statistic_shapes().items():
        cost += packed_size(shape, item.block.symmetric[name])
    return cost


def assign_balanced(costs, size):
    """Owner rank of each item: greedy least-loaded, largest item first."""
    _check_size(size)
    owners = [0] * len(costs)
    loads = [(0, rank) for rank in range(size)]  # a heap of (load, rank): ties -> lowest rank
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + costs[index], rank))
    return owners


def assign_equal_count(n_items, size):
    """Owner rank of each item in the authors' split: contiguous chunks of equal count."""
    _check_size(size)
    owners = [0] * n_items
    for rank, chunk in enumerate(numpy.array_split(numpy.arange(n_items), size)):
        for index in chunk:
            owners[int(index)] = rank
    return owners


ASSIGNMENTS = ("balanced", "equal_count")


def assign(items, size, method="balanced"):
    """Owner rank of each work item, by ``method`` ('balanced' or 'equal_count')."""
    if method == "balanced":
        return assign_balanced([estimated_cost(item) for item in items], size)
    if method == "equal_count":
        return assign_equal_count(len(items), size)
    raise ValueError(f"assignment must be one of {', '.join(ASSIGNMENTS)}, not {method!r}")


def loads(costs, owners, size):
    """Total cost of each rank."""
    totals = [0] * size
    for cost, owner in zip(costs, owners):
        totals[owner] += cost
    return totals


def imbalance(rank_loads):
    """max / mean of the per-rank loads (1.0 is perfect balance)."""
    mean = sum(rank_loads) / len(rank_loads)
    return max(rank_loads) / mean if mean else 1.0


def lower_bound(costs, size):
    """The smallest possible load of the most loaded rank: max(largest item, total / size)."""
    return max(max(costs, default=0), sum(costs) / size)


def _check_size(size):
    if isinstance(size, bool) or not isinstance(size, (int, numpy.integer)) or size < 1:
        raise ValueError(f"the number of ranks must be a positive int, got {size!r}")
