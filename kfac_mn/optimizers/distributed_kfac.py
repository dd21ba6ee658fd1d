"""Distributed K-FAC in the paper's all-worker layout (Osawa et al., Figure 1).

Every rank holds the whole model and runs all five stages; each rank also *owns* some layers
(:mod:`kfac_mn.distributed.assignment`) and does their second-order work.  One
:meth:`DistributedKFAC.update` is:

1. :meth:`~KFAC.compute_local_statistics` (inherited): forward and backward on the local
   mini-batch; the due layers' statistic *sums* (A, G, BN F) and the local mean gradients.
2. :meth:`~DistributedKFAC.reduce_scatter_statistics`: ONE packed buffer, grouped by owner
   (:mod:`kfac_mn.distributed.packed_layout`): per owned layer its gradients, then the upper
   triangles of its due A and G sums (or its BN sums).  ReduceScatterV adds the buffers of all
   ranks and hands each owner the sums of its own layers only.  The owner divides the summed
   gradients by the number of ranks (the mean of the ranks' mean gradients) and keeps the
   statistics as sums, with their *global* counts, which a small float64 all-gather of the
   local counts provides (integers, so the sum is exact;
   :mod:`kfac_mn.distributed.agreement`).  ``averaged_statistics`` then
   divides by the global count: N ranks with local batch b compute exactly what one process
   computes with batch N b.
3. :meth:`~DistributedKFAC.precondition_owned_layers`: the owner updates the running factors,
   damps and inverts them (when due) and preconditions its layers' gradients; the other
   ranks' copies of those layers are untouched.  Parameters without a Fisher block are items
   too: their owner just holds their mean gradient.
4. :meth:`~DistributedKFAC.allgather_preconditioned_gradients`: AllGatherV; each rank
   contributes its items' gradients, followed by the schedule state of its layers (the owner
   decides a layer's next refresh from the relative change of its factors, and every rank
   must know it to agree on the next step's due layers; :mod:`kfac_mn.distributed.trailer`).
   Every rank, the owner included, takes the gathered values, so all ranks hold
   bit-identical gradients.
5. :meth:`~KFAC.apply_update` (inherited): momentum SGD, the same on every rank.

Communication dtype (``comm_dtype``): float32 or float64 cast the buffers; float16 scales each
segment by a power of two first (:mod:`kfac_mn.distributed.segment_scaling`) so that no sum can
overflow.  In stage 2 every rank needs the same scales, so the all-gather of the counts also
carries each rank's largest magnitude per segment; in stage 4 each rank scales its own
segments and sends the exponents (small integers, exact in float16) after them.

Equal local batch sizes are assumed, as in data-parallel training: the gradient is the mean
of the ranks' mean gradients (the statistics are exact for any split).  The initial weights
are rank 0's: :meth:`setup` broadcasts them.  After each step ``last_step_report``
(:mod:`kfac_mn.optimizers.step_report`) holds the seconds and bytes of every stage, and the
inherited ``timer``'s finer split of the computation (forward, backward, factors, inversion,
precondition, update) as ``compute_seconds``.
"""
import numpy

from kfac_mn.communicators.communicator_base import CommunicatorBase
from kfac_mn.distributed import agreement, packed_layout, segment_scaling, trailer
from kfac_mn.distributed import assignment as layer_assignment
from kfac_mn.distributed.packed_layout import owned_by, sizes
from kfac_mn.distributed.work_items import build_work_items
from kfac_mn.fisher.inverse import InversionError
from kfac_mn.optimizers.kfac import KFAC
from kfac_mn.optimizers.step_report import StepReport

COMM_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
               numpy.dtype(numpy.float64))

STAGES = ("1_compute_local_statistics", "2_reduce_scatter_statistics",
          "3_precondition_owned_layers", "4_allgather_preconditioned_gradients",
          "5_apply_update")


