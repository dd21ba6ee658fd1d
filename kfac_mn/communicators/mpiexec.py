"""The launcher that matches mpi4py's MPI library: finding it, starting jobs with it, and
catching a mismatch.

mpi4py runs on whichever MPI library it finds (the ``mpich`` wheel of the ``mpich`` extra, or
the system's Open MPI or MPICH).  Each library's ranks must be started by its own process
manager: MPICH's ``mpiexec`` (Hydra) with an Open MPI mpi4py, or the reverse, starts N
separate one-rank jobs that would write one output folder.  So:

- :func:`mpi4py_library` asks mpi4py (in a child process, so that this one does not initialise
  MPI) which library it uses: ``'mpich'``, ``'openmpi'`` or ``'other'``;
- :func:`find_mpiexec` returns the first launcher of that library: the one beside this Python
  (the ``mpich`` wheel), then ``mpiexec``, ``mpirun`` and the Debian names on PATH;
- :func:`mpiexec_command` builds the command line and environment each library needs: Hydra's
  fork launcher (no ssh) for MPICH; for Open MPI ``--oversubscribe`` where the ranks exceed the
  cores, the root variables only when running as root, and a 3 s grace between the SIGTERM it
  forwards and its SIGKILL (``odls_base_sigkill_timeout``, 1 s by default) so that a stopped
  run can write its checkpoint; one BLAS thread per rank and this checkout on PYTHONPATH;
- :func:`init_mpi` (called by ``create_communicator``) initialises MPI only after checking
  that the launcher that started this process (Open MPI's, by its ``OMPI_*`` variables, or
  MPICH's Hydra, by ``MPI_LOCALNRANKS``) belongs to mpi4py's library: MPICH under Open MPI's
  launcher would abort inside ``MPI_Init`` ("unsupported PMI version PMIx");
- :func:`check_launch` stops a rank that a launcher started as one of N but whose MPI sees a
  world of 1, saying what to use instead.
"""
import functools
import os
import pathlib
import shutil
import subprocess
import sys

