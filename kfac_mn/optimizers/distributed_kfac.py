"""Distributed K-FAC in the paper's all-worker layout (Osawa et al., Figure 1).

Every rank holds the whole model and runs all five stages; each rank also *owns* some layers
(:mod:`kfac_mn.fisher.assignment`) and does their second-order work.  One
:meth:`DistributedKFAC.update` is:

1. :meth:`~KFAC.compute_local_statistics` (inherited): forward and backward on the local
   mini-batch; the due layers' statistic *sums* (A, G, BN F) and the local mean gradients.
2. :meth:`~DistributedKFAC.reduce_scatter_statistics`: ONE packed buffer, grouped by owner
   (:mod:`kfac_mn.fisher.packed_layout`): per owned layer its gradients, then the upper
   triangles of its due A and G sums (or its BN sums).  ReduceScatterV adds the buffers of all
   ranks and hands each owner the sums of its own layers only.  The owner divides the summed
   gradients by the number of ranks (the mean of the ranks' mean gradients) and keeps the
   statistics as sums, with their *global* counts, which a small float64 all-gather of the
   local counts provides (integers, so the sum is exact).  ``averaged_statistics`` then
   divides by the global count: N ranks with local batch b compute exactly what one process
   computes with batch N b.
3. :meth:`~DistributedKFAC.precondition_owned_layers`: the owner updates the running factors,
   damps and inverts them (when due) and preconditions its layers' gradients; the other
   ranks' copies of those layers are untouched.  Parameters without a Fisher block are items
   too: their owner just holds their mean gradient.
4. :meth:`~DistributedKFAC.allgather_preconditioned_gradients`: AllGatherV; each rank
   contributes its items' gradients, followed by the schedule state of its layers (the owner
   decides a layer's next refresh from the relative change of its factors, and every rank
   must know it to agree on the next step's due layers).  Every rank, the owner included,
   takes the gathered values, so all ranks hold bit-identical gradients.
5. :meth:`~KFAC.apply_update` (inherited): momentum SGD, the same on every rank.

Communication dtype (``comm_dtype``): float32 or float64 cast the buffers; float16 scales each
segment by a power of two first (:mod:`kfac_mn.fisher.segment_scaling`) so that no sum can
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

from kfac_mn import backend
from kfac_mn.communicators.communicator_base import CommunicatorBase
from kfac_mn.fisher import assignment as layer_assignment
from kfac_mn.fisher import packed_layout, segment_scaling
from kfac_mn.fisher.work_items import build_work_items
from kfac_mn.optimizers.kfac import KFAC
from kfac_mn.optimizers.step_report import StepReport

COMM_DTYPES = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32),
               numpy.dtype(numpy.float64))

#: the largest integer magnitude each communication dtype holds exactly (schedule state and
#: scale exponents travel as such inside the all-gather buffer)
EXACT_INTEGER_LIMIT = {numpy.dtype(numpy.float16): 2 ** 11, numpy.dtype(numpy.float32): 2 ** 24,
                       numpy.dtype(numpy.float64): 2 ** 53}

STAGES = ("1_compute_local_statistics", "2_reduce_scatter_statistics",
          "3_precondition_owned_layers", "4_allgather_preconditioned_gradients",
          "5_apply_update")


class DistributedKFAC(KFAC):
    """K-FAC over the ranks of ``comm``; the other arguments are :class:`KFAC`'s, plus

    ``comm_dtype`` (float16, float32 or float64: the dtype of both collectives' buffers) and
    ``assignment`` ('balanced': greedy on estimated cost; 'equal_count': the authors' split).
    """

    def __init__(self, comm, lr=0.01, momentum=0.9, damping=1e-3, cov_ema_decay=1.0,
                 fisher_type="emp", bn_fisher="diag", inv_dtype=numpy.float32, schedule=None,
                 seed=0, comm_dtype=numpy.float32, assignment="balanced", factor_dtype=None,
                 stats_batchsize=None):
        if not isinstance(comm, CommunicatorBase):
            raise TypeError("DistributedKFAC: comm must be a communicator from "
                            f"kfac_mn.communicators.create_communicator, got {type(comm).__name__}")
        super().__init__(lr=lr, momentum=momentum, damping=damping, cov_ema_decay=cov_ema_decay,
                         fisher_type=fisher_type, bn_fisher=bn_fisher, inv_dtype=inv_dtype,
                         schedule=schedule, seed=seed, factor_dtype=factor_dtype,
                         stats_batchsize=stats_batchsize)
        comm_dtype = numpy.dtype(comm_dtype)
        if comm_dtype not in COMM_DTYPES:
            raise ValueError(f"DistributedKFAC comm_dtype must be float16, float32 or float64, "
                             f"not {comm_dtype}")
        if assignment not in layer_assignment.ASSIGNMENTS:
            raise ValueError(f"DistributedKFAC assignment must be one of "
                             f"{', '.join(layer_assignment.ASSIGNMENTS)}, not {assignment!r}")
        limit = EXACT_INTEGER_LIMIT[comm_dtype]
        if self.schedule.mode == "adaptive" and self.schedule.max_interval > limit:
            raise ValueError(f"DistributedKFAC: schedule max_interval={self.schedule.max_interval}"
                             f" is not exact in {comm_dtype} communication (at most {limit})")
        self.comm = comm
        self.comm_dtype = comm_dtype
        self.assignment = assignment
        self.rng = numpy.random.default_rng([seed, comm.rank])  # each rank samples its own labels
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
        self._agreement_slots = agreement_slots(self.work_items, owners, self.comm_dtype)
        self._gathered_by_rank = [[] for _ in range(self.comm.size)]
        for segment in packed_layout.allgather_segments(self.work_items, owners):
            self._gathered_by_rank[segment.owner].append(segment)
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
            self.precondition_owned_layers()
        with report.stage(STAGES[3]):
            self.allgather_preconditioned_gradients()
        with report.stage(STAGES[4]):
            self.apply_update()
        report.info.update(step=self.t, due_layers=len(due),
                           owned_layers=len(self.owned_layers()),
                           compute_seconds=dict(self.timer.seconds))
        self.last_step_report = report.as_dict()
        return loss

    def reduce_scatter_statistics(self, due):
        """Stage 2: each owner receives the global sums of its layers' gradients and statistics.

        Afterwards the owner's blocks hold the summed statistics in ``sums`` with the global
        ``counts``, and its parameters the mean gradient over ranks; the other due blocks hold
        no sums (theirs went into the buffer).
        """
        rank, size, dtype = self.comm.rank, self.comm.size, self._param_dtype()
        segments = packed_layout.reduce_scatter_segments(self.work_items, self._owner_list(),
                                                         due)
        owner_counts = packed_layout.counts_by_owner(segments, size)
        mine = [segment for segment in segments if segment.owner == rank]
        sendbuf = packed_layout.pack(segments, self.target.xp, dtype)
        counts, bounds = self._agree_on_counts_and_bounds(segments, sendbuf)
        if self.comm_dtype == numpy.float16:
            exponents = segment_scaling.scale_exponents(
                bounds, size, [segment.label for segment in segments])
            sendbuf = segment_scaling.to_float16(sendbuf, _sizes(segments), exponents)
            received = self.comm.reduce_scatter_v(sendbuf, owner_counts)
            own = [i for i, segment in enumerate(segments) if segment.owner == rank]
            received = segment_scaling.from_float16(received, _sizes(mine), exponents[own],
                                                    dtype)
        else:
            received = self.comm.reduce_scatter_v(sendbuf.astype(self.comm_dtype, copy=False),
                                                  owner_counts)
            received = received.astype(dtype, copy=False)
        for path in due:
            self.fisher_blocks[path].reset_sums()
        for segment, value in packed_layout.unpack(received, mine):
            if segment.kind == "grad":
                param = dict(segment.item.params)[segment.key]
                param.grad = (value / size).astype(param.dtype, copy=False)
            elif counts[segment.item.name, segment.key] > 0:
                block = segment.item.block
                block.sums[segment.key] = value
                block.counts[segment.key] = counts[segment.item.name, segment.key]

    def precondition_owned_layers(self):
        """Stage 3: running factors, damped inverses and preconditioned gradients, owner only."""
        mine = self.owned_layers()
        self.update_and_invert(mine)
        self.precondition(mine)

    def allgather_preconditioned_gradients(self):
        """Stage 4: every rank receives every owner's gradients and its layers' schedule state."""
        by_rank = self._gathered_by_rank
        xp = self.target.xp
        mine = by_rank[self.comm.rank]
        payload = packed_layout.pack(mine, xp, self._param_dtype())
        trailer = []
        if self.comm_dtype == numpy.float16:
            exponents = segment_scaling.scale_exponents(
                segment_scaling.segment_max_abs(payload, _sizes(mine)), 1,
                [segment.label for segment in mine])
            payload = segment_scaling.to_float16(payload, _sizes(mine), exponents)
            trailer.extend(exponents.tolist())
        trailer.extend(self._schedule_state(self.comm.rank))
        sendbuf = xp.concatenate([payload.astype(self.comm_dtype, copy=False),
                                  xp.asarray(trailer, dtype=self.comm_dtype)])
        counts = [sum(_sizes(segments)) + self._trailer_length(rank, segments)
                  for rank, segments in enumerate(by_rank)]
        gathered = self.comm.allgather_v(sendbuf, counts)
        offset = 0
        for rank, segments in enumerate(by_rank):
            n_values = sum(_sizes(segments))
            values = gathered[offset:offset + n_values]
            trailer = _exact_integers(gathered[offset + n_values:offset + counts[rank]], rank)
            offset += counts[rank]
            if self.comm_dtype == numpy.float16:
                values = segment_scaling.from_float16(values, _sizes(segments),
                                                      trailer[:len(segments)],
                                                      self._param_dtype())
                trailer = trailer[len(segments):]
            else:
                values = values.astype(self._param_dtype(), copy=False)
            for segment, value in packed_layout.unpack(values, segments):
                dict(segment.item.params)[segment.key].grad = value
            self._set_schedule_state(rank, trailer)

    # -- helpers ---------------------------------------------------------------
    def _owner_list(self):
        return [self.owners[item.name] for item in self.work_items]

    def _param_dtype(self):
        return self.work_items[0].params[0][1].dtype

    def _agree_on_counts_and_bounds(self, segments, sendbuf):
        """Global counts of the due statistics and, for float16, each segment's bound.

        One float64 all-gather of a vector of the same length at every step: this rank's
        number of due statistics and buffer length (which must match on every rank), its local
        count of every statistic (0 when not due) and, for float16, its largest magnitude in
        every segment (0 when absent).  Every rank adds the counts (integers: exact in any
        order) and takes the maxima, so all ranks agree bit for bit.  Returns
        ({(layer, statistic): count}, bounds of ``segments``).
        """
        slots = self._agreement_slots
        local = numpy.zeros(2 + len(slots["count"]) + len(slots["bound"]))
        local[:2] = sum(segment.kind == "stat" for segment in segments), sendbuf.size
        for segment in segments:
            if segment.kind == "stat":
                local[slots["count"][segment.item.name, segment.key]] = (
                    packed_layout.local_count(segment))
        if self.comm_dtype == numpy.float16:
            maxima = segment_scaling.segment_max_abs(sendbuf, _sizes(segments))
            local[[slots["bound"][_slot_key(segment)] for segment in segments]] = maxima
        table = numpy.asarray(self.comm.allgather_v(local, [local.size] * self.comm.size))
        table = table.reshape(self.comm.size, local.size)
        if not numpy.array_equal(table[:, :2], numpy.broadcast_to(local[:2], (self.comm.size, 2))):
            raise RuntimeError(
                f"DistributedKFAC step {self.t}: the ranks disagree on the stage-2 buffer "
                f"((statistics due, length) per rank: {table[:, :2].astype(int).tolist()}); "
                "the step counts, schedules or models differ between ranks")
        totals = table.sum(axis=0)
        counts = {key: int(totals[slot]) for key, slot in slots["count"].items()}
        if self.comm_dtype != numpy.float16:
            return counts, None
        largest = table.max(axis=0)
        return counts, largest[[slots["bound"][_slot_key(segment)] for segment in segments]]

    def _trailer_length(self, rank, segments):
        exponents = len(segments) if self.comm_dtype == numpy.float16 else 0
        return exponents + len(self._schedule_state_paths(rank)) * 2

    def _schedule_state_paths(self, rank):
        return self._blocks_by_rank[rank] if self.schedule.mode == "adaptive" else []

    def _schedule_state(self, rank):
        """(interval, steps to the next refresh) of each layer of ``rank``; (0, 0): none yet.

        A refresh that is already due is sent as 0 steps away: every step at or after the
        current one makes the same decision.
        """
        state = []
        for path in self._schedule_state_paths(rank):
            if path in self.schedule.next_step:
                state.extend([self.schedule.intervals[path],
                              max(self.schedule.next_step[path] - self.t, 0)])
            else:
                state.extend([0, 0])
        return state

    def _set_schedule_state(self, rank, values):
        paths = self._schedule_state_paths(rank)
        for index, path in enumerate(paths):
            interval, offset = int(values[2 * index]), int(values[2 * index + 1])
            if interval > 0:
                self.schedule.intervals[path] = interval
                self.schedule.next_step[path] = self.t + offset


def _sizes(segments):
    return [segment.size for segment in segments]


def _slot_key(segment):
    return segment.item.name, segment.kind, segment.key


def agreement_slots(items, owners, comm_dtype):
    """Positions in the stage-2 agreement vector (after its 2 header values).

    'count': one per statistic of every layer; 'bound' (float16 only): one per segment of a
    step that refreshes every layer.
    """
    every_layer = [item.name for item in items if item.block is not None]
    segments = packed_layout.reduce_scatter_segments(items, owners, every_layer)
    statistics = [segment for segment in segments if segment.kind == "stat"]
    count = {(segment.item.name, segment.key): 2 + i for i, segment in enumerate(statistics)}
    bound = {}
    if numpy.dtype(comm_dtype) == numpy.float16:
        bound = {_slot_key(segment): 2 + len(count) + i for i, segment in enumerate(segments)}
    return {"count": count, "bound": bound}


def _exact_integers(values, rank):
    """The trailer of ``rank`` as int64 on the host; every value must be a whole number."""
    host = backend.to_cpu(values).astype(numpy.float64)
    if not numpy.array_equal(host, numpy.round(host)):
        raise ValueError(f"DistributedKFAC: the all-gather trailer of rank {rank} is not "
                         f"integral ({host.tolist()}); the buffers are misaligned")
    return host.astype(numpy.int64)