class DistributedKFAC(KFAC):
    """K-FAC over the ranks of ``comm``: ``DistributedKFAC(comm, *, comm_dtype, assignment,
    **kfac_options)``.

    ``comm``: a communicator of :func:`kfac_mn.communicators.create_communicator`;
    ``comm_dtype``: float16, float32 (default) or float64, the dtype of both collectives'
    buffers; ``assignment``: 'balanced' (greedy on estimated cost, default) or 'equal_count'
    (the authors' split); ``kfac_options``: the arguments of :class:`KFAC`.
    """

    def __init__(self, comm, *, comm_dtype=numpy.float32, assignment="balanced",
                 **kfac_options):
        if not isinstance(comm, CommunicatorBase):
            raise TypeError("DistributedKFAC: comm must be a communicator from "
                            f"kfac_mn.communicators.create_communicator, got {type(comm).__name__}")
        super().__init__(**kfac_options)
        comm_dtype = numpy.dtype(comm_dtype)
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"DistributedKFAC comm_dtype must be float16, float32 or float64, "
                             f"not {comm_dtype}")
        if assignment not in layer_assignment.ASSIGNMENTS:
            raise ValueError(f"DistributedKFAC assignment must be one of "
                             f"{', '.join(layer_assignment.ASSIGNMENTS)}, not {assignment!r}")
        limit = trailer.EXACT_INTEGER_LIMIT[comm_dtype]
        if self.schedule.mode == "adaptive" and self.schedule.max_interval > limit:
            raise ValueError(f"DistributedKFAC: schedule max_interval={self.schedule.max_interval}"
                             f" is not exact in {comm_dtype} communication (at most {limit})")
        self.comm = comm
        self.comm_dtype = comm_dtype
        self.half = comm_dtype == numpy.float16
        self.assignment = assignment
        # each rank samples its own labels
        self.rng = numpy.random.default_rng([kfac_options.get("seed", 0), comm.rank])
        self.work_items = []
        self.owners = {}
        self._agreement_slots = {}   # positions in the stage-2 agreement vector
        self._gathered_by_rank = []  # stage-4 segments of each rank
        self._blocks_by_rank = []    # paths of the Fisher blocks each rank owns
        self.last_step_report = None

    def setup(self, link):
        """Build the blocks and work items, broadcast rank 0's weights, assign the owners."""
        super().setup(link)
        self.work_items = build_work_items(link, self.fisher_blocks)
        dtypes = sorted({str(param.dtype) for param in link.params()})
        if len(dtypes) > 1:
            raise TypeError(f"DistributedKFAC packs all parameters into one buffer; they must "
                            f"share one dtype, found {', '.join(dtypes)}")
        self._check_same_model(link)
        self.comm.bcast_data(link)
        owners = layer_assignment.assign(self.work_items, self.comm.size, self.assignment)
        self.owners = {item.name: owner for item, owner in zip(self.work_items, owners)}
        self._agreement_slots = agreement.agreement_slots(self.work_items, owners,
                                                          self.comm_dtype)
        segments = packed_layout.allgather_segments(self.work_items, owners)
        self._gathered_by_rank = [owned_by(segments, rank) for rank in range(self.comm.size)]
        self._blocks_by_rank = [[] for _ in range(self.comm.size)]
        for item, owner in zip(self.work_items, owners):
            if item.block is not None:
                self._blocks_by_rank[owner].append(item.name)
        return self

    def _check_same_model(self, link):
        """Every rank must hold the same parameters (paths, shapes, dtypes) as rank 0."""
        mine = [(path, tuple(param.shape), str(param.dtype))
                for path, param in link.namedparams()]
        root = self.comm.bcast_obj(mine)
        if mine != root:
            first = next((a, b) for a, b in zip(mine + [None], root + [None]) if a != b)
            raise ValueError(f"DistributedKFAC.setup: rank {self.comm.rank}'s model differs "
                             f"from rank 0's: {first[0]} here, {first[1]} on rank 0")

    def owned_layers(self):
        """Paths of the Fisher blocks this rank owns, in block order."""
        self._check_setup()
        return list(self._blocks_by_rank[self.comm.rank])

    # -- the stages ----------------------------------------------------------
    def update(self, lossfun=None, *args, **kwds):
        """One step: the five stages of Figure 1; returns this rank's loss."""
        if lossfun is None:
            raise TypeError("DistributedKFAC.update needs lossfun: the statistics come from "
                            "its backward")
        self._check_setup()
        self.timer.reset()
        report = StepReport(self.comm)
        due = self.due_layers()
        with report.stage(STAGES[0]):
            loss = self.compute_local_statistics(due, lossfun, *args, **kwds)
        with report.stage(STAGES[1]):
            self.reduce_scatter_statistics(due)
        with report.stage(STAGES[2]):
            failure = self.precondition_owned_layers()
        with report.stage(STAGES[3]):
            self.allgather_preconditioned_gradients()
        if failure is not None:  # raised only now: the other ranks must not wait for us
            raise failure
        with report.stage(STAGES[4]):
            self.apply_update()
        report.info.update(step=self.t, due_layers=len(due),
                           owned_layers=len(self.owned_layers()),
                           compute_seconds=dict(self.timer.seconds))
        self.last_step_report = report.as_dict()
        return loss

    def reduce_scatter_statistics(self, due):
        """Stage 2: each owner receives the global sums of its layers' gradients and statistics.

        Afterwards the owner's blocks hold the summed statistics with their global counts, and
        its parameters the mean gradient over ranks; the other due blocks hold no sums (theirs
        went into the buffer).
        """
        rank, size, dtype = self.comm.rank, self.comm.size, self._param_dtype()
        # pack
        segments = packed_layout.reduce_scatter_segments(self.work_items, self._owner_list(),
                                                         due)
        mine = owned_by(segments, rank)
        sendbuf = packed_layout.pack(segments, self.target.xp, dtype)
        local = agreement.local_agreement(self._agreement_slots, segments, sendbuf, self.half)
        table = numpy.asarray(self.comm.allgather_v(local, [local.size] * size))
        counts, bounds = agreement.read_agreement(table.reshape(size, local.size),
                                                  self._agreement_slots, segments, self.half,
                                                  self.t)
        exponents = None
        if self.half:
            exponents = segment_scaling.scale_exponents(
                bounds, size, [segment.label for segment in segments])
        # collective
        received = self.comm.reduce_scatter_v(
            segment_scaling.encode(sendbuf, sizes(segments), exponents, self.comm_dtype),
            packed_layout.counts_by_owner(segments, size))
        # unpack
        own_exponents = None if exponents is None else exponents[
            [i for i, segment in enumerate(segments) if segment.owner == rank]]
        values = segment_scaling.decode(received, sizes(mine), own_exponents, dtype)
        for path in due:
            self.fisher_blocks[path].reset_sums()
        statistics = {}
        for segment, value in packed_layout.unpack(values, mine):
            if segment.kind == "grad":
                param = segment.param()
                param.grad = (value / size).astype(param.dtype, copy=False)
            else:
                statistics.setdefault(segment.item.name, {})[segment.key] = value
        for path, sums in statistics.items():
            self.fisher_blocks[path].take_global_sums(
                sums, {name: counts[path, name] for name in sums})

    def precondition_owned_layers(self):
        """Stage 3: running factors, damped inverses and preconditioned gradients, owner only.

        Returns the :class:`~kfac_mn.fisher.inverse.InversionError` of a factor that could
        not be inverted even after the fallbacks (None if all went well), for
        :meth:`update` to raise once stage 4 has let the other ranks go on; the owner then
        sends the layer's gradients as they are."""
        mine = self.owned_layers()
        try:
            self.update_and_invert(mine)
        except InversionError as error:
            return error
        self.precondition(mine)
        return None

    def allgather_preconditioned_gradients(self):
        """Stage 4: every rank receives every owner's gradients and its layers' schedule state."""
        by_rank, xp, dtype = self._gathered_by_rank, self.target.xp, self._param_dtype()
        # pack
        mine = by_rank[self.comm.rank]
        payload = packed_layout.pack(mine, xp, dtype)
        exponents = None
        if self.half:
            exponents = segment_scaling.scale_exponents(
                segment_scaling.segment_max_abs(payload, sizes(mine)), 1,
                [segment.label for segment in mine])
        values = trailer.build_trailer(exponents, self.schedule,
                                       self._scheduled_layers(self.comm.rank), self.t)
        sendbuf = xp.concatenate([
            segment_scaling.encode(payload, sizes(mine), exponents, self.comm_dtype),
            xp.asarray(values, dtype=self.comm_dtype)])
        counts = [sum(sizes(segments)) + trailer.trailer_length(
                  len(segments), self._scheduled_layers(rank), self.half)
                  for rank, segments in enumerate(by_rank)]
        # collective
        gathered = self.comm.allgather_v(sendbuf, counts)
        # unpack
        offset = 0
        for rank, segments in enumerate(by_rank):
            n_values = sum(sizes(segments))
            part = gathered[offset:offset + n_values]
            rank_exponents = trailer.read_trailer(
                gathered[offset + n_values:offset + counts[rank]], rank, len(segments),
                self.half, self.schedule, self._scheduled_layers(rank), self.t)
            offset += counts[rank]
            part = segment_scaling.decode(part, sizes(segments), rank_exponents, dtype)
            for segment, value in packed_layout.unpack(part, segments):
                segment.param().grad = value

    # -- helpers ---------------------------------------------------------------
    def _owner_list(self):
        return [self.owners[item.name] for item in self.work_items]

    def _param_dtype(self):
        return self.work_items[0].params[0][1].dtype

    def _scheduled_layers(self, rank):
        """The layers whose schedule state ``rank`` sends in its trailer (adaptive only)."""
        return self._blocks_by_rank[rank] if self.schedule.mode == "adaptive" else []
