"""Communicators: real MPI jobs (mpiexec on the scripts in tests/mpi/) and the pure helpers."""
import importlib.util
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kfac_mn.communicators import create_communicator, packing, traffic

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MPI_SCRIPTS = REPO_ROOT / "tests" / "mpi"


def find_mpiexec():
    """The mpiexec installed next to this Python (pip's mpich), else the one on PATH."""
    beside_python = pathlib.Path(sys.executable).parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("mpiexec")


def run_mpi(script, ranks, *args, extra_env=None, timeout=60):
    """Run tests/mpi/<script> on ``ranks`` processes; (exit status, output, seconds).

    Hydra's fork launcher avoids ssh; one BLAS thread per rank keeps an oversubscribed
    machine responsive.  On timeout the whole process group (mpiexec and every rank) is killed.
    """
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip(f"no mpiexec next to {sys.executable} or on PATH "
                    "(pip install mpich, or the 'test' extra)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    env = dict(os.environ, HYDRA_LAUNCHER="fork", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [mpiexec, "-n", str(ranks), sys.executable, str(MPI_SCRIPTS / script), *args]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} did not finish within {timeout} s:\n{output}")
    return process.returncode, output, time.monotonic() - start


def assert_job_passed(script, ranks, *args, extra_env=None):
    status, output, _ = run_mpi(script, ranks, *args, extra_env=extra_env)
    assert status == 0, f"{script} on {ranks} ranks exited with {status}:\n{output}"
    return output


# -- real MPI jobs --------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_collectives_match_numpy_references(ranks):
    output = assert_job_passed("check_collectives.py", ranks)
    assert f"all checks passed on {ranks} ranks" in output


@pytest.mark.mpi
@pytest.mark.parametrize("layout, ranks, extra_env", [
    ("single-node", 2, {}),
    ("odd-even", 3, {"MPIR_CVAR_ODD_EVEN_CLIQUES": "1"}),
    ("odd-even", 4, {"MPIR_CVAR_ODD_EVEN_CLIQUES": "1"}),
])
def test_node_layout(layout, ranks, extra_env):
    output = assert_job_passed("check_topology.py", ranks, layout, extra_env=extra_env)
    assert f"{layout} layout correct on {ranks} ranks" in output


@pytest.mark.mpi
def test_byte_accounting_matches_hand_computed_ring_model():
    output = assert_job_passed("check_traffic.py", 3)
    assert "matches the hand-computed ring model" in output


@pytest.mark.mpi
def test_half_precision_factors_up_to_1e6_do_not_overflow_over_4_ranks(capsys):
    output = assert_job_passed("check_half_factors.py", 4)
    assert "half factors:" in output
    with capsys.disabled():
        print("\n" + output.strip())


@pytest.mark.mpi
def test_uncaught_exception_on_one_rank_aborts_the_whole_job():
    status, output, seconds = run_mpi("check_abort.py", 3, timeout=30)
    assert status != 0, output
    assert seconds < 30
    assert "RuntimeError: rank 1 failed on purpose" in output, output
    assert "[rank 1/3] uncaught exception, aborting the MPI job" in output, output


