"""Ready-made function hooks."""
import collections
import time

from kfac_mn import backend
from kfac_mn.function_hook import FunctionHook


class TimerHook(FunctionHook):
    """Wall time spent in each function type, forward and backward separately.

    On the GPU the device is synchronised around every call so that the times
    are the kernels' and not the launches'; this slows the run, so use it for
    profiling only.
    """

    name = "TimerHook"

    def __init__(self):
        self.forward_seconds = collections.defaultdict(float)
        self.backward_seconds = collections.defaultdict(float)
        self.calls = collections.Counter()
        self._start = None

    @staticmethod
    def _sync(arrays):
        for a in arrays:
            if a is not None and backend.is_gpu_array(a):
                backend.cupy.cuda.get_current_stream().synchronize()
                return

    def forward_preprocess(self, function, in_data):
        self._sync(in_data)
        self._start = time.perf_counter()

    def forward_postprocess(self, function, in_data):
        self._sync(in_data)
        self.forward_seconds[function.label] += time.perf_counter() - self._start
        self.calls[function.label] += 1

    def backward_preprocess(self, function, in_data, out_grad):
        self._sync(out_grad)
        self._start = time.perf_counter()

    def backward_postprocess(self, function, in_data, out_grad):
        self._sync(out_grad)
        self.backward_seconds[function.label] += time.perf_counter() - self._start

    def summary(self):
        """Rows (label, calls, forward s, backward s), slowest total first."""
        labels = set(self.forward_seconds) | set(self.backward_seconds)
        rows = [(label, self.calls[label], self.forward_seconds[label],
                 self.backward_seconds[label]) for label in labels]
        return sorted(rows, key=lambda r: -(r[2] + r[3]))
