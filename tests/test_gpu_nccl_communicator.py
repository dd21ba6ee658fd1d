"""NcclCommunicator: the clear failure without CuPy/NCCL/GPU, the variable-count choice and
padding (both backends), and, on a GPU, every collective at world size 1 (in this process,
or under ``mpiexec -n 1`` as scripts/gpu_check.sh runs it), then one distributed K-FAC step.
"""
import numpy as np
import pytest

from kfac_mn import backend
from kfac_mn import functions as F
from kfac_mn.communicators import create_communicator
from kfac_mn.communicators.nccl_communicator import NcclCommunicator
from kfac_mn.communicators.padding import pad_segments, unpad_segments
from kfac_mn.communicators.v_collectives import choose
from kfac_mn.optimizers import KFAC, DistributedKFAC
from tests.kfac_models import ConvNet

DTYPES = (np.float16, np.float32, np.float64)


def host(array):
    return backend.to_cpu(array)


# -- no GPU needed ------------------------------------------------------------------------
@pytest.mark.parametrize("cupy_available,nccl,gpu,message", [
    (False, None, False, r"needs CuPy with NCCL, and CuPy is not installed \(pip install "
                         r"'kfac_mn\[gpu\]' or cupy-cudaXXx\); on the CPU use "
                         r"create_communicator\('mpi'\)"),
    (True, None, True, r"needs NCCL, and this CuPy has no NCCL support \(cupy.cuda.nccl."
                       r"available is False"),
    (True, object(), False, r"needs a CUDA device, and none is visible; on the CPU use "
                            r"create_communicator\('mpi'\)"),
])
def test_nccl_communicator_says_what_is_missing(monkeypatch, cupy_available, nccl, gpu,
                                                message):
    monkeypatch.setattr(backend, "cupy_available", cupy_available)
    monkeypatch.setattr(backend, "load_nccl", lambda: nccl)
    monkeypatch.setattr(backend, "gpu_available", lambda: gpu)
    with pytest.raises(RuntimeError, match=r"create_communicator\('nccl'\) " + message):
        create_communicator("nccl")


def test_uneven_counts_are_padded_unless_an_allreduce_moves_less():
    """NCCL's 'native' pads every segment to the largest; with no per-message cost 'auto'
    pads iff P * width <= 2 B, the bytes of an all-reduce."""
    def plan(counts):
        return choose("reduce_scatter_v", counts, 4, 0.0, 1.0,
                      NcclCommunicator.auto_algorithms)

    # two_phase runs on NCCL when asked for; auto leaves it out until measured on GPUs
    assert NcclCommunicator.v_algorithms == ("native", "two_phase", "allreduce")
    assert NcclCommunicator.auto_algorithms == ("native", "allreduce")
    assert plan([5, 5, 5, 5]) == "native"
    assert plan([3, 4, 5]) == "native"         # 15 <= 24
    assert plan([10, 0, 0, 0]) == "allreduce"  # 40 > 20
    assert plan([8, 0]) == "native"            # 16 <= 16
    assert plan([9, 1, 0]) == "allreduce"      # 27 > 20
    assert plan([7]) == "native"               # one rank
    assert plan([0, 0]) == "native"


