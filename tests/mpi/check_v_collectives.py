"""Every variable-count algorithm (native, two_phase, allreduce) against NumPy, on any number
of ranks, and two_phase's counted bytes and messages against an element-by-element reference.

Layouts: uneven segments with empty ones, all empty, one segment larger than all the others
together; with ``resnet50`` as argument, the owner segments of ResNet-50's stage-2 buffer on
this many ranks (every layer due, greedy assignment), scaled down 1,000-fold.  Dtypes float64,
float32 and float16.

The byte reference does not use kfac_mn.communicators.v_collectives: it labels every value of
the padded buffer with its chunk (value // k) and its owner (from the counts), and counts, for
this rank, the values of its chunk owned by others (sent in the redistribution of
ReduceScatterV), the values of its segment held in other chunks (received), and P-1 ring
messages of k values each way.
"""
import dataclasses
import sys

import numpy as np

from kfac_mn.communicators import create_communicator, v_collectives

ALGORITHMS = ("native", "two_phase", "allreduce")
TOLERANCE = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def layouts(comm, resnet50):
    size = comm.size
    if resnet50:  # one rank builds the model
        return [comm.bcast_obj(resnet50_counts(size) if comm.rank == 0 else None)]
    rng = np.random.default_rng(size)
    uneven = [int(c) for c in rng.integers(0, 9, size)]
    uneven[size // 2] = 0
    return [uneven, [0] * size, [200] + [int(c) for c in rng.integers(0, 4, size - 1)],
            [1] * size]


def resnet50_counts(size):
    import models
    from kfac_mn.distributed import assignment, packed_layout
    from kfac_mn.distributed.work_items import build_work_items
    from kfac_mn.fisher import build_fisher_blocks

    np.random.seed(0)
    model = models.archs["resnet50"]()
    items = build_work_items(model, build_fisher_blocks(model))
    owners = assignment.assign(items, size)
    due = [item.name for item in items if item.block is not None]
    segments = packed_layout.reduce_scatter_segments(items, owners, due)
    return [count // 1000 for count in packed_layout.counts_by_owner(segments, size)]


def rank_buffer(rank, total, dtype):
    return np.random.default_rng(1000 + rank).standard_normal(total).astype(dtype)


def check_sums(comm, algorithm, counts, dtype):
    size, rank, total = comm.size, comm.rank, sum(counts)
    offset = sum(counts[:rank])
    buffers = [rank_buffer(r, total, dtype) for r in range(size)]
    exact = np.sum([b.astype(np.float64) for b in buffers], axis=0)
    mine = comm.reduce_scatter_v(buffers[rank], counts)
    assert mine.dtype == dtype and mine.shape == (counts[rank],), (algorithm, mine.shape)
    expected = exact[offset:offset + counts[rank]]
    if dtype == np.float16:  # one rounding per addition: |error| <= P u sum |x|
        bound = size * 2.0 ** -11 * np.sum([np.abs(b.astype(np.float64)) for b in buffers],
                                             axis=0)[offset:offset + counts[rank]] + 1e-7
        assert np.all(np.abs(mine - expected) <= bound), (algorithm, counts, dtype)
    else:
        np.testing.assert_allclose(mine, expected, rtol=TOLERANCE[np.dtype(dtype)],
                                   atol=TOLERANCE[np.dtype(dtype)] * size,
                                   err_msg=f"{algorithm} {counts} {dtype}")
    gathered = comm.allgather_v(buffers[rank][offset:offset + counts[rank]], counts)
    expected = np.concatenate([buffers[r][sum(counts[:r]):sum(counts[:r + 1])]
                               for r in range(size)]) if total else np.zeros(0, dtype)
    assert gathered.dtype == dtype and np.array_equal(gathered, expected), (algorithm, counts)


def reference_two_phase(counts, itemsize, rank, operation):
    """(bytes sent, bytes received, messages sent, messages received), element by element."""
    size, total = len(counts), sum(counts)
    if size == 1 or total == 0:
        return 0, 0, 0, 0
    k = -(-total // size)
    owner = np.repeat(np.arange(size), counts)
    chunk = np.arange(total) // k
    ring = (size - 1) * k * itemsize
    out_values = (chunk == rank) & (owner != rank)   # my chunk, others' segments
    in_values = (owner == rank) & (chunk != rank)    # my segment, others' chunks
    out_peers = len(set(owner[out_values].tolist()))
    in_peers = len(set(chunk[in_values].tolist()))
    if operation == "allgather_v":  # the mirror: segments go out, chunk pieces come in
        out_values, in_values = in_values, out_values
        out_peers, in_peers = in_peers, out_peers
    return (ring + int(out_values.sum()) * itemsize, ring + int(in_values.sum()) * itemsize,
            size - 1 + out_peers, size - 1 + in_peers)


def main():
    resnet50 = "resnet50" in sys.argv[1:]
    checked = 0
    for algorithm in ALGORITHMS:
        comm = create_communicator(collectives=algorithm)
        for counts in layouts(comm, resnet50):
            for dtype in (np.float64, np.float32, np.float16):
                before = comm.stats
                check_sums(comm, algorithm, counts, dtype)
                after = comm.stats
                for operation in ("reduce_scatter_v", "allgather_v"):
                    found = {key: after[operation][key] - before.get(operation, {}).get(key, 0)
                             for key in ("calls", "bytes_sent", "bytes_received",
                                         "messages_sent", "messages_received")}
                    assert found["calls"] == 1 and after[operation]["algorithms"].get(
                        algorithm), (operation, after[operation])
                    if algorithm == "two_phase":
                        expected = reference_two_phase(counts, np.dtype(dtype).itemsize,
                                                       comm.rank, operation)
                        measured = (found["bytes_sent"], found["bytes_received"],
                                    found["messages_sent"], found["messages_received"])
                        assert measured == expected, (
                            f"rank {comm.rank} {operation} {counts} {dtype.__name__}: "
                            f"measured {measured}, reference {expected}")
                        formula = v_collectives.traffic(algorithm, operation, counts,
                                                        np.dtype(dtype).itemsize, comm.rank)
                        assert measured == dataclasses.astuple(formula), (measured, formula)
                checked += 1
    comm.barrier()
    if comm.rank == 0:
        print(f"variable-count collectives: {checked} cases of {', '.join(ALGORITHMS)} on "
              f"{comm.size} ranks{' (ResNet-50 layout)' if resnet50 else ''} match NumPy; "
              "two_phase bytes and messages match the reference", flush=True)


if __name__ == "__main__":
    main()
