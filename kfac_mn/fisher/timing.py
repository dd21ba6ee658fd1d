"""Seconds per stage of one optimizer step, for benchmarks and the training log."""
import collections
import contextlib
import time

from kfac_mn import backend


def synchronize(array):
    """Wait for the GPU work queued on ``array``'s device (no-op on the CPU)."""
    if array is not None and backend.is_gpu_array(array):
        backend.cupy.cuda.get_current_stream().synchronize()


class StageTimer:
    """``with timer('stage'):`` adds the block's wall time to ``timer.seconds['stage']``.

    On the GPU the current stream is synchronised at both ends, so a stage is
    charged for its own kernels.
    """

    def __init__(self):
        self.seconds = collections.OrderedDict()

    def reset(self):
        self.seconds = collections.OrderedDict()

    @contextlib.contextmanager
    def __call__(self, stage):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def move(self, from_stage, to_stage, seconds):
        """Re-charge ``seconds`` measured inside ``from_stage`` to ``to_stage``."""
        self.seconds[from_stage] = self.seconds.get(from_stage, 0.0) - seconds
        self.seconds[to_stage] = self.seconds.get(to_stage, 0.0) + seconds

    @staticmethod
    def _sync():
        if backend.gpu_available():
            backend.cupy.cuda.get_current_stream().synchronize()
