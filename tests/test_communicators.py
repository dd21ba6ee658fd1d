"""Communicators: real MPI jobs (mpiexec on the scripts in tests/mpi/) and the pure helpers."""
import importlib.util
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from kfac_mn.communicators import create_communicator, traffic
from kfac_mn.communicators import mpiexec as launcher

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MPI_SCRIPTS = REPO_ROOT / "tests" / "mpi"


def find_mpiexec():
    """The launcher of mpi4py's MPI library (kfac_mn.communicators.mpiexec), or None."""
    return None if importlib.util.find_spec("mpi4py") is None else launcher.find_mpiexec()


def mpi_library():
    """'mpich', 'openmpi' or 'other': the MPI library under these tests."""
    return launcher.mpi4py_library()


def mpi_command(ranks, argv, extra_env=None):
    """``(command, env)`` that starts ``argv`` on ``ranks`` processes with the launcher of
    mpi4py's library and the settings it needs; skips the test without one."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed")
    try:
        command, env = launcher.mpiexec_command(ranks, argv)
    except FileNotFoundError as error:
        pytest.skip(str(error))
    env.update(extra_env or {})
    return command, env


def run_mpi(script, ranks, *args, extra_env=None, timeout=60):
    """Run tests/mpi/<script> on ``ranks`` processes; (exit status, output, seconds).

    The launcher's settings (kfac_mn.communicators.mpiexec.mpiexec_command) avoid ssh and give
    one BLAS thread per rank, which keeps an oversubscribed machine responsive.  On timeout
    the whole process group (mpiexec and every rank) is killed.
    """
    command, env = mpi_command(ranks, [sys.executable, str(MPI_SCRIPTS / script), *args],
                               extra_env)
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
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_every_variable_count_algorithm_sums_and_counts_its_bytes(ranks):
    output = assert_job_passed("check_v_collectives.py", ranks)
    assert f"36 cases of native, two_phase, allreduce on {ranks} ranks match NumPy" in output


@pytest.mark.mpi
def test_32_ranks_with_resnet50_owner_segments():
    status, output, _ = run_mpi("check_v_collectives.py", 32, "resnet50", timeout=400)
    assert status == 0, output
    assert "on 32 ranks (ResNet-50 layout) match NumPy" in output


@pytest.mark.mpi
@pytest.mark.parametrize("layout, ranks, extra_env", [
    ("single-node", 2, {}),
    ("odd-even", 3, {"MPIR_CVAR_ODD_EVEN_CLIQUES": "1"}),
    ("odd-even", 4, {"MPIR_CVAR_ODD_EVEN_CLIQUES": "1"}),
])
def test_node_layout(layout, ranks, extra_env):
    if extra_env and mpi_library() != "mpich":
        pytest.skip("faking nodes needs MPICH's MPIR_CVAR_ODD_EVEN_CLIQUES; Open MPI has no "
                    "equivalent that runs on one machine")
    output = assert_job_passed("check_topology.py", ranks, layout, extra_env=extra_env)
    assert f"{layout} layout correct on {ranks} ranks" in output


@pytest.mark.mpi
def test_byte_accounting_matches_hand_computed_ring_model():
    output = assert_job_passed("check_traffic.py", 3)
    assert "matches the hand-computed ring model" in output


@pytest.mark.mpi
def test_half_precision_factors_up_to_1e6_do_not_overflow_over_4_ranks():
    output = assert_job_passed("check_half_factors.py", 4)
    assert "half factors:" in output


@pytest.mark.mpi
def test_uncaught_exception_on_one_rank_aborts_the_whole_job():
    status, output, seconds = run_mpi("check_abort.py", 3, timeout=30)
    assert status != 0, output
    assert seconds < 30
    assert "RuntimeError: rank 1 failed on purpose" in output, output
    assert "[rank 1/3] uncaught exception, aborting the MPI job" in output, output


@pytest.mark.mpi
def test_the_watchdog_names_the_collective_and_the_missing_rank_then_aborts():
    status, output, seconds = run_mpi("check_watchdog.py", 4, timeout=40)
    assert status == 4 and seconds < 15, (status, seconds, output)
    pattern = (r"watchdog on rank 0 of 4: no collective completed for 3 s \(--timeout 3\): "
               r"this rank is waiting in allreduce_obj \(call 4\) for 3 s\n"
               r"  ranks that did not arrive \(no answer within 0.75 s: stopped, hung or dead\): "
               r"1\n"
               r"  rank 2: working, not in a collective, for [34] s \(after collective call 3\)\n"
               r"  rank 3: waiting in allreduce_obj \(call 4\) for 3 s\n"
               r"  aborting the MPI job \(exit status 4\) without writing anything; the hint\n")
    assert re.search(pattern, output), output
    assert output.count("watchdog on rank") == 1, output
    assert "the fourth collective completed" not in output


# -- no MPI needed -------------------------------------------------------------------
def test_importing_the_package_does_not_initialize_mpi():
    code = ("import sys, kfac_mn.communicators, kfac_mn.distributed.triangles; "
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


def test_a_launcher_of_another_mpi_is_named_before_any_work():
    version = "Open MPI v4.1.4, package: Debian OpenMPI"
    with pytest.raises(launcher.LaunchMismatch, match=r"started by MPICH's mpiexec \(Hydra\) "
                                                       r"\(MPI_LOCALNRANKS is set\), but "
                                                       r"mpi4py's MPI library is Open MPI"):
        launcher.check_launcher(version, {"MPI_LOCALNRANKS": "2", "PMI_SIZE": "2"})
    with pytest.raises(launcher.LaunchMismatch, match="started by Open MPI's mpiexec"):
        launcher.check_launcher("MPICH Version: 5.0.2", {"OMPI_COMM_WORLD_SIZE": "2"})
    launcher.check_launcher(version, {"OMPI_COMM_WORLD_SIZE": "2"})  # matching
    launcher.check_launcher(version, {"PMI_SIZE": "2"})  # srun --mpi=pmi2 may start Open MPI
    with pytest.raises(launcher.LaunchMismatch) as error:
        launcher.check_launch(1, version, {"PMI_SIZE": "2", "PMI_RANK": "0"})
    message = str(error.value)
    assert message.startswith("this process was started by a PMI launcher such as MPICH's "
                              "mpiexec (Hydra) as one of 2 ranks (PMI_SIZE), but mpi4py's MPI "
                              "library (Open MPI) sees a world of 1"), message
    assert "Start the job with Open MPI's own mpiexec" in message
    with pytest.raises(launcher.LaunchMismatch, match=r"Open MPI's mpiexec as one of 4 ranks "
                                                       r"\(OMPI_COMM_WORLD_SIZE\), but mpi4py's "
                                                       r"MPI library \(MPICH\)"):
        launcher.check_launch(1, "MPICH Version: 4.2", {"OMPI_COMM_WORLD_SIZE": "4"})
    launcher.check_launch(2, version, {"PMI_SIZE": "2"})  # matching: nothing to say
    launcher.check_launch(1, version, {})                 # no launcher: a singleton
    assert launcher.launched_rank({"OMPI_COMM_WORLD_RANK": "3"}) == 3


def other_launcher():
    """A launcher of the other MPI library than mpi4py's, or None."""
    mine = mpi_library()
    candidates = [str(REPO_ROOT / ".venv" / "bin" / "mpiexec"), *(
        shutil.which(name) or "" for name in ("mpiexec.openmpi", "mpiexec.mpich", "mpiexec"))]
    return next((path for path in candidates if path and os.path.isfile(path)
                 and launcher.launcher_implementation(path) not in (None, mine)), None)


