"""Communicators for distributed K-FAC, named after the MPI operations they perform.

``create_communicator`` is the one entry point: ``'mpi'`` (host buffers; CuPy arrays are
staged through the host) or ``'nccl'`` (CuPy arrays over NCCL on the GPUs, MPI for the rest).
mpi4py is imported only when a communicator is created (or the abort hook installed), so
importing this package neither initializes MPI nor needs it.
"""
from kfac_mn import backend
from kfac_mn.communicators.abort_on_exception import install_abort_on_exception
from kfac_mn.communicators.communicator_base import CommunicatorBase  # noqa: F401
from kfac_mn.communicators.mpiexec import LaunchMismatch, check_launch, init_mpi  # noqa: F401

COMMUNICATOR_NAMES = ("mpi", "nccl")


class NcclUnavailable(RuntimeError):
    """What the NCCL communicator needs is missing; ``reason`` says what, without advice."""

    def __init__(self, reason):
        super().__init__(f"create_communicator('nccl') needs {reason}; on the CPU use "
                         "create_communicator('mpi')")
        self.reason = reason


def require_nccl():
    """CuPy's NCCL module, or :class:`NcclUnavailable` saying what is missing (checked before
    MPI starts)."""
    if not backend.cupy_available:
        raise NcclUnavailable("CuPy with NCCL, and CuPy is not installed (pip install "
                              "'kfac_mn[gpu]' or cupy-cudaXXx)")
    nccl = backend.load_nccl()
    if nccl is None:
        raise NcclUnavailable("NCCL, and this CuPy has no NCCL support "
                              "(cupy.cuda.nccl.available is False; install NCCL, e.g. pip "
                              "install nvidia-nccl-cu12)")
    if not backend.gpu_available():
        raise NcclUnavailable("a CUDA device, and none is visible")
    return nccl


def create_communicator(name="mpi", mpi_comm=None, **collective_options):
    """Create the communicator called ``name`` over ``mpi_comm`` (default: COMM_WORLD).

    ``collective_options``: ``collectives`` (the variable-count algorithm: 'auto', default,
    'native', 'two_phase' or 'allreduce'; see :mod:`kfac_mn.communicators.v_collectives`),
    ``alpha`` and ``bandwidth`` (what 'auto' assumes of the network).  With more than one
    rank, an uncaught exception on any rank then aborts the whole job (see
    :func:`install_abort_on_exception`).  A process that a launcher started as one of N ranks
    but whose MPI sees a world of 1 raises :class:`LaunchMismatch` (the launcher belongs to
    another MPI library than mpi4py's; :mod:`kfac_mn.communicators.mpiexec`).
    """
    if name not in COMMUNICATOR_NAMES:
        raise ValueError(f"create_communicator: unknown communicator {name!r}; valid names: "
                         f"{', '.join(COMMUNICATOR_NAMES)}")
    init_mpi()
    if name == "nccl":
        require_nccl()
        from kfac_mn.communicators.nccl_communicator import NcclCommunicator

        communicator = NcclCommunicator(mpi_comm, **collective_options)
    else:
        from kfac_mn.communicators.mpi_communicator import MpiCommunicator

        communicator = MpiCommunicator(mpi_comm, **collective_options)
    if mpi_comm is None:  # the whole job: did its launcher start what MPI sees?
        from mpi4py import MPI

        check_launch(communicator.size, MPI.Get_library_version())
    if communicator.size > 1:
        install_abort_on_exception()
    return communicator
