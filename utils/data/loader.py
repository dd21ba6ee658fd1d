"""The per-rank loader: deterministic sharded batches, built in parallel worker processes.

Each MPI rank makes its own ``ShardedLoader`` with its ``rank`` and the world ``size`` (plain
ints, no MPI here). Every rank computes the same epoch permutation from ``(seed, epoch)``
and reads only its shard of each global batch (``utils.data.sharding``); every example's
augmentation is drawn from ``(seed, epoch, index, repeat)`` and mixup from
``(seed, epoch, iteration, rank)`` (``utils.data.seeding``). A batch is therefore a pure
function of ``(seed, epoch, iteration, rank, size)``: the same on rerun, for any worker
count, and after resuming from ``state_dict()``.
"""
import warnings

import cv2

from utils.data.batch_builder import BatchBuilder
from utils.data.loader_workers import WorkerPool
from utils.data.seeding import check_seed
from utils.data.sharding import Sharding

_CHECKED_STATE = ("seed", "n_examples", "global_batch_size", "shuffle", "last_batch")


class ShardedLoader:
    """Batches ``(x, t)`` for one rank: x float32 (N, C, H, W); t int32 (N,) labels, or
    float32 (N, n_class) soft targets when ``augmentation`` mixes or smooths labels.

    Args:
        dataset: ``len(dataset)``, ``dataset.get_image(i)`` (a ``PIL.Image``, possibly
            only opened: the transform decodes it) and ``dataset.get_label(i)`` (int), as
            the datasets in ``utils`` provide.
        batch_size: examples per rank and iteration.
        transform: ``transform(image, rng, out) -> float32 (C, H, W)``
            (``utils.data.transforms``).
        rank, size: this rank and the number of ranks.
        seed: non-negative int; the whole schedule and all augmentation derive from it.
        shuffle: draw a new permutation every epoch (else dataset order).
        last_batch: ``'pad'``, ``'drop'`` or ``'partial'`` (see ``utils.data.sharding``).
        repeat: iterate over epochs forever (training) or stop after one (evaluation).
        n_workers: worker processes; 0 builds batches in this process, on demand (and
            sets OpenCV in this process to one thread, as the workers do). With workers,
            ``x`` is a view of a worker's shared memory, handed over without a copy and
            reused only once no array views it any more.
        prefetch: batches in flight per worker.
        augmentation: batch-level ``augmentation(x, labels, rng)``, e.g.
            ``utils.data.batch_augmentation.BatchAugmentation``; ``None`` keeps int labels.
        skip_corrupt: go past missing or undecodable images instead of raising (counted
            in ``n_skipped``, each file warned about once): ``'drop'`` (or True) leaves them
            out of their batch, ``'replace'`` takes the next readable example instead.
        start_method: multiprocessing start method for the workers (``None``: the default;
            ``'forkserver'`` avoids forking a process that has initialised MPI or CUDA).

    Position: ``epoch`` (completed epochs), ``iteration_in_epoch``, ``iteration`` (batches
    returned since epoch 0, as in Chainer), ``epoch_detail`` and ``is_new_epoch`` (true
    right after the last batch of an epoch was returned). ``state_dict()`` /
    ``load_state_dict()`` save and restore it. ``close()`` (or ``with``) stops the workers.
    """

    def __init__(self, dataset, batch_size, *, transform, rank=0, size=1, seed=0,
                 shuffle=True, last_batch="pad", repeat=True, n_workers=0, prefetch=2,
                 augmentation=None, skip_corrupt=False, start_method=None):
        missing = [name for name in ("get_image", "get_label") if not hasattr(dataset, name)]
        if missing:
            raise TypeError(f"{type(dataset).__name__} has no {' or '.join(missing)}: the "
                            "loader needs get_image(i) -> PIL.Image and get_label(i) -> int")
        for name, value, lowest in (("n_workers", n_workers, 0), ("prefetch", prefetch, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
        n_class = getattr(dataset, "n_class", None)
        if augmentation is not None and n_class is not None and n_class > augmentation.n_class:
            raise ValueError(f"the dataset has {n_class} classes but the batch augmentation "
                             f"was built for {augmentation.n_class}")
        self.seed = check_seed(seed)
        self.sharding = Sharding(len(dataset), batch_size, rank, size, last_batch, shuffle)
        self.repeat = bool(repeat)
        self.n_skipped = 0
        self.epoch = self.iteration_in_epoch = 0
        self.is_new_epoch = False
        self._warned = set()
        self._orders = {}
        self._builder = BatchBuilder(dataset, transform, augmentation, self.seed, rank,
                                     skip_corrupt)
        if n_workers:
            self._pool = WorkerPool(self._builder, n_workers, prefetch, start_method)
        else:
            cv2.setNumThreads(1)  # ranks run one per core: no OpenCV thread pool on top
            self._pool = None
        self._next_task = (0, 0)
        self._closed = False

    # -- position -----------------------------------------------------------------------
    @property
    def iterations_per_epoch(self):
        return self.sharding.iterations_per_epoch

    @property
    def iteration(self):
        return self.epoch * self.iterations_per_epoch + self.iteration_in_epoch

    @property
    def epoch_detail(self):
        return self.epoch + self.iteration_in_epoch / self.iterations_per_epoch

    def state_dict(self):
        """Plain ints, bools and strings: the position plus what must match to resume."""
        return {"epoch": self.epoch, "iteration_in_epoch": self.iteration_in_epoch,
                "is_new_epoch": self.is_new_epoch, "n_skipped": self.n_skipped,
                "seed": self.seed, "n_examples": self.sharding.n_examples,
                "global_batch_size": self.sharding.global_batch_size,
                "shuffle": self.sharding.shuffle, "last_batch": self.sharding.last_batch}

    def load_state_dict(self, state):
        """Resume at the saved position. Seed, dataset length, global batch size, shuffle
        and last_batch must match (the world size may differ if the global batch does not)."""
        mine = self.state_dict()
        for key in mine:
            if key not in state:
                raise KeyError(f"loader state has no {key!r}")
        for key in _CHECKED_STATE:
            if state[key] != mine[key]:
                raise ValueError(f"loader state {key!r} is {state[key]!r} but this loader has "
                                 f"{mine[key]!r}; the saved batches cannot be reproduced")
        epoch, iteration_in_epoch = int(state["epoch"]), int(state["iteration_in_epoch"])
        if epoch < 0 or not 0 <= iteration_in_epoch < self.iterations_per_epoch:
            raise ValueError(f"loader state position (epoch {epoch}, iteration "
                             f"{iteration_in_epoch}) is outside an epoch of "
                             f"{self.iterations_per_epoch} iterations")
        self._restart(epoch, iteration_in_epoch)
        self.is_new_epoch = bool(state["is_new_epoch"])
        self.n_skipped = int(state["n_skipped"])

    def reset(self):
        """Back to epoch 0, iteration 0 (e.g. to evaluate again with ``repeat=False``)."""
        self._restart(0, 0)
        self.is_new_epoch = False

    def _restart(self, epoch, iteration_in_epoch):
        self._check_open()
        if self._pool is not None:
            self._pool.discard_in_flight()
        self.epoch, self.iteration_in_epoch = epoch, iteration_in_epoch
        self._next_task = (epoch, iteration_in_epoch)
        self._orders.clear()

    # -- iteration ----------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        self._check_open()
        if not self.repeat and self.epoch >= 1:
            raise StopIteration
        try:
            x, targets, skipped = self._next_batch()
        except BaseException:
            self.close()  # results in flight no longer match the position
            raise
        self._count_skipped(skipped)
        self.iteration_in_epoch += 1
        self.is_new_epoch = self.iteration_in_epoch == self.iterations_per_epoch
        if self.is_new_epoch:
            self.epoch += 1
            self.iteration_in_epoch = 0
            self._orders.pop(self.epoch - 1, None)
        return x, targets

    def _task(self, epoch, iteration):
        if epoch not in self._orders:
            self._orders[epoch] = self.sharding.epoch_order(self.seed, epoch)
        indices, repeats = self.sharding.batch(self._orders[epoch], iteration)
        return epoch, iteration, indices, repeats

    def _next_batch(self):
        if self._pool is None:
            return self._builder.build(*self._task(self.epoch, self.iteration_in_epoch))
        while self._pool.in_flight < self._pool.capacity:
            epoch, iteration = self._next_task
            if not self.repeat and epoch >= 1:
                break
            self._pool.submit(self._task(epoch, iteration))
            iteration += 1
            self._next_task = ((epoch + 1, 0) if iteration == self.iterations_per_epoch
                               else (epoch, iteration))
        return self._pool.receive()

    def _count_skipped(self, skipped):
        self.n_skipped += len(skipped)
        for index, message in skipped:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipped {message}", RuntimeWarning, stacklevel=3)

    # -- shutdown -----------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("the loader is closed")

    def close(self):
        """Stop the worker processes and free their shared memory (idempotent)."""
        self._closed = True
        if self._pool is not None:
            self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
