"""Ready-made function hooks."""
import collections

from kfac_mn.function_hook import FunctionHook
from kfac_mn.timing import StageTimer


class TimerHook(FunctionHook):
    """Wall time spent in each function type, forward and backward separately.

    On the GPU the device is synchronised around every call so that the times
    are the kernels' and not the launches'; this slows the run, so use it for
    profiling only.
    """

    name = "TimerHook"

    def __init__(self):
        self._forward = StageTimer()
        self._backward = StageTimer()
        self.calls = collections.Counter()
        self._start = None

    @property
    def forward_seconds(self):
        """{function label: seconds in forward}."""
        return self._forward.seconds

    @property
    def backward_seconds(self):
        """{function label: seconds in backward}."""
        return self._backward.seconds

    def forward_preprocess(self, function, in_data):
        self._start = self._forward.start()

    def forward_postprocess(self, function, in_data):
        self._forward.stop(function.label, self._start)
        self.calls[function.label] += 1

    def backward_preprocess(self, function, in_data, out_grad):
        self._start = self._backward.start()

    def backward_postprocess(self, function, in_data, out_grad):
        self._backward.stop(function.label, self._start)

    def summary(self):
        """Rows (label, calls, forward s, backward s), slowest total first."""
        labels = set(self.forward_seconds) | set(self.backward_seconds)
        rows = [(label, self.calls[label], self.forward_seconds.get(label, 0.0),
                 self.backward_seconds.get(label, 0.0)) for label in labels]
        return sorted(rows, key=lambda r: -(r[2] + r[3]))
