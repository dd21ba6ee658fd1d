"""When to refresh Kronecker factors and inverses: fixed or adaptive (stale statistics).

After a few hundred iterations the factors change slowly, so they are refreshed less often
(the paper's stale statistics; docs/SPEC.md, section 4): every step
during a warm-up, then per-layer intervals that grow while the relative change
||F_new - F_old||_F / ||F_old||_F stays under a threshold, and shrink when it does not.

* ``StatisticsSchedule(mode='fixed', factor_interval=k, inverse_interval=m)``:
  every layer refreshes its factors every k steps and inverts every m steps.
* ``StatisticsSchedule(mode='adaptive', warmup_steps=w, threshold=t,
  max_interval=M)``: every step while ``step < w``; afterwards, each refresh of
  a layer compares its new factors with the previous ones: a relative change
  below ``t`` doubles that layer's interval (up to M), a change above it halves
  the interval (down to 1).  The inverse is recomputed whenever the factors are
  refreshed and reused in between.

The decisions depend only on the step and on values every rank agrees on, so
all ranks of a distributed run compute the same set of due layers.
"""


class StatisticsSchedule:
    def __init__(self, mode="fixed", factor_interval=1, inverse_interval=1, warmup_steps=0,
                 threshold=0.1, max_interval=20):
        if mode not in ("fixed", "adaptive"):
            raise ValueError(f"schedule mode must be 'fixed' or 'adaptive', not {mode!r}")
        for name, value in (("factor_interval", factor_interval),
                            ("inverse_interval", inverse_interval),
                            ("max_interval", max_interval)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if mode == "fixed" and inverse_interval % factor_interval:
            raise ValueError(
                f"inverse_interval ({inverse_interval}) must be a multiple of factor_interval "
                f"({factor_interval}): an inversion needs freshly refreshed factors")
        self.mode = mode
        self.factor_interval = int(factor_interval)
        self.inverse_interval = int(inverse_interval)
        self.warmup_steps = int(warmup_steps)
        self.threshold = float(threshold)
        self.max_interval = int(max_interval)
        self.intervals = {}   # path -> current interval (adaptive)
        self.next_step = {}   # path -> step of the next refresh (adaptive)

    def factors_due(self, path, step):
        """Does layer ``path`` refresh its factors at ``step``?"""
        if self.mode == "fixed":
            return step % self.factor_interval == 0
        if step < self.warmup_steps or path not in self.next_step:
            return True
        return step >= self.next_step[path]

    def inverse_due(self, path, step):
        """Does layer ``path`` recompute its damped inverses at ``step``?"""
        if self.mode == "fixed":
            return step % self.inverse_interval == 0
        return self.factors_due(path, step)

    def report_change(self, path, step, change):
        """Record a refresh of ``path`` at ``step`` with relative change ``change``."""
        if self.mode == "fixed":
            return
        interval = self.intervals.get(path, 1)
        if step >= self.warmup_steps:
            if change < self.threshold:
                interval = min(2 * interval, self.max_interval)
            else:
                interval = max(interval // 2, 1)
        self.intervals[path] = interval
        self.next_step[path] = step + interval

    def interval(self, path):
        if self.mode == "fixed":
            return self.factor_interval
        return self.intervals.get(path, 1)

    def layer_state(self, path, step):
        """(interval, steps from ``step`` to the next refresh) of ``path``; (0, 0) before its
        first refresh.  A refresh that is already due is 0 steps away: every step at or after
        ``step`` makes the same decision."""
        if path not in self.next_step:
            return 0, 0
        return self.intervals[path], max(self.next_step[path] - step, 0)

    def set_layer_state(self, path, step, interval, steps_ahead):
        """Adopt another rank's :meth:`layer_state` of ``path`` (nothing for (0, 0))."""
        if interval > 0:
            self.intervals[path] = int(interval)
            self.next_step[path] = step + int(steps_ahead)

    def serialize(self, serializer, paths):
        """Save or load each layer's ``interval`` and ``next_step`` (absent before its first
        refresh, and in the fixed mode)."""
        for path in paths:
            node = serializer[path]
            interval = node("interval", self.intervals.get(path))
            next_step = node("next_step", self.next_step.get(path))
            if interval is not None:
                self.intervals[path] = int(interval)
                self.next_step[path] = int(next_step)
