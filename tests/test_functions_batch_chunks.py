"""batch_chunks: cache-sized blocks of examples on the CPU, one block on the GPU."""
import numpy as np
import pytest

from kfac_mn.functions.batch_chunks import batch_chunks


@pytest.mark.parametrize("batch, per_example, budget, step", [
    (8, 100, 1000, 10), (8, 100, 250, 2), (7, 100, 250, 2), (5, 10 ** 6, 1000, 1), (3, 0, 10, 3)])
def test_chunks_cover_the_batch_in_order(batch, per_example, budget, step):
    chunks = batch_chunks(np, batch, per_example, budget)
    covered = [i for chunk in chunks for i in range(batch)[chunk]]
    assert covered == list(range(batch))
    assert all(chunk.stop - chunk.start <= step for chunk in chunks)
    assert chunks[0].stop - chunks[0].start == min(step, batch)


def test_one_chunk_off_the_cpu():
    class FakeGpuModule:
        pass

    assert batch_chunks(FakeGpuModule(), 32, 10 ** 6, 1) == (slice(0, 32),)
