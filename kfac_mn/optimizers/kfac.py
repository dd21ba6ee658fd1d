"""K-FAC (Martens & Grosse 2015; KFC for convolutions), as the paper uses it.

One :meth:`KFAC.update` is the single-process version of the paper's Figure 1,
written as the same stages that :class:`~kfac_mn.optimizers.DistributedKFAC`
spreads over workers:

1. :meth:`compute_local_statistics`: forward and backward under a
   :class:`~kfac_mn.fisher.hook.KFACHook`, which hands each due layer's
   activations and output gradients to its Fisher block (sums over examples);
2. (distributed only) reduce-scatter of gradients and statistic sums;
3. :meth:`update_and_invert` then :meth:`precondition`: running factors,
   damped inverses, preconditioned gradients ``G_d^{-1} dW A_d^{-1}``;
4. (distributed only) all-gather of the preconditioned gradients;
5. :meth:`apply_update`: momentum SGD on the preconditioned gradients
   (parameters without a block use their plain gradient).

The layers K-FAC covers are those with a registered Fisher block
(:mod:`kfac_mn.fisher.registry`).  Optimizer 'pre' hooks (e.g. WeightDecay) see the
preconditioned gradients.  Gradient and factor accumulation:
``update(lossfun, MicroBatches([args_0, args_1, ...]))`` runs stage 1 on each micro-batch in
turn (see :class:`~kfac_mn.optimizer.MicroBatches`).
"""
import json
import numbers

import numpy

from kfac_mn import backend
from kfac_mn import functions as F
from kfac_mn.fisher.batched_inverse import batched_damped_inverses
from kfac_mn.fisher.factor_products import check_factor_dtype
from kfac_mn.fisher.hook import KFACHook
from kfac_mn.fisher.inverse import FallbackCounter
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.fisher.registry import build_fisher_blocks
from kfac_mn.optimizer import HyperparameterProxy
from kfac_mn.optimizers.momentum_sgd import MomentumSGD
from kfac_mn.serializers import Deserializer
from kfac_mn.timing import StageTimer


