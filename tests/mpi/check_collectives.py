"""Every collective of MpiCommunicator against plain NumPy references (run under mpiexec).

Each rank's input is a function of its rank only, so every rank can rebuild what all the others
hold and compute the expected result itself.  Any failed check raises; the abort hook installed
by create_communicator then ends the whole job with a non-zero exit status.
"""
import numpy as np

from kfac_mn import Parameter
from kfac_mn.communicators import create_communicator

DTYPES = (np.float64, np.float32, np.float16)


def count_patterns(size):
    """Uneven counts, empty segments, an empty buffer, one rank owning everything."""
    return {
        "uneven": [2 * i + 1 for i in range(size)],
        "odd ranks empty": [0 if i % 2 else 5 + i for i in range(size)],
        "all empty": [0] * size,
        "last owns all": [0] * (size - 1) + [7],
    }


def rank_buffer(rank, length, dtype):
    """Small integers: every partial sum is exact in float16, so results must match exactly."""
    rng = np.random.default_rng(1000 + rank)
    return rng.integers(-8, 9, size=length).astype(dtype)


def rank_floats(rank, length, dtype):
    rng = np.random.default_rng(2000 + rank)
    return rng.standard_normal(length).astype(dtype)


def segment(array, counts, index):
    start = sum(counts[:index])
    return array[start:start + counts[index]]


def check_reduce_scatter_v(comm):
    for dtype in DTYPES:
        for pattern, counts in count_patterns(comm.size).items():
            total = sum(counts)
            mine = comm.reduce_scatter_v(rank_buffer(comm.rank, total, dtype), counts)
            reference = sum(rank_buffer(r, total, np.float64) for r in range(comm.size))
            where = f"reduce_scatter_v {np.dtype(dtype)} {pattern} on rank {comm.rank}"
            assert mine.dtype == dtype, f"{where}: got dtype {mine.dtype}"
            np.testing.assert_array_equal(mine, segment(reference, counts, comm.rank),
                                          err_msg=where)
        counts = count_patterns(comm.size)["uneven"]
        total = sum(counts)
        mine = comm.reduce_scatter_v(rank_floats(comm.rank, total, dtype), counts)
        terms = [rank_floats(r, total, dtype).astype(np.float64) for r in range(comm.size)]
        tolerance = {np.float64: 1e-13, np.float32: 1e-6, np.float16: 2.0 ** -11}[dtype]
        bound = tolerance * comm.size * segment(sum(np.abs(t) for t in terms), counts,
                                                comm.rank)
        error = np.abs(mine.astype(np.float64) - segment(sum(terms), counts, comm.rank))
        assert np.all(error <= bound), (f"reduce_scatter_v {np.dtype(dtype)} random floats on "
                                        f"rank {comm.rank}: error {error.max()} over bound")


def check_allgather_v(comm):
    for dtype in DTYPES:
        for pattern, counts in count_patterns(comm.size).items():
            gathered = comm.allgather_v(rank_floats(comm.rank, counts[comm.rank], dtype), counts)
            reference = np.concatenate(
                [rank_floats(r, counts[r], dtype) for r in range(comm.size)])
            np.testing.assert_array_equal(
                gathered, reference,
                err_msg=f"allgather_v {np.dtype(dtype)} {pattern} on rank {comm.rank}")
            assert gathered.dtype == dtype


def check_allreduce(comm):
    for dtype in DTYPES:
        mine = comm.allreduce(rank_buffer(comm.rank, 12, dtype).reshape(3, 4))
        reference = sum(rank_buffer(r, 12, np.float64) for r in range(comm.size)).reshape(3, 4)
        assert mine.shape == (3, 4) and mine.dtype == dtype
        np.testing.assert_array_equal(mine, reference, err_msg=f"allreduce {np.dtype(dtype)}")
        transposed = comm.allreduce(rank_buffer(comm.rank, 12, dtype).reshape(3, 4).T)
        np.testing.assert_array_equal(transposed, reference.T, err_msg="allreduce of a view")
    scalar = comm.allreduce(np.array(comm.rank + 1.0))
    assert scalar.shape == () and scalar == comm.size * (comm.size + 1) / 2, scalar


