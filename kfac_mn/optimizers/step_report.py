"""Per-step accounting of distributed K-FAC: seconds and bytes of each stage, on this rank.

A :class:`StepReport` times each stage (synchronising the GPU first, so that asynchronous
kernels are charged to the stage that launched them) and charges to it the collectives it ran:
the difference of ``comm.stats`` (calls, modelled ring bytes sent and received, seconds inside
MPI; see :mod:`kfac_mn.communicators.traffic`) before and after the stage.  Nothing else may
reset ``comm.stats`` during a step.

:meth:`StepReport.as_dict` is what ``DistributedKFAC.last_step_report`` holds::

    {"step": 12, "due_layers": 3, "owned_layers": 2, "compute_seconds": {...},
     "seconds": 0.041,
     "bytes_sent": 7520, "bytes_received": 7380,
     "stages": {"1_compute_local_statistics": {"seconds": 0.012, "collectives": {}},
                "2_reduce_scatter_statistics": {"seconds": 0.004, "collectives": {
                    "reduce_scatter_v": {"calls": 1, "bytes_sent": 6000, ...}, ...}},
                ...}}
"""
import contextlib

from kfac_mn.timing import StageTimer

_TOTAL_KEYS = ("calls", "bytes_sent", "bytes_received", "messages_sent", "messages_received",
               "seconds")


def stats_difference(after, before):
    """Per-operation ``after - before`` of two ``comm.stats`` snapshots (operations called);
    ``algorithms`` holds the variable-count algorithms that ran in between, with their calls."""
    difference = {}
    for operation, totals in after.items():
        previous = before.get(operation, {})
        delta = {key: totals.get(key, 0) - previous.get(key, 0) for key in _TOTAL_KEYS}
        if delta["calls"]:
            ran = {name: calls - previous.get("algorithms", {}).get(name, 0)
                   for name, calls in totals.get("algorithms", {}).items()}
            delta["algorithms"] = {name: calls for name, calls in ran.items() if calls}
            difference[operation] = delta
    return difference


class StepReport:
    def __init__(self, comm):
        self._comm = comm
        self._timer = StageTimer()
        self.stages = {}
        self.info = {}

    @contextlib.contextmanager
    def stage(self, name):
        """Charge the time and the collectives of the ``with`` body to stage ``name``."""
        before = self._comm.stats
        start = self._timer.start()
        yield
        seconds = self._timer.stop(name, start)
        self.stages[name] = {"seconds": seconds,
                             "collectives": stats_difference(self._comm.stats, before)}

    def as_dict(self):
        collectives = [c for stage in self.stages.values() for c in stage["collectives"].values()]
        return {**self.info,
                "seconds": sum(stage["seconds"] for stage in self.stages.values()),
                "bytes_sent": sum(c["bytes_sent"] for c in collectives),
                "bytes_received": sum(c["bytes_received"] for c in collectives),
                "stages": self.stages}


def format_report(report):
    """One line for a training log: seconds and bytes sent per stage."""
    parts = []
    for name, stage in report["stages"].items():
        sent = sum(c["bytes_sent"] for c in stage["collectives"].values())
        text = f"{name} {stage['seconds'] * 1e3:.1f} ms"
        if stage["collectives"]:
            text += f" {sent / 1e6:.3f} MB sent"
        parts.append(text)
    return f"step {report.get('step', '?')}: " + " | ".join(parts)
