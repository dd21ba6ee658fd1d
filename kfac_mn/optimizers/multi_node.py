"""Data-parallel training with any optimizer: ChainerMN's ``create_multi_node_optimizer``.

:func:`create_multi_node_optimizer` wraps an optimizer (momentum SGD, say) so that every
rank of ``comm`` runs the same updates: ``setup`` broadcasts rank 0's weights, and each
``update`` is three stages,

1. ``1_forward_backward``: the wrapped optimizer's gradients of this rank's batch (or
   micro-batches, :class:`~kfac_mn.optimizer.MicroBatches`);
2. ``2_allreduce_gradients``: the mean gradient over the ranks (``comm.multi_node_mean_grad``);
3. ``3_update``: the wrapped optimizer's update with the mean gradient (its hooks included),

each timed, with its collectives, in ``last_step_report`` (the layout of
:class:`~kfac_mn.optimizers.step_report.StepReport`, as
:class:`~kfac_mn.optimizers.DistributedKFAC` fills it).  Every other attribute (``lr``,
``t``, ``add_hook``, ``serialize``, ...) is the wrapped optimizer's, so checkpoints and
schedules see no difference.  K-FAC needs no wrapper: :class:`DistributedKFAC` is its
multi-node form.
"""
from kfac_mn.optimizers.step_report import StepReport

STAGES = ("1_forward_backward", "2_allreduce_gradients", "3_update")


class MultiNodeOptimizer:
    """``actual_optimizer`` run in step on every rank of ``comm`` (see the module docstring)."""

    def __init__(self, actual_optimizer, comm):
        object.__setattr__(self, "actual_optimizer", actual_optimizer)
        object.__setattr__(self, "comm", comm)
        object.__setattr__(self, "last_step_report", None)

    def setup(self, link):
        """Set the wrapped optimizer up on ``link`` and give every rank rank 0's weights."""
        self.actual_optimizer.setup(link)
        self.comm.bcast_data(link)
        return self

    def update(self, lossfun=None, *args, **kwds):
        """One data-parallel step; returns this rank's loss (None without ``lossfun``, when
        the gradients are already in place)."""
        actual = self.actual_optimizer
        actual._check_setup()
        report = StepReport(self.comm)
        loss = None
        with report.stage(STAGES[0]):
            if lossfun is not None:
                loss = actual.compute_gradients(lossfun, *args, **kwds)
        with report.stage(STAGES[1]):
            self.comm.multi_node_mean_grad(actual.target)
        with report.stage(STAGES[2]):
            actual.update()
        report.info.update(step=actual.t)
        object.__setattr__(self, "last_step_report", report.as_dict())
        return loss

    def __getattr__(self, name):
        return getattr(self.actual_optimizer, name)

    def __setattr__(self, name, value):
        setattr(self.actual_optimizer, name, value)


def create_multi_node_optimizer(actual_optimizer, comm):
    """Wrap ``actual_optimizer`` for data-parallel training over ``comm``."""
    return MultiNodeOptimizer(actual_optimizer, comm)