class TinyModel:
    """Three parameters registered out of name order; some grads missing on some ranks."""

    def __init__(self, rank):
        rng = np.random.default_rng(3000 + rank)
        self.params = {}
        for name, shape in (("/z/W", (3, 2)), ("/a/b", (4,)), ("/m/W", (2, 2, 2))):
            param = Parameter(rng.standard_normal(shape).astype(np.float32), name=name)
            if not (name == "/a/b" and rank % 2 == 1):
                param.grad = rng.standard_normal(shape).astype(np.float32)
            self.params[name] = param

    def namedparams(self):
        return iter(self.params.items())


def check_bcast_data(comm):
    model = TinyModel(comm.rank)
    arrays_before = {name: p.data for name, p in model.params.items()}
    comm.bcast_data(model)
    root_model = TinyModel(0)
    for name, param in model.params.items():
        assert param.data is arrays_before[name], f"bcast_data replaced {name} instead of copying"
        np.testing.assert_array_equal(param.data, root_model.params[name].data,
                                      err_msg=f"bcast_data {name} on rank {comm.rank}")


def check_multi_node_mean_grad(comm):
    model = TinyModel(comm.rank)
    comm.multi_node_mean_grad(model)
    for name, param in model.params.items():
        grads = [TinyModel(r).params[name].grad for r in range(comm.size)]
        reference = sum(np.zeros(param.shape) if g is None else g.astype(np.float64)
                        for g in grads) / comm.size
        assert param.grad.dtype == np.float32
        np.testing.assert_allclose(param.grad, reference, rtol=1e-6, atol=1e-7,
                                   err_msg=f"mean grad {name} on rank {comm.rank}")


def check_object_collectives(comm):
    last = comm.size - 1
    payload = {"step": 7, "owner": comm.rank, "note": "x" * comm.rank}
    received = comm.bcast_obj(payload, root=last)
    assert received == {"step": 7, "owner": last, "note": "x" * last}, received

    total = comm.allreduce_obj(float(comm.rank) + 0.5)
    assert total == sum(r + 0.5 for r in range(comm.size)), total
    array_total = comm.allreduce_obj(np.full(3, comm.rank + 1.0))
    np.testing.assert_array_equal(array_total, np.full(3, comm.size * (comm.size + 1) / 2))

    gathered = comm.gather_obj(("rank", comm.rank), root=last)
    if comm.rank == last:
        assert gathered == [("rank", r) for r in range(comm.size)], gathered
    else:
        assert gathered is None, gathered
    comm.barrier()


def check_bad_input_is_refused(comm):
    """Checked before any communication, so every rank raises and none is left waiting."""
    cases = [
        (lambda: comm.reduce_scatter_v(np.zeros(3), [1] * (comm.size + 1)), "counts has"),
        (lambda: comm.reduce_scatter_v(np.zeros(3), [4] + [0] * (comm.size - 1)),
         "sum(counts)"),
        (lambda: comm.reduce_scatter_v(np.zeros(3), [-1] + [0] * (comm.size - 1)),
         "counts[0] = -1 is not a non-negative integer"),
        (lambda: comm.reduce_scatter_v(np.zeros(3, np.int32), [3] + [0] * (comm.size - 1)),
         "dtype int32 is not supported"),
        (lambda: comm.allgather_v(np.zeros((2, 2)), [4] * comm.size), "must be 1-D"),
        (lambda: comm.allgather_v(np.zeros(2), [3] * comm.size), "sends 2 elements"),
        (lambda: comm.bcast_obj(1, root=comm.size), "is not a rank"),
    ]
    for call, message in cases:
        try:
            call()
        except (ValueError, TypeError) as error:
            assert message in str(error), f"expected {message!r} in {error!r}"
        else:
            raise AssertionError(f"bad input accepted (expected an error with {message!r})")


def check_stats_count_calls(comm):
    comm.reset_stats()
    comm.barrier()
    comm.allreduce(np.zeros(5, np.float32))
    comm.allreduce(np.zeros(5, np.float32))
    stats = comm.stats
    assert sorted(stats) == ["allreduce", "barrier"], stats
    assert stats["allreduce"]["calls"] == 2 and stats["barrier"]["calls"] == 1, stats
    assert stats["allreduce"]["seconds"] > 0, stats


def main():
    comm = create_communicator("mpi")
    for check in (check_reduce_scatter_v, check_allgather_v, check_allreduce, check_bcast_data,
                  check_multi_node_mean_grad, check_object_collectives,
                  check_bad_input_is_refused, check_stats_count_calls):
        check(comm)
    comm.barrier()
    if comm.rank == 0:
        print(f"collectives: all checks passed on {comm.size} ranks", flush=True)


if __name__ == "__main__":
    main()
