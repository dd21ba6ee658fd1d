"""Turn an uncaught exception on one rank into the end of the whole MPI job.

Without this, a rank that dies leaves the others waiting forever in their next collective.
"""
import sys
import time
import traceback

#: seconds between a rank's last words and its ``MPI_Abort``: the launcher forwards a rank's
#: output through a pipe, and the abort kills the job before Hydra has read it (seen as an
#: empty output, with no traceback, about once in 15 runs on a loaded machine)
OUTPUT_GRACE = 1.0


def abort_mpi_job(exit_code):
    """Flush this rank's output, give the launcher :data:`OUTPUT_GRACE` to forward it, then
    end every rank of the job with ``exit_code``."""
    from mpi4py import MPI

    sys.stderr.flush()
    sys.stdout.flush()
    time.sleep(OUTPUT_GRACE)
    MPI.COMM_WORLD.Abort(exit_code)


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

    def report_and_abort(exc_type, exc, tb):
        tag = f"[rank {world.rank}/{world.size}]"
        lines = traceback.format_exception(exc_type, exc, tb)
        text = "".join(lines).rstrip("\n").replace("\n", f"\n{tag} ")
        sys.stderr.write(f"{tag} uncaught exception, aborting the MPI job:\n{tag} {text}\n")
        abort_mpi_job(1)

    report_and_abort.aborts_mpi_job = True
    sys.excepthook = report_and_abort
