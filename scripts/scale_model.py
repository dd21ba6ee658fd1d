"""Cost model of one training iteration on P workers: SGD, K-FAC every step, stale K-FAC.

    python scripts/scale_model.py [--ranks 1 2 4 ... 4096] [--batchsize 32] [--out result/scale]
    OPENBLAS_NUM_THREADS=1 python scripts/scale_model.py --calibrate machine.json
    python scripts/scale_model.py --machine-json machine.json --arch resnet_mnist \\
        [--measured-compute bench_kfac.json] --compare-measured bench_comm.json

Weak scaling, as in the paper: every worker keeps ``--batchsize`` examples (32 by default) and
the global batch grows with P.  One iteration on P workers is modelled stage by stage (the
stages of ``DistributedKFAC``, the paper's Figure 1):

* forward_backward (stage 1): per function of the model, traced once at batch 1,
  ``GEMM flops / flops + bytes moved / mem_bandwidth + latency``.  A convolution's GEMMs are
  ``2 b S K O`` flops forward (S output positions, K = C kh kw, O output channels) and twice
  that backward (once when its input is the data); with ``im2col`` (our CPU code; cuDNN on a
  GPU needs none) the patches are written and read once forward and twice backward.  Other
  functions move a fixed number of activation-sized arrays (``ELEMENTWISE_PASSES``).
* factors (stage 1, due layers): A = patches^T patches (``2 b S K^2`` flops, plus writing and
  reading the patches of a convolution), G (``2 b S O^2``); BN: the per-example gamma / beta
  gradients (3 activation passes).
* reduce_scatter (stage 2): a float64 all-gather of the agreement vector, then the
  ReduceScatterV of the packed buffer of ``kfac_mn.distributed.packed_layout`` (gradients and
  upper triangles of the due statistics, grouped by owner).  SGD: a ring all-reduce of the
  gradients.
* owner_work (stage 3): on the most loaded rank of the actual assignment
  (``kfac_mn.distributed.assignment``, greedy by default): folding the new statistics into the
  running factors (3 passes over each factor), inversion ``d^3`` flops per d x d factor
  (Cholesky d^3/3 plus the inverse of the triangle 2 d^3/3) at ``inv_flops``, and the
  preconditioning ``2 O^2 K' + 2 O K'^2`` at ``fp32_flops`` (BN: a few passes over 2C values).
* allgather (stage 4): the AllGatherV of the preconditioned gradients (plus the schedule state).
  Both stages also pack and unpack their buffer (``packing_seconds``): a cost per tensor and
  per value, gradients and statistics (upper triangles) apart; on one worker that is all they
  cost.
* update (stage 5): momentum SGD and the weight rescaling, 7 parameter-sized float32 passes.

Collectives, alpha-beta model (``alpha`` s per message, ``bandwidth`` B/s per link, plus
``call_overhead`` s of software per call) of the ring
algorithm (``kfac_mn.communicators.traffic``): in each of the P-1 steps of a ring
reduce-scatter or all-gather every rank moves one segment at once, so a step lasts as long as
the largest segment, ``(P-1)(alpha + max_r s_r / bandwidth)``; with equal segments this is the
textbook ``(P-1) alpha + (P-1)/P B / bandwidth``.  Variable segments (one owner per layer) are
therefore paid at the size of the largest one (NCCL's padding does the same, see
``kfac_mn.communicators.padding``).  A ring all-reduce of B bytes:
``2(P-1) alpha + 2 (P-1)/P B / bandwidth``.  ``--kfac-collectives allreduce`` models the
authors' stand-in instead: the packed buffer and the gradients each all-reduced.

Stale K-FAC (``--stale-interval M``): every layer refreshes its factors and inverse once in M
steps, so factors, statistics traffic and inversions are divided by M and the
preconditioning stays (the stage-2 segment of rank r is its gradients plus 1/M of its
statistics: an average, not the worst step).

Defaults (``--machine v100-edr``, our assumptions, not the paper's figures): one Tesla V100
per worker with 50 TFLOP/s effective fp16 tensor-core GEMMs (40% of 125 peak), 12 TFLOP/s
effective fp32 GEMMs (of 15.7), 5 TFLOP/s for Cholesky-based inversion (cuSOLVER, large
factors), 750 GB/s effective HBM2 bandwidth (of 900), 10 us per kernel launch, 5 us of
software per collective call, 30 us per packed tensor (60 us in float16), 16 ps per packed
gradient value and 32 ps per statistic value (3 and 6 passes over float32 bytes), fp16
activations and communication (2 bytes), cuDNN (no im2col); InfiniBand EDR between workers,
alpha = 2 us and 12.5 GB/s per link, one flat ring.  ``--machine-json`` replaces them with
another machine's parameters (``--calibrate`` measures this machine's: float32 GEMM and
inversion rates, memory bandwidth and per-function latency of our autograd in this process;
under ``mpiexec -n 2``: alpha and bandwidth by an MPI ping-pong, the overhead of one call of
our communicator, and the packing costs of stages 2 and 4 timed on two ResNets that the
check below does not use, see ``packing_parameters``); explicit flags override both.

``--measured-compute FILE`` takes the compute of stage 1, 3 and 5 from a measured one-process
run instead (the JSON line of ``scripts/bench_kfac.py`` for the same model): each measured
stage (forward + backward, factors, running factors, inversion, precondition, update)
rescales the modelled per-layer costs of that stage, forward/backward/factors linearly in the
batch, so stage 3 is still split over owners as the assignment splits it.

``--compare-measured FILE ...`` prints the model next to measured runs of the same model: the
JSON line of ``scripts/bench_kfac.py`` (P = 1) or of ``scripts/bench_comm.py`` (its measured
part: ``models.resnet_mnist`` at 28x28 on its ranks, float32 and float16 communication).

Prints the table of stage times against P, the estimated minutes of the paper's runs on 1,024
workers next to the paper's 10 minutes, writes ``scale_model.png`` and ``scale_model.json``
under ``--out``, and ends with one JSON line.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_comm  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402
from kfac_mn import no_backprop_mode, using_config  # noqa: E402
from kfac_mn.distributed import assignment as layer_assignment  # noqa: E402
from kfac_mn.distributed import packed_layout  # noqa: E402
from kfac_mn.fisher.blocks import KroneckerBlock  # noqa: E402
from kfac_mn.function_hook import FunctionHook  # noqa: E402
from kfac_mn.functions.patches import output_hw  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
#: the paper's headline run (PAPER.md): 1,024 V100s, mini-batch 32,768, 45 epochs, 1,760
#: iterations, 74.9% top-1 in about 10 minutes
PAPER_RUN = {"workers": 1024, "global_batch": 32768, "epochs": 45, "iterations": 1760,
             "minutes": 10.0}
STAGES = ("forward_backward", "factors", "reduce_scatter", "owner_work", "allgather", "update")
MODES = ("sgd", "kfac_every_step", "kfac_stale")
#: activation-sized arrays a function reads or writes, (forward, backward); others: (2, 3)
ELEMENTWISE_PASSES = {"BatchNormalization": (4, 6), "ReLU": (2, 3), "Add": (3, 2),
                      "MaxPooling2D": (2, 3), "GlobalAveragePooling2D": (1, 1),
                      "AveragePooling2D": (2, 2)}
#: float32 parameter-sized passes of one update: momentum SGD (read p, g, v; write p, v) and
#: the weight rescaling (read, write)
UPDATE_PASSES = 7


@dataclasses.dataclass
class Machine:
    """Rates of one worker and of the links between workers (see the module docstring)."""

    flops: float           # effective GEMM flop/s of forward, backward and factor products
    fp32_flops: float      # effective float32 GEMM flop/s of the preconditioning
    inv_flops: float       # effective flop/s of a Cholesky-based inversion (d^3 flops)
    mem_bandwidth: float   # bytes/s of elementwise work
    latency: float         # seconds per kernel launch (GPU) or function call (CPU)
    alpha: float           # seconds per message
    call_overhead: float   # seconds of software per collective call (our communicator)
    bandwidth: float       # bytes/s per link
    act_bytes: int         # bytes per activation value
    comm_bytes: int        # bytes per communicated value
    im2col: bool           # does a convolution materialise its patches
    # Stages 2 and 4 outside their collectives (pack, unpack and, for float16, the scaling
    # and casts): seconds per gradient tensor, per gradient value, per statistic tensor and
    # per statistic value (upper triangles); float32 and, ``half_``, float16 communication.
    pack_grad: float
    pack_grad_value: float
    pack_stat: float
    pack_stat_value: float
    half_pack_grad: float
    half_pack_grad_value: float
    half_pack_stat: float
    half_pack_stat_value: float


V100_EDR = Machine(flops=50e12, fp32_flops=12e12, inv_flops=5e12, mem_bandwidth=750e9,
                   latency=10e-6, alpha=2e-6, call_overhead=5e-6, bandwidth=12.5e9,
                   act_bytes=2, comm_bytes=2, im2col=False, pack_grad=30e-6,
                   pack_grad_value=1.6e-11, pack_stat=30e-6, pack_stat_value=3.2e-11,
                   half_pack_grad=60e-6, half_pack_grad_value=1.6e-11, half_pack_stat=60e-6,
                   half_pack_stat_value=3.2e-11)
MACHINE_FIELDS = tuple(field.name for field in dataclasses.fields(Machine))


def load_machine(path):
    """A Machine from a JSON object with every field of :class:`Machine` (and 'note')."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--machine-json {path}: cannot read a JSON object ({error})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--machine-json {path}: expected a JSON object")
    unknown = sorted(set(values) - set(MACHINE_FIELDS) - {"note"})
    missing = [name for name in MACHINE_FIELDS if name not in values]
    if unknown or missing:
        raise SystemExit(f"--machine-json {path}: unknown keys {unknown}, missing keys {missing}"
                         f" (valid: {', '.join(MACHINE_FIELDS)}, note)")
    for name in MACHINE_FIELDS:
        value = values[name]
        expected = bool if name == "im2col" else (int, float)
        if isinstance(value, bool) != (name == "im2col") or not isinstance(value, expected) \
                or (name != "im2col" and not value > 0):
            raise SystemExit(f"--machine-json {path}: key {name!r} must be "
                             f"{'true or false' if name == 'im2col' else 'a positive number'}, "
                             f"got {value!r}")
    return Machine(**{name: values[name] for name in MACHINE_FIELDS})


