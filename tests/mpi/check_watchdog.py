"""The watchdog of kfac_mn.communicators.watchdog on 4 ranks: after three collectives rank 1
stops itself (SIGSTOP) and rank 2 computes (sleeps) instead of joining the fourth; ranks 0
and 3 wait in it.  With a 3-second timeout rank 0 must name the collective, rank 1 as the one
that did not arrive and what ranks 2 and 3 do, then abort the job with status 4."""
import os
import signal
import time

from mpi4py import MPI

from kfac_mn.communicators import create_communicator
from kfac_mn.communicators.watchdog import Watchdog, WatchedCommunicator


def main():
    comm = create_communicator("mpi")
    watchdog = Watchdog(MPI.COMM_WORLD, timeout=3, exit_code=4, hint="the hint").start()
    comm = WatchedCommunicator(comm, watchdog)
    for _ in range(3):
        comm.allreduce_obj(1.0)
    if comm.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    if comm.rank == 2:
        time.sleep(60)
    comm.allreduce_obj(1.0)
    print("the fourth collective completed", flush=True)


if __name__ == "__main__":
    main()