#: how each process manager tells a rank the size of its job
LAUNCHER_SIZE_VARIABLES = (("PMI_SIZE", "a PMI launcher such as MPICH's mpiexec (Hydra)"),
                           ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpiexec"))
#: how each process manager tells a rank its rank
LAUNCHER_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
CANDIDATES = ("mpiexec", "mpirun", "mpiexec.hydra", "mpiexec.mpich", "mpiexec.openmpi",
              "mpirun.openmpi")
NAMES = {"mpich": "MPICH", "openmpi": "Open MPI", "other": "another MPI"}
#: seconds Open MPI's mpiexec waits between forwarding SIGTERM and sending SIGKILL (its
#: default is 1).  It also delays every abort by as much, so it stays short here: enough for
#: the checkpoints of the runs these commands start (tests, scripts); see README for a
#: ResNet-50 run's
OPENMPI_STOP_GRACE = 3


class LaunchMismatch(RuntimeError):
    """The launcher and mpi4py's MPI library do not belong together."""


def _implementation(version_text):
    text = version_text.lower()
    if "open mpi" in text or "openrte" in text:
        return "openmpi"
    if "mpich" in text or "hydra" in text:
        return "mpich"
    return "other"


@functools.lru_cache(maxsize=None)
def mpi4py_library(python=sys.executable):
    """``'mpich'``, ``'openmpi'`` or ``'other'``: the MPI library mpi4py uses under ``python``
    (None without mpi4py)."""
    code = ("import mpi4py; mpi4py.rc.initialize = False; from mpi4py import MPI; "
            "print(MPI.Get_library_version())")
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _implementation(done.stdout) if done.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def launcher_implementation(mpiexec):
    """The library whose process manager ``mpiexec`` is (from ``mpiexec --version``)."""
    try:
        done = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _implementation(done.stdout + done.stderr)


def _candidates():
    beside_python = pathlib.Path(sys.executable).parent / "mpiexec"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        yield str(beside_python)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            yield found


def find_mpiexec():
    """The first launcher that belongs to mpi4py's MPI library, or None."""
    library = mpi4py_library()
    return next((path for path in _candidates() if launcher_implementation(path) == library),
                None)


def missing_launcher_message(what):
    library = mpi4py_library()
    if library is None:
        return f"mpi4py is not installed (pip install mpi4py mpich) to run {what}"
    found = [f"{path} ({NAMES.get(launcher_implementation(path), 'unknown')})"
             for path in dict.fromkeys(_candidates())]
    advice = ("pip install mpich (the mpich extra)" if library == "mpich" else
              "install Open MPI's mpiexec (Debian: apt install openmpi-bin)")
    return (f"mpi4py uses {NAMES[library]}, and no {NAMES[library]} mpiexec was found "
            f"({', '.join(found) or 'no mpiexec at all'}) to run {what}; {advice}")


def inside_mpi_job():
    """Was this process started by a launcher (MPICH's, Open MPI's or another PMI one)?"""
    return any(name in os.environ for name, _ in LAUNCHER_SIZE_VARIABLES)


def launched_rank(environ=os.environ):
    """This process's rank as the launcher set it (None outside a job)."""
    return next((int(environ[name]) for name in LAUNCHER_RANK_VARIABLES if name in environ),
                None)


def mpiexec_command(ranks, argv, environ=os.environ):
    """``(command, env)`` that runs ``argv`` on ``ranks`` processes with the launcher of
    mpi4py's library (see the module docstring); raises FileNotFoundError naming what is
    missing."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise FileNotFoundError(missing_launcher_message(" ".join(map(str, argv[:2]))))
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environ.get("PYTHONPATH")]))
    command = [mpiexec, "-n", str(ranks)]
    if launcher_implementation(mpiexec) == "openmpi":
        if ranks > (os.cpu_count() or 1):
            command.append("--oversubscribe")
        env.setdefault("OMPI_MCA_odls_base_sigkill_timeout", str(OPENMPI_STOP_GRACE))
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    else:
        env["HYDRA_LAUNCHER"] = "fork"
    return command + [str(arg) for arg in argv], env


def run_under_mpiexec(ranks, script, args, timeout=None, capture=False):
    """Run ``python script *args`` on ``ranks`` processes; returns the CompletedProcess.

    ``capture`` collects stdout (stderr still goes to the terminal).  The repository root
    (the parent of ``kfac_mn``) is put on PYTHONPATH so that the ranks import this checkout.
    """
    command, env = mpiexec_command(ranks, [sys.executable, str(script), *args])
    return subprocess.run(command, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None)


#: a variable only each launcher sets, and the library it belongs to
LAUNCHER_MARKERS = (("OMPI_COMM_WORLD_SIZE", "openmpi", "Open MPI's mpiexec"),
                    ("MPI_LOCALNRANKS", "mpich", "MPICH's mpiexec (Hydra)"))


def _advice(library):
    return (f"Start the job with {library}'s own mpiexec, or install mpi4py for the "
            "launcher's MPI (for MPICH: pip install mpich; for Open MPI: a virtual environment "
            "without the mpich wheel, whose mpi4py then loads the system's Open MPI)")


def check_launcher(library_version, environ=os.environ):
    """Before ``MPI_Init``: raise :class:`LaunchMismatch` when the launcher that started this
    process belongs to another MPI library than ``library_version`` (mpi4py's)."""
    library = _implementation(library_version)
    for variable, owner, launcher in LAUNCHER_MARKERS:
        if variable in environ and library != owner:
            raise LaunchMismatch(
                f"this process was started by {launcher} ({variable} is set), but mpi4py's "
                f"MPI library is {NAMES[library]}: the launcher belongs to another MPI. "
                + _advice(NAMES[library]))


def init_mpi(environ=os.environ):
    """mpi4py's ``MPI`` module with MPI initialised (``THREAD_MULTIPLE``), after
    :func:`check_launcher`; a no-op where MPI is already up."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False  # first the check, then MPI_Init
        mpi4py.rc.finalize = True
    from mpi4py import MPI

    if not MPI.Is_initialized():
        check_launcher(MPI.Get_library_version(), environ)
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    return MPI


def check_launch(world_size, library_version, environ=os.environ):
    """Raise :class:`LaunchMismatch` when a launcher started this process as one of N > 1
    ranks but its MPI sees a world of ``world_size`` 1: the launcher belongs to another MPI
    library than mpi4py's (``library_version``: ``MPI.Get_library_version()``)."""
    for variable, launcher in LAUNCHER_SIZE_VARIABLES:
        expected = environ.get(variable)
        if expected is None or not expected.isdigit() or int(expected) <= world_size:
            continue
        library = NAMES[_implementation(library_version)]
        raise LaunchMismatch(
            f"this process was started by {launcher} as one of {expected} ranks ({variable}), "
            f"but mpi4py's MPI library ({library}) sees a world of {world_size}: the launcher "
            f"belongs to another MPI. " + _advice(library))