# -- no MPI needed -------------------------------------------------------------------
def test_importing_the_package_does_not_initialize_mpi():
    code = ("import sys, kfac_mn.communicators, kfac_mn.communicators.packing; "
            "sys.exit('mpi4py' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0


def test_unknown_communicator_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown communicator 'nccl2'; valid names: mpi"):
        create_communicator("nccl2")


def test_ring_formulas_for_equal_segments_move_p_minus_1_over_p():
    # P = 4, four segments of 16 bytes, B = 64: (P - 1) / P * B = 48 each way, for every rank.
    for rank in range(4):
        assert traffic.ring_reduce_scatter_bytes([16] * 4, rank) == (48, 48)
        assert traffic.ring_allgather_bytes([16] * 4, rank) == (48, 48)
        # 16 float32 = 64 bytes all-reduced: 2 (P - 1) / P * B = 96.
        assert traffic.ring_allreduce_bytes(16, 4, 4, rank) == (96, 96)


def test_ring_formulas_for_uneven_segments_and_chain_bcast():
    # Segments [10, 0, 30, 20] bytes, B = 60.
    assert traffic.ring_reduce_scatter_bytes([10, 0, 30, 20], 0) == (50, 40)  # B-s0, B-s3
    assert traffic.ring_reduce_scatter_bytes([10, 0, 30, 20], 1) == (60, 50)  # B-s1, B-s0
    assert traffic.ring_allgather_bytes([10, 0, 30, 20], 0) == (60, 50)  # B-s1, B-s0
    assert traffic.ring_allgather_bytes([10, 0, 30, 20], 3) == (50, 40)  # B-s0, B-s3
    # 7 float64 over 3 ranks: segments 3/2/2 elements = [24, 16, 16] bytes, B = 56.
    assert traffic.ring_allreduce_bytes(7, 8, 3, 0) == (32 + 40, 40 + 32)
    # Chain 2 -> 3 -> 0 -> 1 for 100 bytes.
    assert [traffic.chain_bcast_bytes(100, 4, r, root=2) for r in range(4)] == [
        (100, 100), (0, 100), (100, 0), (100, 100)]
    assert traffic.ring_allreduce_bytes(1000, 4, 1, 0) == (0, 0)
    assert traffic.chain_bcast_bytes(1000, 1, 0, 0) == (0, 0)


def test_upper_triangle_is_row_major_and_round_trips_exactly():
    matrix = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    np.testing.assert_array_equal(packing.pack_upper_triangle(matrix), [1, 2, 3, 4, 5, 6])
    rng = np.random.default_rng(0)
    for d in (0, 1, 2, 7, 33):
        x = rng.standard_normal((d, d + 3))
        factor = x @ x.T / 3.0
        packed = packing.pack_upper_triangle(factor)
        assert packed.shape == (d * (d + 1) // 2,)
        unpacked = packing.unpack_upper_triangle(packed, d)
        assert unpacked.dtype == np.float64
        np.testing.assert_array_equal(unpacked, factor)


def test_triangle_helpers_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"expected a square matrix, got shape \(2, 3\)"):
        packing.pack_upper_triangle(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"a 3x3 triangle has 6 values, got .* \(5,\)"):
        packing.unpack_upper_triangle(np.zeros(5), 3)


def test_half_scale_is_the_largest_safe_power_of_two():
    for max_abs in (1e-9, 0.3, 1.0, 65504.0, 1e6, 3.7e12):
        for world_size in (1, 3, 4, 1024):
            scale = packing.half_scale(max_abs, world_size)
            assert math.log2(scale) == int(math.log2(scale))
            assert world_size * max_abs * scale <= packing.FLOAT16_SUM_LIMIT
            assert world_size * max_abs * scale * 2 > packing.FLOAT16_SUM_LIMIT
    assert packing.half_scale(0.0, 8) == 1.0
    with pytest.raises(ValueError, match="inf or nan"):
        packing.half_scale(float("inf"), 2)


def test_half_round_trip_on_one_rank_is_within_float16_rounding():
    buffer = np.random.default_rng(1).standard_normal(1000) * 1e6
    half, scale = packing.to_half_scaled(buffer, world_size=1)
    assert half.dtype == np.float16 and np.all(np.isfinite(half))
    restored = packing.from_half_scaled(half, scale, np.float32)
    assert restored.dtype == np.float32
    assert np.max(np.abs(restored - buffer) / np.abs(buffer)) <= 2.0 ** -11


def test_to_half_scaled_refuses_a_max_below_the_buffer_and_integer_buffers():
    with pytest.raises(ValueError, match="pass the maximum over all ranks"):
        packing.to_half_scaled(np.array([1.0, -5.0]), 2, max_abs=4.0)
    with pytest.raises(TypeError, match="floating-point buffer, got int64"):
        packing.to_half_scaled(np.arange(3, dtype=np.int64), 2)
