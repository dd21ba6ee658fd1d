"""A watchdog over the collectives: a job with a hung rank ends instead of burning its
allocation.

:class:`WatchedCommunicator` wraps any communicator; every collective runs inside
:meth:`Watchdog.waiting`, which records the operation, its call number and when the rank
started waiting.  A daemon thread per rank looks every second (or ``timeout / 10``):

- it answers roll calls of other ranks on a private duplicate of the MPI communicator with
  its own status (waiting in which collective since when, or working between collectives);
- when this rank has waited ``timeout`` seconds in one collective, it calls the roll itself:
  it sends its status to every other rank and collects the answers for ``grace`` seconds.
  The ranks that did not answer are the ones the collective waits for (stopped, hung in
  native code, or dead).  The lowest waiting rank prints one message (the collective, the
  silent ranks, what the others are doing) and calls ``MPI_Abort`` with ``exit_code``, which
  ends every rank of the job.  Nothing is written: the caller's last checkpoint stays as it
  was.

A rank that merely computes for long (no collective) never times out by itself; the others,
waiting for it, report it as "working".  The thread needs MPI's ``THREAD_MULTIPLE`` level
(mpi4py asks for it by default).
"""
import contextlib
import sys
import threading
import time

from kfac_mn.communicators.abort_on_exception import abort_mpi_job
from kfac_mn.communicators.communicator_base import CommunicatorBase

QUERY, REPLY = 1, 2


def _ranks(ranks):
    return ", ".join(str(rank) for rank in ranks)


def describe(status):
    """One phrase for a rank's status (see :meth:`Watchdog.status`)."""
    if status["operation"] is None:
        return (f"working, not in a collective, for {status['seconds']:.0f} s (after "
                f"collective call {status['calls']})")
    return (f"waiting in {status['operation']} (call {status['calls'] + 1}) for "
            f"{status['seconds']:.0f} s")


