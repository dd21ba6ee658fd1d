"""One BLAS-thread policy for every process: one BLAS thread, and parallelism from ranks.

A BLAS thread pool as large as the machine, in each of several processes (the ranks of a node,
or one process on a machine shared with others), makes the pools fight over the cores, and
OpenBLAS's spinning threads then slow every GEMM down, by orders of magnitude on a loaded
machine.  Even alone, this project's GEMMs are too small to gain from threads: on an idle
2-core machine one ``python train_imagenet.py`` took 92 s with two BLAS threads and 58 s with
one, README's own-model example 5.6 s and 3.0 s.  So unless the user set the thread counts,
:func:`share_cores_between_ranks` gives each process one thread, and never more than its share
of the cores it may use (its CPU affinity and its control group's CPU quota, divided by the
ranks the MPI launcher says run on this node).  To use more cores, start more ranks
(``mpiexec -n <cores>``), or set ``OPENBLAS_NUM_THREADS`` yourself.  It must run before NumPy is
imported: ``train_imagenet.py`` calls it first thing, and a script of one's own does the same::

    from utils.training.blas_threads import share_cores_between_ranks
    share_cores_between_ranks()
    import numpy  # noqa: E402 (and everything that imports it)
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


def share_cores_between_ranks(environ=os.environ, cores=None, per_process=1):
    """Set the unset thread-count variables to ``per_process`` threads, at most this process's
    share of ``cores`` (default: :func:`usable_cores`) and at least 1; returns the count."""
    local_size = next((int(environ[name]) for name in LOCAL_SIZE_VARIABLES if name in environ),
                      1)
    cores = usable_cores() if cores is None else cores
    threads = max(1, min(per_process, cores // max(1, local_size)))
    for name in THREAD_VARIABLES:
        environ.setdefault(name, str(threads))
    return threads
