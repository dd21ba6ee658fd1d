"""Every random stream of the input pipeline as a pure function of integers.

Each stream is a NumPy ``Generator`` whose state derives from the run's seed, the epoch and
a position, through a ``SeedSequence``. A leading domain tag keeps the three kinds of
stream apart even when their other integers coincide:

- the epoch permutation: PCG64 seeded by ``(PERMUTATION, seed, epoch)``, the same on every
  rank;
- one example's augmentation: Philox, a counter-based generator (Salmon et al. 2011,
  "Parallel random numbers: as easy as 1, 2, 3"), with the key drawn from
  ``(EXAMPLE, seed, epoch)`` and the counter starting at ``(0, 0, index, repeat)``, where
  ``repeat`` counts earlier reads of the same example in this epoch (only padding reads
  twice). Drawing advances the low counter words, so the streams of different examples
  never meet, and the key is hashed once per epoch rather than once per example;
- one batch's augmentation (mixup): PCG64 seeded by ``(BATCH, seed, epoch, iteration,
  rank)``.

Nothing depends on which process computes what, or on how far a previous run got, so
the worker count and checkpoint/resume cannot change a batch.
"""
import functools

import numpy

PERMUTATION, EXAMPLE, BATCH = 0, 1, 2


def check_seed(seed):
    """Seeds are non-negative integers (``SeedSequence`` entropy)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _generator(*words):
    return numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence(words)))


def permutation_rng(seed, epoch):
    return _generator(PERMUTATION, seed, epoch)


@functools.lru_cache(maxsize=4)
def _example_key(seed, epoch):
    return numpy.random.SeedSequence((EXAMPLE, seed, epoch))


def example_rng(seed, epoch, index, repeat):
    counter = (0, 0, index, repeat)
    return numpy.random.Generator(numpy.random.Philox(_example_key(seed, epoch), counter))


def batch_rng(seed, epoch, iteration, rank):
    return _generator(BATCH, seed, epoch, iteration, rank)
