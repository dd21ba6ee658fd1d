"""Per-rank shards of each epoch: coverage across 1-4 ranks, padding policy, determinism."""
import collections

import numpy
import pytest

from utils.data.sharding import Sharding


def _epoch_reads(n, batch_size, size, last_batch, seed=0, epoch=0, shuffle=True):
    """Per rank: the list of (index, repeat) batches it reads in one epoch."""
    reads = []
    for rank in range(size):
        sharding = Sharding(n, batch_size, rank, size, last_batch, shuffle)
        order = sharding.epoch_order(seed, epoch)
        reads.append([sharding.batch(order, i) for i in range(sharding.iterations_per_epoch)])
    return reads


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [37, 48])
def test_partial_reads_every_example_exactly_once(size, n):
    reads = _epoch_reads(n, 4, size, "partial")
    indices = numpy.concatenate([b[0] for rank in reads for b in rank])
    assert sorted(indices.tolist()) == list(range(n))
    assert len({len(rank) for rank in reads}) == 1  # same iteration count on every rank
    for iteration in range(len(reads[0])):
        sizes = [len(rank[iteration][0]) for rank in reads]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_pad_reads_everything_and_repeats_only_the_documented_head(size):
    n, batch_size = 37, 4
    reads = _epoch_reads(n, batch_size, size, "pad")
    global_batch = batch_size * size
    iterations = -(-n // global_batch)
    assert all(len(rank) == iterations for rank in reads)
    assert all(len(b[0]) == batch_size for rank in reads for b in rank)
    counts = collections.Counter(int(i) for rank in reads for b in rank for i in b[0])
    assert set(counts) == set(range(n))
    extra = iterations * global_batch - n
    order = Sharding(n, batch_size, 0, size).epoch_order(0, 0)
    # Cyclic padding: position p reads order[p mod n], so order's head is read once more
    # (more than once when the global batch exceeds n).
    expected = collections.Counter(order.tolist())
    expected.update(order[numpy.arange(extra) % n].tolist())
    assert counts == expected
    repeats = numpy.concatenate([b[1] for rank in reads for b in rank])
    assert int((repeats > 0).sum()) == extra


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_drop_reads_each_example_at_most_once_in_full_batches(size):
    n, batch_size = 37, 4
    reads = _epoch_reads(n, batch_size, size, "drop")
    indices = [int(i) for rank in reads for b in rank for i in b[0]]
    assert len(indices) == len(set(indices)) == (n // (batch_size * size)) * batch_size * size
    assert all(len(b[0]) == batch_size for rank in reads for b in rank)


def test_same_seed_same_shards_new_epoch_new_order():
    first = _epoch_reads(50, 4, 3, "pad", seed=7)
    again = _epoch_reads(50, 4, 3, "pad", seed=7)
    assert all(numpy.array_equal(a[0], b[0]) for ra, rb in zip(first, again)
               for a, b in zip(ra, rb))
    other_epoch = _epoch_reads(50, 4, 3, "pad", seed=7, epoch=1)
    other_seed = _epoch_reads(50, 4, 3, "pad", seed=8)
    assert not numpy.array_equal(first[0][0][0], other_epoch[0][0][0])
    assert not numpy.array_equal(first[0][0][0], other_seed[0][0][0])
    unshuffled = _epoch_reads(12, 2, 2, "pad", shuffle=False)
    assert unshuffled[0][0][0].tolist() == [0, 1] and unshuffled[1][0][0].tolist() == [2, 3]


def test_global_batch_does_not_depend_on_the_number_of_ranks():
    """Same global batch of 12: one rank of 12, two of 6, three of 4, four of 3."""
    def global_batches(size):
        reads = _epoch_reads(100, 12 // size, size, "pad", seed=3)
        return [sorted(numpy.concatenate([rank[i][0] for rank in reads]).tolist())
                for i in range(len(reads[0]))]
    assert global_batches(1) == global_batches(2) == global_batches(3) == global_batches(4)


def test_bad_sharding_arguments_are_named():
    with pytest.raises(ValueError, match="rank 2 is outside the world of size 2"):
        Sharding(10, 2, rank=2, size=2)
    with pytest.raises(ValueError, match="batch size must be an integer >= 1"):
        Sharding(10, 0)
    with pytest.raises(ValueError, match="last_batch must be one of pad, drop, partial"):
        Sharding(10, 2, last_batch="wrap")
    with pytest.raises(ValueError, match="leaves no iteration"):
        Sharding(10, 4, rank=0, size=4, last_batch="drop")
    with pytest.raises(IndexError, match="iteration 5 outside an epoch of 5"):
        Sharding(10, 2).position_range(5)
