"""The paper's hyperparameter schedules, as functions of the (fractional) epoch.

The paper's recipe (docs/SPEC.md, section 2): ``lr(e) = lr0`` for ``e < start``, then
``lr0 * (1 - (e - start) / (end - start)) ** p``; momentum is scaled down with
the lr (``m <- m * lr / lr_prev`` when the lr falls), which is the closed form
``m(e) = m0 * lr(e) / lr0`` during the decay.  The same polynomial decay serves
the damping.  An optional linear warm-up ramps from ``warmup_from * v0`` to
``v0`` over the first epochs (Goyal et al.'s SGD baseline uses 5).

Every schedule is a pure function of the epoch, so resuming from a checkpoint
restores it exactly; :class:`ScheduleSet` applies several to an optimizer.
"""
import math


def linear_warmup(initial, warmup_from, warmup_epochs, epoch):
    """``initial * (warmup_from + (1 - warmup_from) * epoch / warmup_epochs)``."""
    frac = epoch / warmup_epochs
    return initial * (warmup_from + (1.0 - warmup_from) * frac)


class PolynomialDecay:
    def __init__(self, initial, power, start_epoch, end_epoch, warmup_epochs=0.0,
                 warmup_from=0.0):
        if end_epoch <= start_epoch:
            raise ValueError(
                f"polynomial decay needs end_epoch > start_epoch (got {end_epoch} <= "
                f"{start_epoch})")
        if warmup_epochs > start_epoch:
            raise ValueError(f"warm-up ({warmup_epochs} epochs) must end before the decay "
                             f"starts (epoch {start_epoch})")
        self.initial = float(initial)
        self.power = float(power)
        self.start_epoch = float(start_epoch)
        self.end_epoch = float(end_epoch)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_from = float(warmup_from)

    def __call__(self, epoch):
        if epoch < self.warmup_epochs:
            return linear_warmup(self.initial, self.warmup_from, self.warmup_epochs, epoch)
        if epoch < self.start_epoch:
            return self.initial
        progress = min((epoch - self.start_epoch) / (self.end_epoch - self.start_epoch), 1.0)
        return self.initial * (1.0 - progress) ** self.power


class StepDecay:
    """Goyal et al.'s SGD baseline: multiply by ``rate`` at each epoch in ``milestones``."""

    def __init__(self, initial, milestones, rate=0.1, warmup_epochs=0.0, warmup_from=0.0):
        self.initial = float(initial)
        self.milestones = sorted(float(m) for m in milestones)
        self.rate = float(rate)
        self.warmup_epochs = float(warmup_epochs)
        self.warmup_from = float(warmup_from)

    def __call__(self, epoch):
        if epoch < self.warmup_epochs:
            return linear_warmup(self.initial, self.warmup_from, self.warmup_epochs, epoch)
        passed = sum(1 for m in self.milestones if epoch >= m)
        return self.initial * self.rate ** passed


class ScaledWith:
    """``value(e) = initial * lr(e) / lr0`` once the lr falls below lr0 (momentum rule)."""

    def __init__(self, initial, lr_schedule):
        self.initial = float(initial)
        self.lr_schedule = lr_schedule

    def __call__(self, epoch):
        ratio = self.lr_schedule(epoch) / self.lr_schedule.initial
        return self.initial * min(ratio, 1.0) if math.isfinite(ratio) else self.initial


class ScheduleSet:
    """Sets optimizer hyperparameters from schedules: ``ScheduleSet(lr=..., momentum=...)``."""

    def __init__(self, **schedules):
        self.schedules = schedules

    def apply(self, optimizer, epoch):
        values = {name: schedule(epoch) for name, schedule in self.schedules.items()}
        for name, value in values.items():
            if not hasattr(optimizer.hyperparam, name):
                raise AttributeError(
                    f"{type(optimizer).__name__} has no hyperparameter {name!r} to schedule")
            setattr(optimizer.hyperparam, name, value)
        return values
