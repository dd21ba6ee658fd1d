"""Start a script on several ranks from a plain ``python script.py`` call.

The scripts in ``scripts/`` that need MPI re-run themselves under ``mpiexec`` when they are
not already part of an MPI job, so ``python scripts/trace_dataflow.py`` just works.  Hydra's
fork launcher (no ssh) and one BLAS thread per rank keep a shared machine responsive.
"""
import os
import pathlib
import shutil
import subprocess
import sys

_JOB_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def find_mpiexec():
    """The mpiexec installed next to this Python (pip's mpich), else the one on PATH."""
    beside_python = pathlib.Path(sys.executable).parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("mpiexec")


def inside_mpi_job():
    """Was this process started by mpiexec (MPICH's or Open MPI's process manager)?"""
    return any(name in os.environ for name in _JOB_VARIABLES)


def run_under_mpiexec(ranks, script, args, timeout=None, capture=False):
    """Run ``python script *args`` on ``ranks`` processes; returns the CompletedProcess.

    ``capture`` collects stdout (stderr still goes to the terminal).  The repository root
    (the parent of ``kfac_mn``) is put on PYTHONPATH so that the ranks import this checkout.
    """
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise FileNotFoundError(f"no mpiexec next to {sys.executable} or on PATH; install "
                                f"mpich (pip install mpich) to run {script} on {ranks} ranks")
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, HYDRA_LAUNCHER="fork", OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [mpiexec, "-n", str(ranks), sys.executable, str(script), *args]
    return subprocess.run(command, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None)
