"""Measuring this machine's parameters for the cost model (``scale_model.py --calibrate``).

:func:`measure_compute`: float32 GEMM and inversion rates, memory bandwidth and the latency of
one call of our autograd, in this process.  Under MPI: :func:`pingpong` (alpha and bandwidth
between two ranks) and :func:`packing_sample` (stages 2 and 4 of ``DistributedKFAC`` outside
their collectives), from which :func:`packing_parameters` solves the packing costs.
"""
import functools
import time

import numpy

from kfac_mn import functions as F
from kfac_mn.distributed import packed_layout
from kfac_mn.fisher.inverse import damped_inverse
from kfac_mn.variable import Variable


def best_seconds(function, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_compute():
    """float32 GEMM, inversion, memory and per-call rates of this process (a few seconds)."""
    rng = numpy.random.default_rng(0)
    a = rng.standard_normal((512, 1024)).astype(numpy.float32)
    b = rng.standard_normal((1024, 512)).astype(numpy.float32)
    flops = 2 * 512 * 1024 * 512 / best_seconds(lambda: a @ b)
    d = 512
    m = rng.standard_normal((d, 2 * d)).astype(numpy.float32)
    spd = m @ m.T / (2 * d)
    inv_flops = d ** 3 / best_seconds(lambda: damped_inverse(spd, 1e-3, numpy.float32))
    x = numpy.ones(8 * 2 ** 20, dtype=numpy.float32)
    y = numpy.empty_like(x)
    bandwidth = 2 * x.nbytes / best_seconds(lambda: numpy.multiply(x, 2.0, out=y))
    tiny = Variable(numpy.ones((1, 1), dtype=numpy.float32))
    calls = 2000
    latency = best_seconds(lambda: [F.relu(tiny) for _ in range(calls)]) / calls
    return {"flops": flops, "fp32_flops": flops, "inv_flops": inv_flops,
            "mem_bandwidth": bandwidth, "latency": latency}


def pingpong(comm):
    """(alpha, bandwidth) between ranks 0 and 1 of the mpi4py communicator ``comm``: small and
    large messages bounced back and forth (every rank of ``comm`` must call it)."""
    results = {}
    for nbytes, rounds in ((8, 2000), (4 * 2 ** 20, 20)):
        buffer = numpy.zeros(nbytes, dtype=numpy.uint8)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            if comm.rank == 0:
                comm.Send(buffer, dest=1)
                comm.Recv(buffer, source=1)
            elif comm.rank == 1:
                comm.Recv(buffer, source=0)
                comm.Send(buffer, dest=0)
        results[nbytes] = (time.perf_counter() - start) / (2 * rounds)
    alpha = results[8]
    large = 4 * 2 ** 20
    return alpha, large / (results[large] - alpha)


#: stage names of DistributedKFAC's step report whose local work the packing costs model
PACKING_STAGES = ("2_reduce_scatter_statistics", "4_allgather_preconditioned_gradients")


def local_stage_seconds(report, stage):
    """Seconds of a stage of ``DistributedKFAC.last_step_report`` outside its collectives."""
    entry = report["stages"][stage]
    return entry["seconds"] - sum(c["seconds"] for c in entry["collectives"].values())


def packing_sample(comm, models, steps=30):
    """This rank's seconds of stages 2 and 4 outside their collectives (pack, unpack, float16
    scaling), float32 and float16, with the tensor and value counts they moved, for each of
    ``models`` (name -> a function that builds a model for 3 x 32 x 32 inputs and 10 classes;
    two models of one layout and different widths tell the costs per tensor and per value
    apart): ``DistributedKFAC`` on every rank of ``comm``, batch 8, every layer refreshed, the
    median of ``steps - 2`` steps; and the seconds of one tiny ``allgather_v`` of ``comm``."""
    from kfac_mn.optimizers import DistributedKFAC

    tiny = numpy.zeros(8)
    comm.allgather_v(tiny, [8] * comm.size)
    start = time.perf_counter()
    for _ in range(200):
        comm.allgather_v(tiny, [8] * comm.size)
    sample = {"tiny_allgather_s": (time.perf_counter() - start) / 200}
    rng = numpy.random.default_rng(comm.rank)
    x = rng.standard_normal((8, 3, 32, 32)).astype(numpy.float32)
    t = rng.integers(0, 10, 8).astype(numpy.int32)
    runs = {}
    for name, build in models.items():
        for dtype in ("float32", "float16"):
            numpy.random.seed(0)
            model = build()
            optimizer = DistributedKFAC(comm, lr=1e-4, comm_dtype=numpy.dtype(dtype)).setup(model)
            runs[f"{name}/{dtype}"] = (optimizer, functools.partial(_loss, model))
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
            "stage2_s": float(numpy.median(local[key][PACKING_STAGES[0]])),
            "stage4_s": float(numpy.median(local[key][PACKING_STAGES[1]])),
            "grads": sum(segment.kind == "grad" for segment in stage4),
            "stats": sum(segment.kind == "stat" for segment in stage2),
            "stat_values": sum(s.size for s in stage2 if s.kind == "stat"),
            "stage4_values": sum(segment.size for segment in stage4)}
    return sample


def _loss(model, x, t):
    return F.softmax_cross_entropy(model(x), t)


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
        return float(numpy.mean([sample[key][field] for sample in samples]))

    def solve(rows, times):
        return [max(float(v), 1e-12)
                for v in numpy.linalg.lstsq(numpy.array(rows, dtype=float), numpy.array(times),
                                         rcond=None)[0]]

    overhead = max(float(numpy.mean([sample["tiny_allgather_s"] for sample in samples]))
                   - (size - 1) * alpha, 1e-9)
    values = {"call_overhead": overhead}
    for prefix, dtype in (("", "float32"), ("half_", "float16")):
        keys = sorted(key for key in samples[0] if key.endswith("/" + dtype))
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
