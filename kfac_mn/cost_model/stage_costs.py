"""Seconds of each stage of one iteration on P workers (see :mod:`kfac_mn.cost_model`).

Compute per worker (stage 1's forward, backward and factors; stage 3's running factors,
inversion and preconditioning per work item; stage 5's update), modelled from a
:class:`~kfac_mn.cost_model.trace.Profile` and a :class:`~kfac_mn.cost_model.machine.Machine`
or rescaled to a measured one-process run; the collectives by the alpha-beta formulas of
:mod:`kfac_mn.communicators.v_collectives`, for each variable-count algorithm;
:func:`iteration` puts them together for SGD, K-FAC every step and stale K-FAC.
"""
import dataclasses
import math

from kfac_mn.communicators import v_collectives
from kfac_mn.distributed import assignment as layer_assignment
from kfac_mn.distributed import packed_layout
from kfac_mn.fisher.blocks import KroneckerBlock

STAGES = ("forward_backward", "factors", "reduce_scatter", "owner_work", "allgather", "update")
MODES = ("sgd", "kfac_every_step", "kfac_stale")
#: activation-sized arrays a function reads or writes, (forward, backward); others: (2, 3)
ELEMENTWISE_PASSES = {"BatchNormalization": (4, 6), "ReLU": (2, 3), "Add": (3, 2),
                      "MaxPooling2D": (2, 3), "GlobalAveragePooling2D": (1, 1),
                      "AveragePooling2D": (2, 2)}
#: float32 parameter-sized passes of one update: momentum SGD (read p, g, v; write p, v) and
#: the weight rescaling (read, write)
UPDATE_PASSES = 7


def forward_backward_seconds(profile, machine, batch):
    """Seconds of the forward and backward pass of ``batch`` examples (stage 1, no factors)."""
    total = 0.0
    for call in profile.calls:
        gemm = call.gemm_flops * (3 if not call.first else 2)
        forward, backward = ELEMENTWISE_PASSES.get(call.label, (2, 3))
        moved = (forward + backward) * call.elements
        if machine.im2col:  # patches written and read forward, twice backward (dW, dx)
            moved += 6 * call.patch_values
        total += (batch * (gemm / machine.flops + moved * machine.act_bytes
                           / machine.mem_bandwidth) + 3 * machine.latency)
    return total


def factor_seconds(profile, machine, batch):
    """{layer: seconds to compute its statistics of ``batch`` examples} (stage 1)."""
    costs = {}
    for item in profile.items:
        if item.block is None:
            continue
        call = profile.call_of[item.name]
        if isinstance(item.block, KroneckerBlock):
            shapes = item.statistic_shapes()
            in_dim, out_dim = shapes["A"][0], shapes["G"][0]
            flops = 2 * batch * call.positions * (in_dim ** 2 + out_dim ** 2)
            moved = 2 * batch * call.patch_values * machine.act_bytes
            costs[item.name] = (flops / machine.flops + moved / machine.mem_bandwidth
                                + 2 * machine.latency)
        else:
            moved = 3 * batch * call.elements * machine.act_bytes
            costs[item.name] = moved / machine.mem_bandwidth + 2 * machine.latency
    return costs


def owner_seconds(profile, machine):
    """{item: (inversion seconds, preconditioning seconds)} of its owner (stage 3)."""
    costs = {}
    for item in profile.items:
        if item.block is None:
            costs[item.name] = (0.0, 0.0)
        elif isinstance(item.block, KroneckerBlock):
            shapes = item.statistic_shapes()
            in_dim, out_dim = shapes["A"][0], shapes["G"][0]
            inversion = item.block.inversion_cost() / machine.inv_flops + 6 * machine.latency
            flops = 2 * out_dim ** 2 * in_dim + 2 * out_dim * in_dim ** 2
            costs[item.name] = (inversion, flops / machine.fp32_flops + 2 * machine.latency)
        else:
            inversion = item.block.inversion_cost() / machine.inv_flops
            costs[item.name] = (inversion + 3 * machine.latency,
                                4 * 4 * item.gradient_size() / machine.mem_bandwidth
                                + machine.latency)
    return costs


def running_factor_seconds(profile, machine):
    """{item: seconds to fold new statistics into its running factors} (stage 3, refreshed
    layers only): a few passes over each factor, float32."""
    costs = {}
    for item in profile.items:
        values = sum(math.prod(shape) for shape in item.statistic_shapes().values()) \
            if item.block is not None else 0
        costs[item.name] = (3 * 4 * values / machine.mem_bandwidth + machine.latency
                            if values else 0.0)
    return costs