@pytest.mark.mpi
def test_the_launcher_of_another_mpi_is_caught_under_a_real_launch(tmp_path):
    other = other_launcher()
    if other is None:
        pytest.skip(f"no launcher of another MPI than mpi4py's ({mpi_library()}) here")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), HYDRA_LAUNCHER="fork",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run([other, "-n", "2", sys.executable, str(REPO_ROOT / "train_imagenet.py"),
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    # caught before MPI_Init (the launcher's own variable), or after it (a world of 1)
    assert re.search(r"train_imagenet.py: error: this process was started by (Open MPI's|"
                     r"MPICH's|a PMI) .*, but mpi4py's MPI library .* the launcher belongs to "
                     r"another MPI\. Start the job with (MPICH|Open MPI)'s own mpiexec", output), \
        output
    assert not (tmp_path / "out").exists()


def test_the_launcher_matches_mpi4py_and_says_what_it_needs():
    if find_mpiexec() is None:
        pytest.skip("no launcher of mpi4py's MPI library")
    assert launcher.launcher_implementation(find_mpiexec()) == mpi_library()
    command, env = launcher.mpiexec_command(64, ["python", "x.py"])
    assert command[1:3] == ["-n", "64"] and command[-2:] == ["python", "x.py"]
    assert env["OPENBLAS_NUM_THREADS"] == "1" and str(REPO_ROOT) in env["PYTHONPATH"]
    if mpi_library() == "openmpi":
        assert "--oversubscribe" in command and env["OMPI_MCA_odls_base_sigkill_timeout"]
        assert ("OMPI_ALLOW_RUN_AS_ROOT" in env) == (os.geteuid() == 0)
    else:
        assert env["HYDRA_LAUNCHER"] == "fork" and "--oversubscribe" not in command
