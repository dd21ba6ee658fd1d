"""SIGTERM / SIGINT as a request to checkpoint and stop at the next update boundary.

mpiexec (Hydra) forwards both signals to every rank.  The handler only records the signal;
the training loop adds the flag to its per-update all-reduce, so all ranks stop after the
same update even when only some of them were signalled.  A second SIGINT while the first is
pending raises KeyboardInterrupt as usual (to stop a run that hangs).
"""
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """``with StopSignals() as stop:`` ... ``stop.signum`` is the first signal received."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
