"""Give each MPI rank's BLAS its share of the node's cores (call before NumPy is imported).

Several ranks on one node each start a BLAS thread pool as large as the node; on a small
machine the pools then fight over the cores and every GEMM slows down.  Unless the user set
the thread counts, this sets them to ``cores // ranks on this node`` (at least 1), reading
the node-local rank count that the MPI launcher exports.
"""
import os

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: ranks on this node, as MPICH's Hydra and Open MPI export them
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def share_cores_between_ranks(environ=os.environ):
    """Set the unset thread-count variables; returns the threads per rank (None: unchanged)."""
    local_size = next((int(environ[name]) for name in LOCAL_SIZE_VARIABLES if name in environ),
                      None)
    if local_size is None or local_size < 2:
        return None
    threads = max(1, (os.cpu_count() or 1) // local_size)
    for name in THREAD_VARIABLES:
        environ.setdefault(name, str(threads))
    return threads
