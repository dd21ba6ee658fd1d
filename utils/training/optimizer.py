"""The optimizer of a training run and its hyperparameter schedules, built from the options.

- ``--optimizer kfac``: :class:`~kfac_mn.optimizers.DistributedKFAC` on every world size
  (one rank included), with the stale-statistics schedule of the options.
- ``--optimizer sgd``: :class:`~kfac_mn.optimizers.MomentumSGD` wrapped by
  :func:`~kfac_mn.optimizers.create_multi_node_optimizer` (rank 0's weights at setup, the
  gradients averaged over the ranks before each update).

The lr is ``--lr`` (times global batch / ``--lr-reference-batch`` when that is set), decayed
polynomially (the paper's recipe) or in steps (Goyal et al.), with an optional linear
warm-up; momentum follows the lr down (``m = m0 lr / lr0``) with ``--momentum-scaling``.
Every schedule is a function of the fractional epoch, so a resumed run continues exactly.
"""
import numpy

from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.lr_schedules import PolynomialDecay, ScaledWith, ScheduleSet, StepDecay
from kfac_mn.optimizer_hooks import WeightDecay, WeightRescale
from kfac_mn.optimizers import DistributedKFAC, MomentumSGD, create_multi_node_optimizer
from utils.training.options import decay_end, global_batch


def initial_lr(options, size):
    """``--lr``, scaled linearly to the global batch when ``--lr-reference-batch`` is set."""
    if options.lr_reference_batch:
        return options.lr * global_batch(options, size) / options.lr_reference_batch
    return options.lr


def statistics_schedule(options):
    if options.stat_schedule == "fixed":
        return StatisticsSchedule("fixed", factor_interval=options.factor_interval,
                                  inverse_interval=options.inverse_interval)
    return StatisticsSchedule("adaptive", warmup_steps=options.stale_warmup,
                              threshold=options.stale_threshold,
                              max_interval=options.max_interval)


def build_optimizer(options, comm, link):
    """The optimizer of ``options`` set up on ``link`` (rank 0's weights on every rank)."""
    lr = initial_lr(options, comm.size)
    if options.optimizer == "kfac":
        optimizer = DistributedKFAC(
            comm, lr=lr, momentum=options.momentum, damping=options.damping,
            cov_ema_decay=options.cov_ema_decay, fisher_type=options.fisher_type,
            bn_fisher=options.bn_fisher, inv_dtype=numpy.dtype(options.inv_dtype),
            schedule=statistics_schedule(options), seed=options.seed,
            comm_dtype=numpy.dtype(options.comm_dtype), assignment=options.assignment,
            batched_inversion=options.batched_inversion,
            factor_dtype=None if options.factor_dtype == "data" else options.factor_dtype)
    else:
        optimizer = create_multi_node_optimizer(
            MomentumSGD(lr=lr, momentum=options.momentum), comm)
    optimizer.setup(link)  # broadcasts rank 0's weights
    if options.weight_decay > 0:
        optimizer.add_hook(WeightDecay(options.weight_decay))
    if options.weight_rescale:
        optimizer.add_hook(WeightRescale())
    return optimizer


def build_schedules(options, size):
    """:class:`ScheduleSet` of the lr and (with ``--momentum-scaling``) the momentum."""
    lr = initial_lr(options, size)
    if options.lr_schedule == "poly":
        lr_schedule = PolynomialDecay(lr, options.lr_power, options.lr_decay_start,
                                      decay_end(options), options.warmup_epochs,
                                      options.warmup_from)
    else:
        lr_schedule = StepDecay(lr, options.lr_milestones, options.lr_decay_rate,
                                options.warmup_epochs, options.warmup_from)
    if options.momentum_scaling:
        return ScheduleSet(lr=lr_schedule, momentum=ScaledWith(options.momentum, lr_schedule))
    return ScheduleSet(lr=lr_schedule)
