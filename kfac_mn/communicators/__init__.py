"""Communicators for distributed K-FAC, named after the MPI operations they perform.

``create_communicator`` is the one entry point.  mpi4py is imported only when an MPI
communicator is created (or the abort hook installed), so importing this package neither
initializes MPI nor needs it.
"""
from kfac_mn.communicators.abort_on_exception import install_abort_on_exception
from kfac_mn.communicators.communicator_base import CommunicatorBase  # noqa: F401

COMMUNICATOR_NAMES = ("mpi",)


def create_communicator(name="mpi", mpi_comm=None):
    """Create the communicator called ``name`` over ``mpi_comm`` (default: COMM_WORLD).

    With more than one rank, an uncaught exception on any rank then aborts the whole job
    (see :func:`install_abort_on_exception`).
    """
    if name not in COMMUNICATOR_NAMES:
        raise ValueError(f"create_communicator: unknown communicator {name!r}; valid names: "
                         f"{', '.join(COMMUNICATOR_NAMES)}")
    from kfac_mn.communicators.mpi_communicator import MpiCommunicator

    communicator = MpiCommunicator(mpi_comm)
    if communicator.size > 1:
        install_abort_on_exception()
    return communicator