class KFAC(MomentumSGD):
    """K-FAC with momentum SGD on the preconditioned gradients, on one process.

    ``lr``, ``momentum``: Chainer's MomentumSGD convention.  ``damping``: gamma of the paper's
    Tikhonov damping with pi-correction.  ``cov_ema_decay``: r of the running factors,
    F <- (1 - r) F + r F_new (1 uses the newest statistics only).  ``fisher_type``: 'emp'
    (true labels) or 'mc' (labels sampled from the model's prediction; lossfun must expose
    its logits as ``lossfun.y``).  ``bn_fisher``: 'diag' (the paper), 'unit' or 'full'.
    ``inv_dtype``: float32 or float64 inverses.  ``schedule``: when factors and inverses are
    refreshed (a :class:`~kfac_mn.fisher.refresh_schedule.StatisticsSchedule`; default every
    step).  ``seed``: the Monte-Carlo label sampler's.  ``factor_dtype``: None (the data's) or
    'float16' (the paper's half-precision factor products with float32 accumulation, see
    :mod:`kfac_mn.fisher.factor_products`).  ``stats_batchsize``: None (statistics from the
    whole local batch) or k (only its first k examples, a cheaper estimate for large batches;
    per-example gradients still scale by the whole batch).  ``batched_inversion``: invert
    the factors of equal size due at one step as one batch (fewer kernel launches and
    synchronisations on the GPU, :mod:`kfac_mn.fisher.batched_inverse`); the same inverses
    and fallbacks as one at a time.
    """

    damping = HyperparameterProxy("damping")
    cov_ema_decay = HyperparameterProxy("cov_ema_decay")

    def __init__(self, lr=0.01, momentum=0.9, damping=1e-3, cov_ema_decay=1.0,
                 fisher_type="emp", bn_fisher="diag", inv_dtype=numpy.float32, schedule=None,
                 seed=0, factor_dtype=None, stats_batchsize=None, batched_inversion=False):
        super().__init__(lr=lr, momentum=momentum)
        if stats_batchsize is not None and (isinstance(stats_batchsize, bool) or
                                            not isinstance(stats_batchsize, numbers.Integral)
                                            or stats_batchsize < 1):
            raise ValueError(f"KFAC stats_batchsize must be a positive integer or None, "
                             f"got {stats_batchsize!r}")
        if not isinstance(damping, numbers.Real) or not damping >= 0.0:
            raise ValueError(f"KFAC damping must be a number >= 0, got {damping!r}")
        if not isinstance(cov_ema_decay, numbers.Real) or not 0.0 < cov_ema_decay <= 1.0:
            raise ValueError(f"KFAC cov_ema_decay must be in (0, 1], got {cov_ema_decay!r}")
        if fisher_type not in ("emp", "mc"):
            raise ValueError(f"KFAC fisher_type must be 'emp' or 'mc', not {fisher_type!r}")
        if bn_fisher not in ("diag", "unit", "full"):
            raise ValueError(f"KFAC bn_fisher must be 'diag', 'unit' or 'full', not {bn_fisher!r}")
        inv_dtype = numpy.dtype(inv_dtype)
        if inv_dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"KFAC inv_dtype must be float32 or float64, not {inv_dtype}")
        self.hyperparam.damping = float(damping)
        self.hyperparam.cov_ema_decay = float(cov_ema_decay)
        self.fisher_type = fisher_type
        self.bn_fisher = bn_fisher
        self.inv_dtype = inv_dtype
        self.factor_dtype = check_factor_dtype(factor_dtype, "KFAC")
        self.stats_batchsize = stats_batchsize
        self.batched_inversion = bool(batched_inversion)
        self.schedule = schedule if schedule is not None else StatisticsSchedule()
        self.seed = seed
        self.rng = numpy.random.default_rng(seed)
        self.fallbacks = FallbackCounter()
        self.fisher_blocks = {}
        self._collecting = []  # the layers whose statistics the current step collects
        self.timer = StageTimer()

    def setup(self, link):
        super().setup(link)
        self.fisher_blocks = build_fisher_blocks(link, self.bn_fisher, self.factor_dtype,
                                                 self.stats_batchsize)
        return self

    # -- the stages ----------------------------------------------------------
    def due_layers(self):
        """Paths of the layers whose factors are refreshed at this step."""
        return [path for path in self.fisher_blocks
                if self.schedule.factors_due(path, self.t)]

    def compute_local_statistics(self, due, lossfun, *args, **kwds):
        """Stage 1: forward, backward and the due layers' statistic sums; returns the loss.

        ``args`` may be a single :class:`~kfac_mn.optimizer.MicroBatches`: then every
        micro-batch adds to the same sums and gradients (see ``compute_gradients``).
        """
        for path in due:
            self.fisher_blocks[path].reset_sums()
        self._collecting = due
        return self.compute_gradients(lossfun, *args, **kwds)

    def backward_batch(self, lossfun, args, kwds):
        """Forward and backward of one batch, adding to the gradients and to the statistic
        sums of the layers :meth:`compute_local_statistics` collects."""
        due = self._collecting
        params = list(self.target.params())  # lazy ones included: initialised by lossfun
        sampled = self.fisher_type == "mc" and bool(due)
        hook = KFACHook(self.fisher_blocks, due)
        with hook:
            with self.timer("forward"):
                loss = lossfun(*args, **kwds)
            with self.timer("backward"):
                if sampled:
                    before = [param.grad for param in params]
                    self._backward_sampled(lossfun)
                    for param, grad in zip(params, before):
                        param.grad = grad  # drop the sampled-label gradient
                else:
                    loss.backward()
        if sampled:
            with self.timer("backward"):
                loss.backward()  # the true-label gradient, not observed by the hook
        loss.unchain()
        # the factor work done inside the hook is reported as its own stage
        self.timer.move("forward", "factors", hook.forward_seconds)
        self.timer.move("backward", "factors", hook.backward_seconds)
        return loss

    def _backward_sampled(self, lossfun):
        """Back-propagate the loss of labels drawn from the model (Monte-Carlo Fisher)."""
        logits = getattr(lossfun, "y", None)
        if logits is None:
            raise TypeError(
                "fisher_type='mc' needs lossfun to expose the logits of its last call as "
                "lossfun.y (use kfac_mn.links.Classifier)")
        xp = backend.get_array_module(logits.data)
        probs = backend.to_cpu(F.softmax(logits).data).astype(numpy.float64)
        cumulative = probs.cumsum(axis=1)
        u = self.rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
        sampled = (cumulative < u).sum(axis=1).clip(0, probs.shape[1] - 1)
        fisher_loss = F.softmax_cross_entropy(logits, xp.asarray(sampled.astype(numpy.int32)))
        fisher_loss.backward()

    def update_and_invert(self, paths):
        """Stage 3a: new statistics -> running factors -> (when due) damped inverses."""
        due = []
        for path in paths:
            block = self.fisher_blocks[path]
            # decide both before report_change moves the layer's next refresh
            refresh = self.schedule.factors_due(path, self.t) and block.has_statistics()
            invert = self.schedule.inverse_due(path, self.t)
            if refresh:
                with self.timer("running_factors"):
                    change = block.update_factors(block.averaged_statistics(),
                                                  self.hyperparam.cov_ema_decay)
                self.schedule.report_change(path, self.t, change)
            if invert and block.factors:
                due.append(block)
        if due:
            with self.timer("inversion"):
                self.compute_inverses(due)

    def compute_inverses(self, blocks):
        """The damped inverses of ``blocks``: block by block, or with ``batched_inversion``
        every block's matrices together, one batch per size."""
        damping, dtype = self.hyperparam.damping, self.inv_dtype
        if not self.batched_inversion:
            for block in blocks:
                block.compute_inverses(damping, dtype, self.fallbacks)
            return
        requests = []
        for block in blocks:
            own = block.inversion_requests(damping)
            if not own:  # a block that inverts in its own way (BN 'diag', 'unit')
                block.compute_inverses(damping, dtype, self.fallbacks)
            requests += [(block, request) for request in own]
        inverses = batched_damped_inverses([request for _, request in requests], dtype,
                                           self.fallbacks)
        for (block, request), inverse in zip(requests, inverses):
            block.take_inverse(request.name, inverse)

    def precondition(self, paths):
        """Stage 3b: replace each owned layer's gradient by its preconditioned gradient."""
        with self.timer("precondition"):
            for path in paths:
                block = self.fisher_blocks[path]
                if block.inverses and block.gradients_ready():
                    block.precondition()

    def apply_update(self):
        """Stage 5: momentum SGD with the (preconditioned) gradients, optimizer hooks."""
        with self.timer("update"):
            return super().update()

    def update(self, lossfun=None, *args, **kwds):
        """One K-FAC step (stages 1, 3 and 5 of Figure 1 on one worker)."""
        if lossfun is None:
            raise TypeError("KFAC.update needs lossfun: the statistics come from its backward")
        self._check_setup()
        self.timer.reset()
        due = self.due_layers()
        loss = self.compute_local_statistics(due, lossfun, *args, **kwds)
        paths = list(self.fisher_blocks)
        self.update_and_invert(paths)
        self.precondition(paths)
        self.apply_update()
        return loss

    def intervals(self):
        """Current refresh interval of each layer (for the training log)."""
        return {path: self.schedule.interval(path) for path in self.fisher_blocks}

    # -- state ----------------------------------------------------------------
    def serialize(self, serializer):
        """Everything needed to continue exactly: rules, factors, inverses, schedule, RNG."""
        super().serialize(serializer)
        loading = isinstance(serializer, Deserializer)
        fisher = serializer["fisher"]
        for path, block in self.fisher_blocks.items():
            block.serialize(fisher[path])
        self.schedule.serialize(serializer["schedule"], list(self.fisher_blocks))
        counts = serializer["fallbacks"]
        for kind in ("float64", "more_damping"):
            self.fallbacks[kind] = int(counts(kind, self.fallbacks[kind]))
        # the Monte-Carlo label sampler; PCG64's 128-bit integers travel as JSON text
        text = json.dumps(self.rng.bit_generator.state).encode()
        mine = None if loading else numpy.frombuffer(text, dtype=numpy.uint8).copy()
        stored = serializer("rng_state", mine)
        if loading and stored is not None:
            self.rng.bit_generator.state = json.loads(bytes(stored).decode())
