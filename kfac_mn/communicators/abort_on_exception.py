"""Turn an uncaught exception on one rank into the end of the whole MPI job.

Without this, a rank that dies leaves the others waiting forever in their next collective.
"""
import sys
import traceback


def install_abort_on_exception():
    """Wrap ``sys.excepthook``: print the traceback tagged with the rank, then abort the job.

    ``MPI.COMM_WORLD.Abort(1)`` makes the process manager kill every rank, so ``mpiexec``
    exits non-zero instead of hanging.  Installing twice is harmless.  Exceptions raised in
    threads other than the main one do not reach ``sys.excepthook`` and are left alone.
    """
    if getattr(sys.excepthook, "aborts_mpi_job", False):
        return
    from mpi4py import MPI

    world = MPI.COMM_WORLD

    def abort_mpi_job(exc_type, exc, tb):
        tag = f"[rank {world.rank}/{world.size}]"
        lines = traceback.format_exception(exc_type, exc, tb)
        text = "".join(lines).rstrip("\n").replace("\n", f"\n{tag} ")
        sys.stderr.write(f"{tag} uncaught exception, aborting the MPI job:\n{tag} {text}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        world.Abort(1)

    abort_mpi_job.aborts_mpi_job = True
    sys.excepthook = abort_mpi_job