def test_padding_places_each_segment_at_its_slot_and_unpadding_restores_it(xp):
    counts = [2, 0, 3, 1]
    buffer = xp.arange(1, 7, dtype=np.float32)
    padded = pad_segments(xp, buffer, counts, 3)
    np.testing.assert_array_equal(host(padded), [1, 2, 0, 0, 0, 0, 3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(host(unpad_segments(xp, padded, counts, 3)), host(buffer))
    empty = unpad_segments(xp, xp.zeros(0, dtype=np.float16), [0, 0], 0)
    assert empty.shape == (0,) and empty.dtype == np.float16


# -- world size 1 on a GPU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def comm():
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA device")
    return create_communicator("nccl")


@pytest.mark.gpu
def test_nccl_topology_and_device(comm):
    from kfac_mn.communicators.nccl_communicator import NcclCommunicator

    assert isinstance(comm, NcclCommunicator)
    assert (comm.rank, comm.size, comm.intra_rank, comm.intra_size) == (0, 1, 0, 1)
    assert backend.cupy.cuda.Device().id == comm.device.id == comm.intra_rank


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nccl_array_collectives_at_world_size_1(comm, dtype):
    cupy = backend.cupy
    values = np.random.default_rng(0).standard_normal(11).astype(dtype)
    comm.reset_stats()
    for counts in ([11], [0]):
        send = cupy.asarray(values[:counts[0]])
        received = comm.reduce_scatter_v(send, counts)
        assert isinstance(received, cupy.ndarray) and received.dtype == dtype
        np.testing.assert_array_equal(host(received), values[:counts[0]])
        gathered = comm.allgather_v(send, counts)
        assert isinstance(gathered, cupy.ndarray) and gathered.dtype == dtype
        np.testing.assert_array_equal(host(gathered), values[:counts[0]])
    summed = comm.allreduce(cupy.asarray(values[:10]).reshape(2, 5))
    assert summed.shape == (2, 5) and summed.dtype == dtype
    np.testing.assert_array_equal(host(summed), values[:10].reshape(2, 5))
    stats = comm.stats
    assert {name: totals["calls"] for name, totals in stats.items()} == {
        "allgather_v": 2, "allreduce": 1, "reduce_scatter_v": 2}
    assert all(totals["bytes_sent"] == totals["bytes_received"] == 0
               for totals in stats.values())  # one rank: the ring moves nothing
    on_host = comm.reduce_scatter_v(values, [11])  # host buffers go over MPI
    assert isinstance(on_host, np.ndarray)
    np.testing.assert_array_equal(on_host, values)


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", NcclCommunicator.v_algorithms)
def test_nccl_variable_count_algorithms_at_world_size_1(algorithm):
    if not backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA device")
    cupy = backend.cupy
    comm = create_communicator("nccl", collectives=algorithm)
    values = np.random.default_rng(1).standard_normal(13).astype(np.float32)
    for counts in ([13], [0]):
        send = cupy.asarray(values[:counts[0]])
        np.testing.assert_array_equal(host(comm.reduce_scatter_v(send, counts)),
                                      values[:counts[0]])
        np.testing.assert_array_equal(host(comm.allgather_v(send, counts)),
                                      values[:counts[0]])
    assert {name: totals["algorithms"] for name, totals in comm.stats.items()} == {
        "allgather_v": {algorithm: 2}, "reduce_scatter_v": {algorithm: 2}}


@pytest.mark.gpu
def test_nccl_collectives_refuse_bad_buffers(comm):
    cupy = backend.cupy
    with pytest.raises(TypeError, match=r"reduce_scatter_v: dtype int32 is not supported"):
        comm.reduce_scatter_v(cupy.zeros(3, dtype=np.int32), [3])
    with pytest.raises(ValueError, match=r"allgather_v: sendbuf must be 1-D, got shape"):
        comm.allgather_v(cupy.zeros((2, 2), dtype=np.float32), [4])
    with pytest.raises(ValueError, match=r"sendbuf has 3 elements but sum\(counts\) is 4"):
        comm.reduce_scatter_v(cupy.zeros(3, dtype=np.float32), [4])
    with pytest.raises(ValueError, match=r"counts has 2 entries but the communicator has 1"):
        comm.allgather_v(cupy.zeros(3, dtype=np.float32), [3, 0])


@pytest.mark.gpu
def test_nccl_model_collectives_keep_one_rank_s_values(comm):
    np.random.seed(1)
    model = ConvNet().to_gpu()
    data = {path: host(p.data) for path, p in model.namedparams()}
    for param in model.params():
        param.grad = param.data * 2
    comm.bcast_data(model)
    comm.multi_node_mean_grad(model)
    for path, param in model.namedparams():
        np.testing.assert_array_equal(host(param.data), data[path])
        np.testing.assert_array_equal(host(param.grad), data[path] * 2)
    assert comm.bcast_obj({"a": 1}) == {"a": 1}
    assert comm.allreduce_obj(2.5) == 2.5
    assert comm.gather_obj("x") == ["x"]
    comm.barrier()


def one_step(optimizer, module, x, t):
    """The update (host copy) of a fresh ConvNet on ``module``'s arrays after one step."""
    np.random.seed(3)
    model = ConvNet()
    if module is not np:
        model.to_gpu()
    start = {path: host(p.data).copy() for path, p in model.namedparams()}
    optimizer.setup(model)
    optimizer.update(lambda a, b: F.softmax_cross_entropy(model(a), b), module.asarray(x),
                     module.asarray(t))
    return {path: host(p.data) - start[path] for path, p in model.namedparams()}


def assert_updates_close(actual, expected, tolerance):
    for path, value in expected.items():
        np.testing.assert_allclose(actual[path], value, rtol=tolerance,
                                   atol=tolerance * np.abs(value).max(), err_msg=path)


@pytest.mark.gpu
@pytest.mark.parametrize("comm_dtype,tolerance", [(np.float32, 1e-4), (np.float16, 3e-2)])
def test_distributed_kfac_over_nccl_takes_the_single_process_step(comm, comm_dtype,
                                                                  tolerance):
    """float16 communication rounds gradients and factors (relative 2^-11 each), which the
    inverses amplify: on this model the update moves by up to about 1 % (measured on the
    CPU over MPI), hence the looser tolerance; the NCCL and MPI paths of the same float16
    step agree much more closely."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 2, 7, 7)).astype(np.float32)
    t = rng.integers(0, 5, 8).astype(np.int32)
    settings = {"lr": 0.05, "damping": 0.1}
    over_nccl = one_step(DistributedKFAC(comm, comm_dtype=comm_dtype, **settings),
                         backend.cupy, x, t)
    assert_updates_close(over_nccl, one_step(KFAC(**settings), backend.cupy, x, t), tolerance)
    over_mpi = one_step(DistributedKFAC(comm, comm_dtype=comm_dtype, **settings), np, x, t)
    assert_updates_close(over_nccl, over_mpi, min(tolerance, 5e-3))