def update_seconds(profile, machine):
    """Seconds of momentum SGD and weight rescaling on every parameter (stage 5)."""
    return (UPDATE_PASSES * 4 * profile.parameters / machine.mem_bandwidth
            + 2 * profile.arrays * machine.latency)


@dataclasses.dataclass
class Compute:
    """Per-worker compute of one iteration at a batch; stage 3 per item (see owner_seconds).
    SGD's forward+backward and update have their own fields: K-FAC's hook adds to them."""

    forward_backward: float
    factors: float
    owner: dict
    update: float
    sgd_forward_backward: float
    sgd_update: float


def modelled_compute(profile, machine, batch):
    forward_backward = forward_backward_seconds(profile, machine, batch)
    update = update_seconds(profile, machine)
    running = running_factor_seconds(profile, machine)
    owner = {name: (inversion + running[name], precondition)
             for name, (inversion, precondition) in owner_seconds(profile, machine).items()}
    return Compute(forward_backward, sum(factor_seconds(profile, machine, batch).values()),
                   owner, update, forward_backward, update)


def measured_compute(profile, machine, batch, measured):
    """The modelled compute rescaled stage by stage to a bench_kfac.py run (``measured``)."""
    stages, at = measured["stages"]["kfac_every_step"], measured["batchsize"]
    owner, running = owner_seconds(profile, machine), running_factor_seconds(profile, machine)

    def scale(measured_seconds, modelled):
        total = sum(modelled)
        return measured_seconds / total if total else 0.0

    scale_inv = scale(stages["inversion"], [value[0] for value in owner.values()])
    scale_pre = scale(stages["precondition"], [value[1] for value in owner.values()])
    scale_run = scale(stages.get("running_factors", 0.0), running.values())
    sgd = measured["stages"]["sgd"]
    return Compute((stages["forward"] + stages["backward"]) * batch / at,
                   stages["factors"] * batch / at,
                   {name: (inv * scale_inv + running[name] * scale_run, pre * scale_pre)
                    for name, (inv, pre) in owner.items()},
                   stages["update"], (sgd["forward"] + sgd["backward"]) * batch / at,
                   sgd["update"])


def collective_seconds(algorithm, operation, counts, bytes_per_value, machine):
    """Seconds of one variable-count collective of ``counts`` values per rank: the formulas of
    :func:`kfac_mn.communicators.v_collectives.seconds` (the ones the communicators' ``auto``
    uses) with the machine's alpha, bandwidth and call overhead; ``auto``: the cheapest."""
    if algorithm == "auto":
        return min(collective_seconds(name, operation, counts, bytes_per_value, machine)
                   for name in v_collectives.ALGORITHMS)
    return v_collectives.seconds(algorithm, operation, counts, bytes_per_value, machine.alpha,
                                 machine.bandwidth, machine.call_overhead)