# -- the model's shapes ---------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One function call of the forward pass, per example (traced at batch 1)."""

    label: str
    elements: int          # input activation values
    gemm_flops: int = 0    # forward GEMM flops (conv, linear)
    patch_values: int = 0  # im2col patch values S K (a convolution that is not pointwise)
    positions: int = 1     # output positions S (conv) or spatial size H W (BN)
    weight: int = 0        # id of the weight / gamma array (0: none)
    first: bool = False    # is the input the data (no gradient to propagate)


class ShapeTrace(FunctionHook):
    """Records a :class:`Call` per forward function call."""

    name = "ShapeTrace"

    def __init__(self, data):
        self.data_id = id(data)
        self.calls = []

    def forward_postprocess(self, function, in_data):
        x = in_data[0]
        call = Call(function.label, int(x.size), first=id(x) == self.data_id)
        if function.label == "Convolution2DFunction":
            W = in_data[1]
            out_h, out_w = output_hw(x.shape[2:], W.shape[2:], function.stride, function.pad)
            call.positions = out_h * out_w
            call.gemm_flops = 2 * call.positions * W[0].size * W.shape[0]
            pointwise = W.shape[2:] == (1, 1) and tuple(function.stride) == (1, 1) \
                and tuple(function.pad) == (0, 0)
            call.patch_values = 0 if pointwise else call.positions * W[0].size
            call.weight = id(W)
        elif function.label == "LinearFunction":
            call.gemm_flops = 2 * in_data[1].size
            call.weight = id(in_data[1])
        elif function.label == "BatchNormalization":
            call.positions = int(x.size // x.shape[1])
            call.weight = id(in_data[1])
        self.calls.append(call)


@dataclasses.dataclass
class Profile:
    """What the cost model needs to know about a model."""

    arch: str
    size: int
    calls: list        # Call per forward function, then the loss
    items: list        # work items of distributed K-FAC (kfac_mn.distributed.work_items)
    call_of: dict      # block path -> its Call
    parameters: int
    arrays: int        # parameter arrays


def trace_model(arch, size=None, in_channels=3, n_class=1000):
    """Shapes of ``arch`` from one forward pass at batch 1 (``size``: the model's insize)."""
    if arch not in models.archs:
        raise SystemExit(f"--arch {arch!r} is not one of {', '.join(sorted(models.archs))}")
    np.random.seed(0)
    model = models.archs[arch](n_class=n_class, in_channels=in_channels)
    size = size or model.insize
    x = np.zeros((1, in_channels, size, size), dtype=np.float32)
    trace = ShapeTrace(x)
    with trace, no_backprop_mode(), using_config("train", True):
        model(x)
    calls = trace.calls + [Call("SoftmaxCrossEntropy", n_class)]
    items = bench_comm.work_items_of(model)
    by_weight = {call.weight: call for call in calls if call.weight}
    call_of = {item.name: by_weight[id(item.params[0][1].data)]
               for item in items if item.block is not None}
    params = [param for _, param in model.namedparams()]
    return Profile(arch, size, calls, items, call_of, sum(p.size for p in params), len(params))


# -- compute ----------------------------------------------------------------------------
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
            inversion = (in_dim ** 3 + out_dim ** 3) / machine.inv_flops + 6 * machine.latency
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


# -- communication ------------------------------------------------------------------------
def ring_seconds(segment_bytes, machine):
    """A ring reduce-scatter or all-gather: the call's software overhead, then P-1 steps, each
    as long as the largest segment."""
    steps = len(segment_bytes) - 1
    if not steps:
        return 0.0
    return machine.call_overhead + steps * (machine.alpha + max(segment_bytes)
                                            / machine.bandwidth)


def allreduce_seconds(nbytes, size, machine):
    """A ring all-reduce of ``nbytes``: overhead + 2(P-1) alpha + 2 (P-1)/P nbytes / bandwidth."""
    if size == 1:
        return 0.0
    return machine.call_overhead + 2 * (size - 1) * (machine.alpha
                                                     + nbytes / size / machine.bandwidth)


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


def iteration(profile, compute, machine, size, mode, stale_interval=20, method="balanced",
              kfac_collectives="ring_v"):
    """{stage: seconds} of one iteration on ``size`` workers in ``mode`` (see MODES)."""
    seconds = dict.fromkeys(STAGES, 0.0)
    seconds["forward_backward"] = compute.forward_backward
    seconds["update"] = compute.update
    bytes_per_value = machine.comm_bytes
    if mode == "sgd":
        seconds["forward_backward"] = compute.sgd_forward_backward
        seconds["update"] = compute.sgd_update
        gradients = sum(item.gradient_size() for item in profile.items)
        seconds["reduce_scatter"] = allreduce_seconds(gradients * bytes_per_value, size,
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
    agreement = ring_seconds([plan.agreement * 8] * size, machine)
    if kfac_collectives == "allreduce":
        total_stats = sum(plan.statistics) * refresh
        total_grads = sum(plan.gradients)
        seconds["reduce_scatter"] = agreement + allreduce_seconds(
            (total_grads + total_stats) * bytes_per_value, size, machine) + packing_seconds(
            plan.grad_segments, total_grads, plan.stat_segments * refresh, total_stats, machine)
        seconds["allgather"] = allreduce_seconds(
            total_grads * bytes_per_value, size, machine) + packing_seconds(
            plan.grad_segments, total_grads, 0, 0, machine)
        return seconds
    stage2 = [(g + s * refresh) * bytes_per_value
              for g, s in zip(plan.gradients, plan.statistics)]
    stage4 = [(g + t) * bytes_per_value for g, t in zip(plan.gradients, plan.trailer)]
    seconds["reduce_scatter"] = agreement + ring_seconds(stage2, machine) + packing_seconds(
        plan.grad_segments, sum(plan.gradients), plan.stat_segments * refresh,
        sum(plan.statistics) * refresh, machine)
    seconds["allgather"] = ring_seconds(stage4, machine) + packing_seconds(
        plan.grad_segments, sum(plan.gradients), 0, 0, machine)
    return seconds


def scaling_table(profile, compute, machine, ranks, args):
    rows = []
    for size in ranks:
        row = {"ranks": size}
        for mode in MODES:
            stages = iteration(profile, compute, machine, size, mode, args.stale_interval,
                               args.assignment, args.kfac_collectives)
            row[mode] = {"stages": {name: round(value, 7) for name, value in stages.items()},
                         "total": round(sum(stages.values()), 7)}
        rows.append(row)
    return rows


def paper_estimates(row, batchsize):
    """Minutes of the paper's 1,024-worker runs at the modelled seconds per iteration."""
    global_batch = row["ranks"] * batchsize
    settings = {"45 epochs (paper: 1,760 iterations)": PAPER_RUN["iterations"],
                "35 epochs": math.ceil(35 * IMAGENET_TRAIN_IMAGES / global_batch)}
    return {name: {"iterations": iterations,
                   **{mode: iterations * row[mode]["total"] / 60 for mode in MODES}}
            for name, iterations in settings.items()}


# -- output -------------------------------------------------------------------------------
def print_table(rows, profile, machine, args):
    print(f"{profile.arch} at {profile.size}x{profile.size}, {args.batchsize} examples per "
          f"worker, {len(profile.items)} work items, {profile.parameters:,} parameters; "
          f"stale interval {args.stale_interval}, {args.assignment} assignment, "
          f"K-FAC collectives {args.kfac_collectives}")
    print("machine: " + ", ".join(f"{k}={v:g}" if not isinstance(v, bool) else f"{k}={v}"
                                  for k, v in dataclasses.asdict(machine).items()))
    print("milliseconds per iteration (stages: fwd+bwd, factors, reduce-scatter (SGD: "
          "all-reduce), owner running factors+inversion+precondition, all-gather, update)")
    short = ("fwd+bwd", "factors", "RS", "owner", "AG", "update")
    print(f"{'P':>5} {'SGD':>8} | {'K-FAC':>8} " + " ".join(f"{s:>8}" for s in short)
          + f" | {'stale':>8} " + " ".join(f"{s:>8}" for s in ("RS", "owner", "AG")))
    for row in rows:
        every, stale = row["kfac_every_step"], row["kfac_stale"]
        print(f"{row['ranks']:>5} {row['sgd']['total'] * 1e3:8.1f} | "
              f"{every['total'] * 1e3:8.1f} "
              + " ".join(f"{every['stages'][s] * 1e3:8.1f}" for s in STAGES)
              + f" | {stale['total'] * 1e3:8.1f} "
              + " ".join(f"{stale['stages'][s] * 1e3:8.1f}"
                         for s in ("reduce_scatter", "owner_work", "allgather")))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [row["ranks"] for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        bottom = np.zeros(len(rows))
        for stage in STAGES:
            values = np.array([row[mode]["stages"][stage] * 1e3 for row in rows])
            if values.any():
                ax.fill_between(ranks, bottom, bottom + values, step=None, label=stage,
                                alpha=0.8)
            bottom += values
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers P")
        ax.set_title(mode.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("modelled ms per iteration (stacked by stage)")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- calibration of this machine ----------------------------------------------------------
def best_seconds(function, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_compute():
    """float32 GEMM, inversion, memory and per-call rates of this process (a few seconds)."""
    from kfac_mn import Variable
    from kfac_mn import functions as F
    from kfac_mn.fisher.inverse import damped_inverse

    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 512)).astype(np.float32)
    flops = 2 * 512 * 1024 * 512 / best_seconds(lambda: a @ b)
    d = 512
    m = rng.standard_normal((d, 2 * d)).astype(np.float32)
    spd = m @ m.T / (2 * d)
    inv_flops = d ** 3 / best_seconds(lambda: damped_inverse(spd, 1e-3, np.float32))
    x = np.ones(8 * 2 ** 20, dtype=np.float32)
    y = np.empty_like(x)
    bandwidth = 2 * x.nbytes / best_seconds(lambda: np.multiply(x, 2.0, out=y))
    tiny = Variable(np.ones((1, 1), dtype=np.float32))
    calls = 2000
    latency = best_seconds(lambda: [F.relu(tiny) for _ in range(calls)]) / calls
    return {"flops": flops, "fp32_flops": flops, "inv_flops": inv_flops,
            "mem_bandwidth": bandwidth, "latency": latency}


def pingpong_worker():
    """Rank 0 and 1 bounce small and large messages, then both time their packing work
    (``packing_sample``); rank 0 prints alpha, bandwidth and the ranks' packing samples."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    results = {}
    for nbytes, rounds in ((8, 2000), (4 * 2 ** 20, 20)):
        buffer = np.zeros(nbytes, dtype=np.uint8)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            if comm.rank == 0:
                comm.Send(buffer, dest=1)
                comm.Recv(buffer, source=1)
            else:
                comm.Recv(buffer, source=0)
                comm.Send(buffer, dest=0)
        results[nbytes] = (time.perf_counter() - start) / (2 * rounds)
    alpha = results[8]
    large = 4 * 2 ** 20
    samples = comm.gather(packing_sample(), root=0)
    if comm.rank == 0:
        print(json.dumps({"alpha": alpha, "bandwidth": large / (results[large] - alpha),
                          "packing": samples}))


def measure_network():
    from kfac_mn.communicators.mpiexec import run_under_mpiexec

    done = run_under_mpiexec(2, os.path.abspath(__file__), ["--pingpong-worker"],
                             timeout=120, capture=True)
    if done.returncode != 0:
        raise SystemExit(f"the MPI ping-pong under mpiexec -n 2 failed (exit "
                         f"{done.returncode}):\n{done.stdout}")
    return json.loads(done.stdout.strip().splitlines()[-1])


#: stage names of DistributedKFAC's step report whose local work the packing costs model
PACKING_STAGES = ("2_reduce_scatter_statistics", "4_allgather_preconditioned_gradients")


def local_stage_seconds(report, stage):
    """Seconds of a stage of ``DistributedKFAC.last_step_report`` outside its collectives."""
    entry = report["stages"][stage]
    return entry["seconds"] - sum(c["seconds"] for c in entry["collectives"].values())


#: the two models whose packing work ``--calibrate`` times: ResNets for 32 x 32 inputs, one
#: narrow and one wide, so that costs per tensor and per value can be told apart; neither is
#: a model the check against measured runs uses, so that check stays a test of the model
PACKING_MODELS = {"narrow": (8, 16), "wide": (48, 96)}


def packing_sample(steps=30):
    """This rank's seconds of stages 2 and 4 outside their collectives (pack, unpack, float16
    scaling), float32 and float16, with the tensor and value counts they moved, for each of
    ``PACKING_MODELS`` (``DistributedKFAC`` on every rank of the job, batch 8, every layer
    refreshed, the median of ``steps - 2`` steps); and the seconds of one tiny
    ``allgather_v`` of our communicator."""
    from kfac_mn.communicators import create_communicator
    from kfac_mn.optimizers import DistributedKFAC
    from models.resnet_small import ResNetSmall

    comm = create_communicator()
    tiny = np.zeros(8)
    comm.allgather_v(tiny, [8] * comm.size)
    start = time.perf_counter()
    for _ in range(200):
        comm.allgather_v(tiny, [8] * comm.size)
    sample = {"tiny_allgather_s": (time.perf_counter() - start) / 200}
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    t = rng.integers(0, 10, 8).astype(np.int32)
    runs = {}
    for name, channels in PACKING_MODELS.items():
        for dtype in ("float32", "float16"):
            np.random.seed(0)
            model = ResNetSmall(channels, (1, 1), (1, 2), 10, 3, insize=32)
            optimizer = DistributedKFAC(comm, lr=1e-4, comm_dtype=np.dtype(dtype)).setup(model)
            runs[f"{name}/{dtype}"] = (
                optimizer, functools.partial(bench_comm.classification_loss, model))
    local = {key: {stage: [] for stage in PACKING_STAGES} for key in runs}
    for step in range(steps):  # the runs take turns, so a slow moment hits all of them
        for key, (optimizer, lossfun) in runs.items():
            optimizer.update(lossfun, x, t)
            for stage in PACKING_STAGES:
                if step >= 2:
                    local[key][stage].append(local_stage_seconds(optimizer.last_step_report,
                                                                 stage))
    for key, (optimizer, _) in runs.items():
        items = optimizer.work_items
        owners = [0] * len(items)
        stage2 = packed_layout.reduce_scatter_segments(
            items, owners, [item.name for item in items if item.block is not None])
        stage4 = packed_layout.allgather_segments(items, owners)
        sample[key] = {
            "stage2_s": float(np.median(local[key][PACKING_STAGES[0]])),
            "stage4_s": float(np.median(local[key][PACKING_STAGES[1]])),
            "grads": sum(segment.kind == "grad" for segment in stage4),
            "stats": sum(segment.kind == "stat" for segment in stage2),
            "stat_values": sum(s.size for s in stage2 if s.kind == "stat"),
            "stage4_values": sum(segment.size for segment in stage4)}
    return sample


def packing_parameters(samples, alpha):
    """``Machine.pack_*`` and ``call_overhead`` from the ranks' ``packing_sample`` results
    (their mean).

    The tiny all-gather, less its ring's alpha, is the overhead of one collective call.  Stage
    4 moves gradient tensors only: its time less one call is ``grads * pack_grad +
    grad_values * pack_grad_value``, solved on the two models (same tensors, different
    sizes).  Stage 2 less two calls and its gradients: ``stats * pack_stat + stat_values *
    pack_stat_value``, solved the same way (the counts are every tensor of the model, as
    ``iteration`` uses them)."""
    size = len(samples)

    def mean(key, field):
        return float(np.mean([sample[key][field] for sample in samples]))

    def solve(rows, times):
        return [max(float(v), 1e-12)
                for v in np.linalg.lstsq(np.array(rows, dtype=float), np.array(times),
                                         rcond=None)[0]]

    overhead = max(float(np.mean([sample["tiny_allgather_s"] for sample in samples]))
                   - (size - 1) * alpha, 1e-9)
    values = {"call_overhead": overhead}
    for prefix, dtype in (("", "float32"), ("half_", "float16")):
        keys = [f"{name}/{dtype}" for name in PACKING_MODELS]
        counts = [samples[0][key] for key in keys]
        per_grad, per_grad_value = solve(
            [[c["grads"], c["stage4_values"]] for c in counts],
            [mean(key, "stage4_s") - overhead for key in keys])
        per_stat, per_stat_value = solve(
            [[c["stats"], c["stat_values"]] for c in counts],
            [mean(key, "stage2_s") - 2 * overhead - per_grad * c["grads"]
             - per_grad_value * c["stage4_values"] for key, c in zip(keys, counts)])
        values.update({prefix + "pack_grad": per_grad, prefix + "pack_grad_value": per_grad_value,
                       prefix + "pack_stat": per_stat, prefix + "pack_stat_value": per_stat_value})
    return values


def calibrate(path):
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    compute = measure_compute()
    network = measure_network()
    packing = packing_parameters(network.pop("packing"), network["alpha"])
    values = {**compute, **network, **packing,
              "act_bytes": 4, "comm_bytes": 4, "im2col": True,
              "note": f"measured by scripts/scale_model.py --calibrate on {os.uname().nodename}"
                      f" ({os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}); float32 "
                      "activations and communication, im2col convolutions"}
    with open(path, "w") as f:
        json.dump(values, f, indent=1)
    print(json.dumps(values))


# -- comparison with measured runs --------------------------------------------------------
def last_json_line(path):
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        return json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as error:
        raise SystemExit(f"{path}: expected a file whose last line is a JSON object from "
                         f"scripts/bench_kfac.py or scripts/bench_comm.py ({error})") from None


#: DistributedKFAC's five stages as sums of the model's stages
KFAC_STAGE_MAP = {"1_compute_local_statistics": ("forward_backward", "factors"),
                  "2_reduce_scatter_statistics": ("reduce_scatter",),
                  "3_precondition_owned_layers": ("owner_work",),
                  "4_allgather_preconditioned_gradients": ("allgather",),
                  "5_apply_update": ("update",)}
#: stages that absorb the wait for a slower rank in their first collective: the rank that
#: arrived last (the smallest time over ranks) waited least, and the model has no waiting
WAITING_STAGES = ("2_reduce_scatter_statistics", "4_allgather_preconditioned_gradients")
#: bench_kfac.py's stages (one process) as sums of the model's stages
BENCH_KFAC_MAP = {"forward+backward": ("forward_backward",), "factors": ("factors",),
                  "running+inversion+precondition": ("owner_work",), "update": ("update",)}


def comparison_rows(measured, machine, args, measured_compute_json=None):
    """[(run, stage, modelled seconds, measured seconds)] for one bench JSON object."""
    if "kfac_every_step_s" in measured:
        profile = trace_model(measured["arch"], measured["size"], args.in_channels,
                              args.n_class)
        compute = make_compute(profile, machine, measured["batchsize"], measured_compute_json)
        rows = []
        for mode, key in (("sgd", "sgd"), ("kfac_every_step", "kfac_every_step")):
            model = iteration(profile, compute, machine, 1, mode)
            stages = measured["stages"][key]
            found = {"forward+backward": stages["forward"] + stages["backward"],
                     "factors": stages["factors"],
                     "running+inversion+precondition": stages.get("running_factors", 0.0)
                     + stages["inversion"] + stages["precondition"],
                     "update": stages["update"]}
            for name, parts in BENCH_KFAC_MAP.items():
                if mode == "sgd" and name != "forward+backward" and name != "update":
                    continue
                rows.append((f"{measured['arch']} P=1 {mode} b={measured['batchsize']}", name,
                             sum(model[p] for p in parts), found[name]))
        return rows
    if "measured" in measured:
        run = measured["measured"]
        profile = trace_model("resnet_mnist", 28, 1, 10)
        rows = []
        for dtype, per_rank in run["results"].items():
            bytes_value = np.dtype(dtype).itemsize
            at = dataclasses.replace(machine, comm_bytes=bytes_value)
            compute = make_compute(profile, at, run["batch"], measured_compute_json)
            model = iteration(profile, compute, at, run["ranks"], "kfac_every_step")
            label = f"resnet_mnist P={run['ranks']} {dtype} b={run['batch']}"
            for name, parts in KFAC_STAGE_MAP.items():
                values = [rank["stages"][name]["seconds"] for rank in per_rank]
                found = min(values) if name in WAITING_STAGES else max(values)
                rows.append((label, name, sum(model[p] for p in parts), found))
            rows.append((label, "step", sum(model.values()),
                         max(rank["seconds_per_step"] for rank in per_rank)))
        return rows
    raise SystemExit("--compare-measured: the JSON object is neither bench_kfac.py's (no "
                     "'kfac_every_step_s') nor bench_comm.py's (no 'measured')")


def print_comparison(rows, tolerance=0.3):
    print(f"\nmodel vs measured (stages 2 and 4: min over ranks, the others: max), within "
          f"{tolerance:.0%}?")
    print(f"{'run':<40} {'stage':<38} {'model ms':>9} {'measured ms':>12} {'ratio':>6}")
    for run, stage, model, found in rows:
        ratio = model / found if found else math.inf
        flag = "ok" if abs(ratio - 1) <= tolerance else "OFF"
        print(f"{run:<40} {stage:<38} {model * 1e3:9.2f} {found * 1e3:12.2f} {ratio:6.2f} "
              f"{flag}")


# -- main ---------------------------------------------------------------------------------
def make_compute(profile, machine, batch, measured_compute_json):
    if measured_compute_json is None:
        return modelled_compute(profile, machine, batch)
    if measured_compute_json["arch"] != profile.arch:
        raise SystemExit(f"--measured-compute is a run of {measured_compute_json['arch']}, "
                         f"the model is {profile.arch}")
    return measured_compute(profile, machine, batch, measured_compute_json)


def resolve_machine(args):
    machine = load_machine(args.machine_json) if args.machine_json else V100_EDR
    overrides = {name: getattr(args, name) for name in MACHINE_FIELDS
                 if getattr(args, name) is not None}
    return dataclasses.replace(machine, **overrides)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=None, help="input size (model's insize)")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--n-class", type=int, default=1000)
    parser.add_argument("--batchsize", type=int, default=32, help="examples per worker")
    parser.add_argument("--ranks", type=int, nargs="+",
                        default=[2 ** k for k in range(13)], help="worker counts P")
    parser.add_argument("--stale-interval", type=int, default=20,
                        help="mean refresh interval of stale K-FAC (configs' max_interval)")
    parser.add_argument("--assignment", choices=layer_assignment.ASSIGNMENTS,
                        default="balanced")
    parser.add_argument("--kfac-collectives", choices=("ring_v", "allreduce"),
                        default="ring_v", help="ours (ReduceScatterV/AllGatherV) or the "
                        "authors' two all-reduces")
    parser.add_argument("--machine-json", help="machine parameters (from --calibrate)")
    for name in MACHINE_FIELDS:
        kind = int if name.endswith("_bytes") else float
        if name == "im2col":
            parser.add_argument("--im2col", action=argparse.BooleanOptionalAction,
                                default=None)
        else:
            parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                                help=f"default {getattr(V100_EDR, name):g} (V100 + EDR)")
    parser.add_argument("--measured-compute", help="bench_kfac.py JSON: measured compute")
    parser.add_argument("--compare-measured", nargs="+", default=[],
                        help="bench_kfac.py / bench_comm.py JSON outputs to compare with")
    parser.add_argument("--calibrate", metavar="OUT.json",
                        help="measure this machine's parameters into OUT.json and stop")
    parser.add_argument("--out", default="result/scale_model")
    parser.add_argument("--pingpong-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value in (("--batchsize", args.batchsize), ("--ranks", min(args.ranks)),
                        ("--stale-interval", args.stale_interval),
                        ("--in-channels", args.in_channels), ("--n-class", args.n_class)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for name in MACHINE_FIELDS:
        value = getattr(args, name)
        if name != "im2col" and value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.ranks = sorted(set(args.ranks))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.pingpong_worker:
        pingpong_worker()
        return
    if args.calibrate:
        calibrate(args.calibrate)
        return
    machine = resolve_machine(args)
    measured = last_json_line(args.measured_compute) if args.measured_compute else None
    profile = trace_model(args.arch, args.size, args.in_channels, args.n_class)
    compute = make_compute(profile, machine, args.batchsize, measured)
    rows = scaling_table(profile, compute, machine, args.ranks, args)
    print_table(rows, profile, machine, args)
    figures = {"arch": profile.arch, "size": profile.size, "batchsize": args.batchsize,
               "machine": dataclasses.asdict(machine), "stale_interval": args.stale_interval,
               "assignment": args.assignment, "kfac_collectives": args.kfac_collectives,
               "compute": "measured" if measured else "modelled", "rows": rows}
    paper_row = next((row for row in rows if row["ranks"] == PAPER_RUN["workers"]), None)
    if paper_row is not None:
        estimates = paper_estimates(paper_row, args.batchsize)
        for values in estimates.values():
            values.update({mode: round(values[mode], 3) for mode in MODES})
        figures["paper_estimates"] = estimates
        print(f"\nestimated minutes on {PAPER_RUN['workers']} workers (global batch "
              f"{PAPER_RUN['workers'] * args.batchsize:,}); the paper: 74.9% top-1 in about "
              f"{PAPER_RUN['minutes']:g} minutes (45 epochs, 1,760 iterations)")
        for name, values in estimates.items():
            print(f"  {name:<38} {values['iterations']:>6} iterations: "
                  + ", ".join(f"{mode} {values[mode]:.1f} min" for mode in MODES))
    comparison = []
    for path in args.compare_measured:
        comparison += comparison_rows(last_json_line(path), machine, args, measured)
    if comparison:
        print_comparison(comparison)
        figures["comparison"] = [dict(zip(("run", "stage", "model_s", "measured_s"), row))
                                 for row in comparison]
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, "scale_model.png"))
    with open(os.path.join(args.out, "scale_model.json"), "w") as f:
        json.dump(figures, f, indent=1)
    print(f"plot: {os.path.join(args.out, 'scale_model.png')}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
