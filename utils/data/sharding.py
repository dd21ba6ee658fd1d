"""Which examples each MPI rank reads at each iteration of an epoch.

Notation: ``n`` examples, ``size`` ranks, ``batch_size`` examples per rank, global batch
``G = size * batch_size``.

1. Epoch order. ``order_e`` is a permutation of ``range(n)`` drawn from
   ``permutation_rng(seed, e)`` (``range(n)`` itself when not shuffling). Every rank
   computes the same order; nothing is communicated.
2. Length policy (``last_batch``), fixing the epoch's positions ``order_e[0 .. L)``:

   - ``'pad'``: ``I = ceil(n / G)`` iterations. The order is extended cyclically to
     ``L = I * G`` positions (position ``p`` reads ``order_e[p mod n]``), so every example
     is read at least once and the first ``I * G - n`` of the epoch order twice. Every
     rank gets ``I`` full batches. The default for training.
   - ``'drop'``: ``I = floor(n / G)``, ``L = I * G``: the last ``n - L`` examples of the
     epoch order are not read this epoch (a different tail each epoch when shuffling).
   - ``'partial'``: ``I = ceil(n / G)``, ``L = n``: every example exactly once; the last
     global batch is short and its per-rank shares differ by at most one example (a rank
     may get an empty batch when fewer than ``size`` examples remain). For evaluation:
     sum metrics over examples, do not average per batch.
3. Shard. Iteration ``i`` covers positions ``[i G, i G + B_i)`` with ``B_i = min(G, L - i G)``;
   rank ``r`` takes the sub-range ``[i G + floor(r B_i / size), i G + floor((r + 1) B_i / size))``,
   which is ``[i G + r batch_size, i G + (r + 1) batch_size)`` for a full batch.

A consequence of 3: for a fixed global batch ``G`` the set of examples in iteration ``i``
(and, with ``utils.data.seeding``, their augmentation) does not depend on how many ranks share it.
"""
import numpy

from utils.data.seeding import permutation_rng

LAST_BATCH_POLICIES = ("pad", "drop", "partial")


class Sharding:
    """The deterministic per-rank schedule of one dataset; see the module docstring."""

    def __init__(self, n_examples, batch_size, rank=0, size=1, last_batch="pad", shuffle=True):
        for name, value, lowest in (("number of examples", n_examples, 1),
                                    ("batch size", batch_size, 1), ("size", size, 1),
                                    ("rank", rank, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) \
                    or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
        if rank >= size:
            raise ValueError(f"rank {rank} is outside the world of size {size}")
        if last_batch not in LAST_BATCH_POLICIES:
            raise ValueError(
                f"last_batch must be one of {', '.join(LAST_BATCH_POLICIES)}, got {last_batch!r}")
        self.n_examples = int(n_examples)
        self.batch_size = int(batch_size)
        self.rank, self.size = int(rank), int(size)
        self.last_batch = last_batch
        self.shuffle = bool(shuffle)
        self.global_batch_size = self.batch_size * self.size
        if last_batch == "drop":
            self.iterations_per_epoch = self.n_examples // self.global_batch_size
            if self.iterations_per_epoch == 0:
                raise ValueError(
                    f"last_batch='drop' with {self.n_examples} examples and a global batch of "
                    f"{self.global_batch_size} leaves no iteration; use 'pad' or a smaller batch")
        else:
            self.iterations_per_epoch = -(-self.n_examples // self.global_batch_size)
        self.positions_per_epoch = (self.n_examples if last_batch == "partial"
                                    else self.iterations_per_epoch * self.global_batch_size)

    def epoch_order(self, seed, epoch):
        """The permutation of ``range(n)`` used in ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return numpy.arange(self.n_examples)
        return permutation_rng(seed, epoch).permutation(self.n_examples)

    def position_range(self, iteration, rank=None):
        """Positions ``[start, stop)`` in the epoch read by ``rank`` (default: this rank)."""
        if not 0 <= iteration < self.iterations_per_epoch:
            raise IndexError(
                f"iteration {iteration} outside an epoch of {self.iterations_per_epoch}")
        rank = self.rank if rank is None else rank
        first = iteration * self.global_batch_size
        width = min(self.global_batch_size, self.positions_per_epoch - first)
        return first + rank * width // self.size, first + (rank + 1) * width // self.size

    def batch(self, order, iteration, rank=None):
        """``(indices, repeats)`` of the examples ``rank`` reads at ``iteration``, given the
        epoch's ``order``; ``repeats[k]`` counts earlier reads of that example this epoch."""
        start, stop = self.position_range(iteration, rank)
        positions = numpy.arange(start, stop)
        return order[positions % self.n_examples], positions // self.n_examples