def allreduce_seconds(values, size, bytes_per_value, machine):
    """A ring all-reduce of ``values`` values (SGD's gradients): overhead + 2(P-1) alpha +
    2 (P-1)/P bytes / bandwidth."""
    counts = [values // size + (rank < values % size) for rank in range(size)]
    return collective_seconds("allreduce", "reduce_scatter_v", counts, bytes_per_value,
                              machine)


def packing_seconds(grad_segments, grad_values, stat_segments, stat_values, machine):
    """Packing a buffer and unpacking it: a cost per tensor and per value, gradients and
    statistics apart (``Machine.pack_*``; the ``half_`` ones when communicating in float16)."""
    prefix = "half_" if machine.comm_bytes == 2 else ""

    def cost(name):
        return getattr(machine, prefix + name)

    return (grad_segments * cost("pack_grad") + grad_values * cost("pack_grad_value")
            + stat_segments * cost("pack_stat") + stat_values * cost("pack_stat_value"))


@dataclasses.dataclass
class Layout:
    """Values per owner rank of one step's collectives, for one assignment."""

    gradients: list   # gradient values each rank owns
    statistics: list  # packed statistic values each rank owns (every layer due)
    trailer: list     # values each rank appends to its stage-4 segment (schedule state)
    owners: list      # owner rank of each item
    agreement: int    # float64 values per rank in the stage-2 agreement all-gather
    grad_segments: int  # gradient tensors in each buffer
    stat_segments: int  # statistic tensors in the stage-2 buffer when every layer is due


def layout(profile, size, method, half, adaptive):
    items = profile.items
    owners = layer_assignment.assign(items, size, method)
    due = [item.name for item in items if item.block is not None]
    segments = packed_layout.reduce_scatter_segments(items, owners, due)
    gradients = packed_layout.counts_by_owner(packed_layout.allgather_segments(items, owners),
                                              size)
    both = packed_layout.counts_by_owner(segments, size)
    statistics = [b - g for b, g in zip(both, gradients)]
    trailer = [0] * size
    for item, owner in zip(items, owners):
        trailer[owner] += (len(item.params) if half else 0) + (
            2 if adaptive and item.block is not None else 0)
    agreement = 2 + sum(s.kind == "stat" for s in segments) + (len(segments) if half else 0)
    stats = sum(segment.kind == "stat" for segment in segments)
    return Layout(gradients, statistics, trailer, owners, agreement, len(segments) - stats,
                  stats)


def stage_counts(plan, refresh):
    """Values per owner rank of stage 2 (gradients and, on average, the ``refresh`` share of
    the statistics) and of stage 4 (preconditioned gradients and the schedule trailer)."""
    return ([round(g + s * refresh) for g, s in zip(plan.gradients, plan.statistics)],
            [g + t for g, t in zip(plan.gradients, plan.trailer)])


def iteration(profile, compute, machine, size, mode, stale_interval=20, method="balanced",
              kfac_collectives="auto"):
    """{stage: seconds} of one iteration on ``size`` workers in ``mode`` (see MODES), the
    variable-count collectives run by ``kfac_collectives`` (``v_collectives.CHOICES``)."""
    if kfac_collectives not in v_collectives.CHOICES:
        raise ValueError(f"unknown K-FAC collectives {kfac_collectives!r}; valid: "
                         f"{', '.join(v_collectives.CHOICES)}")
    seconds = dict.fromkeys(STAGES, 0.0)
    seconds["forward_backward"] = compute.forward_backward
    seconds["update"] = compute.update
    bytes_per_value = machine.comm_bytes
    if mode == "sgd":
        seconds["forward_backward"] = compute.sgd_forward_backward
        seconds["update"] = compute.sgd_update
        gradients = sum(item.gradient_size() for item in profile.items)
        seconds["reduce_scatter"] = allreduce_seconds(gradients, size, bytes_per_value,
                                                      machine)
        return seconds
    refresh = 1.0 if mode == "kfac_every_step" else 1.0 / stale_interval
    plan = layout(profile, size, method, machine.comm_bytes == 2, mode == "kfac_stale")
    seconds["factors"] = compute.factors * refresh
    owner_load = [0.0] * size
    for item, owner in zip(profile.items, plan.owners):
        inversion, precondition = compute.owner[item.name]
        owner_load[owner] += inversion * refresh + precondition
    seconds["owner_work"] = max(owner_load)
    agreement = collective_seconds(kfac_collectives, "allgather_v", [plan.agreement] * size,
                                   8, machine)
    stage2, stage4 = stage_counts(plan, refresh)
    seconds["reduce_scatter"] = agreement + collective_seconds(
        kfac_collectives, "reduce_scatter_v", stage2, bytes_per_value, machine) + \
        packing_seconds(plan.grad_segments, sum(plan.gradients), plan.stat_segments * refresh,
                        sum(plan.statistics) * refresh, machine)
    seconds["allgather"] = collective_seconds(
        kfac_collectives, "allgather_v", stage4, bytes_per_value, machine) + \
        packing_seconds(plan.grad_segments, sum(plan.gradients), 0, 0, machine)
    return seconds


def scaling_table(profile, compute, machine, ranks, stale_interval=20, method="balanced",
                  kfac_collectives="auto"):
    """[{ranks, mode: {stages, total}}] of :func:`iteration` for each worker count."""
    rows = []
    for size in ranks:
        row = {"ranks": size}
        for mode in MODES:
            stages = iteration(profile, compute, machine, size, mode, stale_interval, method,
                               kfac_collectives)
            row[mode] = {"stages": {name: round(value, 7) for name, value in stages.items()},
                         "total": round(sum(stages.values()), 7)}
        rows.append(row)
    return rows
