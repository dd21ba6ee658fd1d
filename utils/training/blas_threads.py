"""One BLAS-thread policy for every process: its share of the cores it may use.

A BLAS thread pool as large as the machine, in each of several processes (the ranks of a node,
or one process on a machine shared with others), makes the pools fight over the cores, and
OpenBLAS's spinning threads then slow every GEMM down by orders of magnitude.  Unless the user
set the thread counts, :func:`share_cores_between_ranks` sets them to

    usable cores // processes of this job on this node   (at least 1)

where the usable cores are those this process may run on (its CPU affinity, and the CPU quota
of its control group, as containers set it) and the processes are the ranks that the MPI
launcher says run on this node (1 without a launcher).  It must run before NumPy is imported:
``train_imagenet.py`` calls it first thing, and a script of one's own does the same::

    from utils.training.blas_threads import share_cores_between_ranks
    share_cores_between_ranks()
    import numpy  # noqa: E402 (and everything that imports it)

On a machine that other jobs keep busy, give the count yourself (``OPENBLAS_NUM_THREADS=1``).
"""
import math
import os

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: ranks on this node, as MPICH's Hydra and Open MPI export them
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def usable_cores(cpu_max_path=CGROUP_CPU_MAX):
    """The cores this process may use: its affinity, capped by a cgroup (v2) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        with open(cpu_max_path, encoding="ascii") as stream:
            quota, period = stream.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def share_cores_between_ranks(environ=os.environ, cores=None):
    """Set the unset thread-count variables to this process's share of ``cores`` (default:
    :func:`usable_cores`); returns the threads per process."""
    local_size = next((int(environ[name]) for name in LOCAL_SIZE_VARIABLES if name in environ),
                      1)
    cores = usable_cores() if cores is None else cores
    threads = max(1, cores // max(1, local_size))
    for name in THREAD_VARIABLES:
        environ.setdefault(name, str(threads))
    return threads
