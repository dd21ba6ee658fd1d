"""Wall-clock seconds per named stage, the one timer of the library.

:class:`StageTimer` is used by K-FAC's finer split of a step (forward, backward, factors,
inversion, ...), by :class:`~kfac_mn.optimizers.step_report.StepReport` (the stages of
Figure 1) and by :class:`~kfac_mn.function_hooks.TimerHook` (per function type).  On the GPU
it synchronises the current stream at both ends (:func:`kfac_mn.backend.synchronize`), so a
stage is charged for its own kernels rather than for their launches.
"""
import collections
import contextlib
import time

from kfac_mn import backend


class StageTimer:
    """``with timer('stage'):`` adds the block's wall time to ``timer.seconds['stage']``.

    ``start()`` / ``stop(stage, start)`` do the same for code that cannot use ``with`` (a
    function hook's pre- and post-process).
    """

    def __init__(self):
        self.seconds = collections.OrderedDict()

    def reset(self):
        self.seconds = collections.OrderedDict()

    @staticmethod
    def start():
        """Synchronise, then return the start time for :meth:`stop`."""
        backend.synchronize()
        return time.perf_counter()

    def stop(self, stage, start):
        """Synchronise and charge the time since ``start`` to ``stage``; returns it."""
        backend.synchronize()
        seconds = time.perf_counter() - start
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        return seconds

    @contextlib.contextmanager
    def __call__(self, stage):
        start = self.start()
        try:
            yield
        finally:
            self.stop(stage, start)

    def move(self, from_stage, to_stage, seconds):
        """Re-charge ``seconds`` measured inside ``from_stage`` to ``to_stage``."""
        self.seconds[from_stage] = self.seconds.get(from_stage, 0.0) - seconds
        self.seconds[to_stage] = self.seconds.get(to_stage, 0.0) + seconds
