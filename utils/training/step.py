"""One training update and one validation pass, on every rank.

Update (``acc_iters = k``): the rank's batch of ``k x batchsize`` examples is split into k
micro-batches and handed to the optimizer as :class:`~kfac_mn.optimizer.MicroBatches`
(gradients, and K-FAC's factors, accumulate over them).  The optimizer is multi-node by
itself: :class:`~kfac_mn.optimizers.DistributedKFAC`, or momentum SGD wrapped by
:func:`~kfac_mn.optimizers.create_multi_node_optimizer`; either way its
``last_step_report`` holds the seconds and bytes communicated of each stage.

Validation: each rank evaluates its shard of the validation set (BN in inference mode, no
graph); the sums of loss, top-1 and top-5 hits and examples are added over ranks with
``comm.allreduce_obj``.  An image that cannot be read stops the rank's loop, not the job: the
sums carry a flag, so every rank raises the same :class:`~utils.training.data_checks.DataError`.
"""
import numpy

from kfac_mn import backend
from kfac_mn import functions as F
from kfac_mn.configuration import no_backprop_mode, using_config
from kfac_mn.links import Classifier
from kfac_mn.optimizer import MicroBatches
from utils.data.image_decoding import CorruptImageError
from utils.training.data_checks import DataError

TOP_K = 5


class MeteredClassifier(Classifier):
    """A :class:`Classifier` that also records each call's loss and top-1 hits.

    ``pop_totals()`` returns ``(loss x examples, top-1 hits, examples)`` summed over the
    calls since the last ``pop_totals`` (host floats; one device synchronisation).
    """

    def __init__(self, predictor):
        super().__init__(predictor)
        self._records = []

    def forward(self, *args):
        loss = super().forward(*args)
        self._records.append((loss.data, self.accuracy.data, len(args[-1])))
        return loss

    def pop_totals(self):
        totals = numpy.zeros(3)
        for loss, accuracy, n in self._records:
            totals += (float(loss) * n, float(accuracy) * n, n)
        self._records = []
        return totals


def to_device(array, xp):
    """``array`` on the device of ``xp`` (a copy to the current GPU for CuPy)."""
    return array if xp is numpy else backend.to_gpu(array)


def micro_batches(x, t, k):
    """``k`` consecutive, (nearly) equal parts of the batch ``(x, t)``."""
    bounds = numpy.linspace(0, len(x), k + 1).round().astype(int)
    return [(x[start:stop], t[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]


class UpdateStep:
    """``step(x, t)`` runs one update of ``optimizer`` on this rank's batch; returns the
    optimizer's ``last_step_report`` (``stages`` with seconds and collectives, ``bytes_sent``,
    ``bytes_received``)."""

    def __init__(self, optimizer, classifier, acc_iters):
        self.optimizer = optimizer
        self.classifier = classifier
        self.acc_iters = acc_iters

    def __call__(self, x, t):
        xp = self.classifier.xp
        batches = [(to_device(xb, xp), to_device(tb, xp))
                   for xb, tb in micro_batches(x, t, self.acc_iters)]
        args = batches[0] if len(batches) == 1 else (MicroBatches(batches),)
        self.optimizer.update(self.classifier, *args)
        return self.optimizer.last_step_report


def evaluate(predictor, loader, comm):
    """Validation over all ranks: ``{'loss', 'accuracy', 'accuracy_top5', 'examples'}``."""
    xp = predictor.xp
    sums = numpy.zeros(5)  # loss x examples, top-1 hits, top-k hits, examples, failed ranks
    failure = None
    loader.reset()
    with no_backprop_mode(), using_config("train", False):
        try:
            for x, t in loader:
                if len(t) == 0:
                    continue
                x, t = to_device(x, xp), to_device(t, xp)
                y = predictor(x)
                n = len(t)
                top_k = min(TOP_K, y.shape[1])
                sums += (float(F.softmax_cross_entropy(y, t).data) * n,
                         round(float(F.accuracy(y, t).data) * n),
                         round(float(F.accuracy(y, t, top_k=top_k).data) * n), n, 0)
        except (CorruptImageError, OSError) as error:
            failure = str(error)
            sums[4] = 1
    loss, top1, top5, n, failed = comm.allreduce_obj(sums)
    if failed:
        messages = comm.gather_obj(failure)
        raise DataError(comm.bcast_obj(messages and "; ".join(m for m in messages if m)))
    return {"loss": loss / n, "accuracy": top1 / n, "accuracy_top5": top5 / n,
            "examples": int(n)}