class Watchdog:
    """Watches this rank's collectives; see the module docstring.

    ``mpi_comm``: the MPI communicator of the ranks (duplicated here, so this is collective);
    ``timeout``: seconds one collective may wait; ``grace``: seconds the roll call waits
    for answers (default ``min(2.5, timeout / 4)``); ``hint``: a sentence added to the
    message (what to do next); ``stream``: where the message goes.
    """

    def __init__(self, mpi_comm, timeout, exit_code=1, grace=None, hint="", stream=None):
        if not timeout > 0:
            raise ValueError(f"Watchdog: timeout must be positive, got {timeout!r}")
        self.timeout = float(timeout)
        # every live rank's thread looks at least once a second: 2.5 s is enough to answer
        self.grace = min(2.5, self.timeout / 4) if grace is None else float(grace)
        self.exit_code = exit_code
        self.hint = hint
        self.stream = stream
        self._side = mpi_comm.Dup()
        self.rank, self.size = self._side.rank, self._side.size
        self._lock = threading.Lock()
        self._operation = None
        self._since = time.monotonic()
        self._calls = 0
        self._answered = []  # send requests of our answers, completed lazily
        self._stop = threading.Event()
        self._thread = None

    # -- the main thread -------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, operation):
        """Around one collective: this rank waits in ``operation`` until it returns."""
        with self._lock:
            self._operation, self._since = operation, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._operation, self._since = None, time.monotonic()
                self._calls += 1

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="collective-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """Stop the thread (not collective: the duplicate communicator is left to MPI)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- the watchdog thread ---------------------------------------------------------------
    def status(self):
        """``{rank, operation (None between collectives), calls completed, seconds}``."""
        with self._lock:
            return {"rank": self.rank, "operation": self._operation, "calls": self._calls,
                    "seconds": time.monotonic() - self._since}

    def _watch(self):
        poll = min(1.0, self.timeout / 10)
        while not self._stop.wait(poll):
            self._answer_roll_calls()
            status = self.status()
            if status["operation"] is not None and status["seconds"] >= self.timeout:
                self._roll_call(status)
                return

    def _answer_roll_calls(self):
        from mpi4py import MPI

        probe = MPI.Status()
        while self._side.Iprobe(source=MPI.ANY_SOURCE, tag=QUERY, status=probe):
            self._side.recv(source=probe.Get_source(), tag=QUERY)
            self._answered.append(self._side.isend(self.status(), dest=probe.Get_source(),
                                                   tag=REPLY))
        self._answered = [request for request in self._answered if not request.Test()]

    def _roll_call(self, mine):
        """Ask every rank for its status, then report and abort (or leave that to a lower
        waiting rank)."""
        from mpi4py import MPI

        others = [rank for rank in range(self.size) if rank != self.rank]
        requests = [self._side.isend(mine, dest=rank, tag=QUERY) for rank in others]
        answers, probe = {}, MPI.Status()
        deadline = time.monotonic() + self.grace
        while len(answers) < len(others) and time.monotonic() < deadline:
            self._answer_roll_calls()
            if self._side.Iprobe(source=MPI.ANY_SOURCE, tag=REPLY, status=probe):
                source = probe.Get_source()
                answers[source] = self._side.recv(source=source, tag=REPLY)
            else:
                time.sleep(0.02)
        reporter = min([self.rank] + [rank for rank, status in answers.items()
                                      if status["operation"] is not None])
        if reporter != self.rank:
            # a lower rank waits too and reports; if its abort does not come, ours does
            end = time.monotonic() + self.timeout + 2 * self.grace
            while time.monotonic() < end:
                self._answer_roll_calls()
                time.sleep(0.05)
        self._report(mine, answers)
        del requests  # not waited for: a silent rank never receives them
        abort_mpi_job(self.exit_code)

    def _report(self, mine, answers):
        silent = [rank for rank in range(self.size)
                  if rank != self.rank and rank not in answers]
        lines = [f"watchdog on rank {self.rank} of {self.size}: no collective completed for "
                 f"{mine['seconds']:.0f} s (--timeout {self.timeout:g}): this rank is "
                 f"{describe(mine)}"]
        if silent:
            lines.append(f"ranks that did not arrive (no answer within {self.grace:g} s: "
                         f"stopped, hung or dead): {_ranks(silent)}")
        by_state = {}
        for rank, status in sorted(answers.items()):
            key = (status["operation"], status["calls"] if status["operation"] else None)
            by_state.setdefault(key, []).append((rank, status))
        for group in by_state.values():
            ranks = [rank for rank, _ in group]
            lines.append(f"rank{'s' if len(ranks) > 1 else ''} {_ranks(ranks)}: "
                         f"{describe(group[0][1])}")
        lines.append(f"aborting the MPI job (exit status {self.exit_code}) without writing "
                     "anything" + (f"; {self.hint}" if self.hint else ""))
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write("\n  ".join(lines) + "\n")
        stream.flush()


def _watched(operation):
    def collective(self, *args, **kwargs):
        with self.watchdog.waiting(operation):
            return getattr(self.communicator, operation)(*args, **kwargs)

    collective.__name__ = operation
    collective.__doc__ = f"``{operation}`` of the wrapped communicator, under the watchdog."
    return collective


class WatchedCommunicator(CommunicatorBase):
    """``communicator`` with every collective run under ``watchdog``; everything else (the
    topology, the traffic statistics, the algorithm settings) is the wrapped one's."""

    def __init__(self, communicator, watchdog):  # no super().__init__(): the log is theirs
        self.communicator = communicator
        self.watchdog = watchdog

    def __getattr__(self, name):
        return getattr(self.communicator, name)

    rank = property(lambda self: self.communicator.rank)
    size = property(lambda self: self.communicator.size)
    intra_rank = property(lambda self: self.communicator.intra_rank)
    intra_size = property(lambda self: self.communicator.intra_size)
    inter_rank = property(lambda self: self.communicator.inter_rank)
    inter_size = property(lambda self: self.communicator.inter_size)
    stats = property(lambda self: self.communicator.stats)

    def reset_stats(self):
        self.communicator.reset_stats()

    bcast_data = _watched("bcast_data")
    multi_node_mean_grad = _watched("multi_node_mean_grad")
    reduce_scatter_v = _watched("reduce_scatter_v")
    allgather_v = _watched("allgather_v")
    allreduce = _watched("allreduce")
    bcast_obj = _watched("bcast_obj")
    allreduce_obj = _watched("allreduce_obj")
    gather_obj = _watched("gather_obj")
    barrier = _watched("barrier")
