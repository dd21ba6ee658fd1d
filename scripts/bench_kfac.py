"""K-FAC overhead on ResNet-50 in one process: MomentumSGD vs K-FAC every step vs stale K-FAC.

    python scripts/bench_kfac.py [--batchsize 8] [--size 224] [--interval 20] [--device cpu]

(a) K-FAC refreshing factors and inverting every step.
(b) K-FAC on the stale schedule after warm-up.  Once the adaptive schedule (docs/SPEC.md) has
    grown every layer's interval to its maximum M, each layer refreshes its factors and
    inverses once per M steps and reuses them in between.  By default (b) measures one such
    cycle directly: the fixed schedule with factor and inverse interval M, i.e. one refresh
    step followed by M - 1 reuse steps, and reports the mean over the cycle.  That is the
    adaptive schedule's steady state when the layers refresh together, without the growth
    phase (about 50 steps at M = 20, most of them full refreshes, which on a 2-core CPU is
    over half an hour of ResNet-50).  ``--adaptive`` runs the real adaptive schedule instead:
    the same batch at every step with a tiny learning rate, standing in for the slowly
    changing statistics of a run past its first few hundred iterations, until every interval
    is M, then one cycle of M steps.

Prints a per-stage table (forward, backward, factors, running factors, inversion, precondition,
update), then one JSON line with the figures and the ratios to SGD.  ``--device gpu`` runs on CuPy.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kfac_mn import backend  # noqa: E402
from kfac_mn import functions as F  # noqa: E402
from kfac_mn.backend import synchronize  # noqa: E402
from kfac_mn.fisher.blocks import KroneckerBlock  # noqa: E402
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule  # noqa: E402
from kfac_mn.optimizers import KFAC, MomentumSGD  # noqa: E402
from kfac_mn.timing import StageTimer  # noqa: E402
from models import archs  # noqa: E402

#: KFAC's timer stages: "factors" computes this step's statistics (in forward and backward),
#: "running_factors" folds them into the running factors, both only for refreshed layers
STAGES = ("forward", "backward", "factors", "running_factors", "inversion", "precondition",
          "update")


def sgd_step(model, optimizer, x, t, timer):
    timer.reset()
    model.cleargrads()
    with timer("forward"):
        loss = F.softmax_cross_entropy(model(x), t)
    with timer("backward"):
        loss.backward()
    loss.unchain()
    with timer("update"):
        optimizer.update()
    return dict(timer.seconds)


def kfac_step(model, optimizer, x, t):
    optimizer.update(lambda x, t: F.softmax_cross_entropy(model(x), t), x, t)
    return dict(optimizer.timer.seconds)


def measure(step, count, x, cycle=False):
    """Seconds per step and per stage over ``count`` steps: the median step (its own stages),
    or with ``cycle`` the mean over all of them (a stale cycle mixes refresh and reuse)."""
    records = []
    for _ in range(count):
        synchronize(x)
        start = time.perf_counter()
        stages = step()
        synchronize(x)
        records.append((time.perf_counter() - start, stages))
    if cycle:
        return {"seconds": float(np.mean([r[0] for r in records])),
                "stages": {s: sum(r[1].get(s, 0.0) for r in records) / count for s in STAGES}}
    seconds, stages = sorted(records, key=lambda r: r[0])[count // 2]
    return {"seconds": seconds, "stages": {s: stages.get(s, 0.0) for s in STAGES}}


def precondition_gflop(optimizer):
    """GFLOP of one step's preconditioning, ``G^{-1} dW A^{-1}`` for every Kronecker block:
    2 (O^2 K + O K^2) for G (O x O) and A (K x K); the BN blocks' share is negligible."""
    flop = 0
    for block in optimizer.fisher_blocks.values():
        if isinstance(block, KroneckerBlock):
            out_size, in_size = block.G.shape[0], block.A.shape[0]
            flop += 2 * (out_size ** 2 * in_size + out_size * in_size ** 2)
    return flop / 1e9


def grow_adaptive(model, optimizer, x, t, warmup_steps, interval):
    """Steps of the adaptive schedule until every layer's interval is ``interval``."""
    steps = 0
    while True:
        kfac_step(model, optimizer, x, t)
        steps += 1
        if optimizer.t > warmup_steps and min(optimizer.intervals().values()) == interval:
            return steps
        if steps > 20 * interval:
            raise SystemExit("bench_kfac: the adaptive intervals did not reach --interval "
                             f"within {steps} steps; raise --threshold")


def setup_data(args):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batchsize, args.in_channels, args.size, args.size))
    t = rng.integers(0, args.n_class, args.batchsize)
    np.random.seed(0)
    model = archs[args.arch](n_class=args.n_class, in_channels=args.in_channels)
    x, t = x.astype(np.float32), t.astype(np.int32)
    if args.device == "gpu":
        if not backend.gpu_available():
            raise SystemExit("bench_kfac: --device gpu needs CuPy and a CUDA device")
        model.to_gpu()
        x, t = backend.cupy.asarray(x), backend.cupy.asarray(t)
    return model, x, t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batchsize", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--n-class", type=int, default=1000)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=3,
                        help="measured steps of SGD (before and after K-FAC: the faster) and "
                        "of (a); the median is reported")
    parser.add_argument("--interval", type=int, default=20,
                        help="the stale schedule's maximum interval M (one cycle is measured)")
    parser.add_argument("--adaptive", action="store_true",
                        help="grow the real adaptive schedule to --interval before the cycle")
    parser.add_argument("--warmup-steps", type=int, default=3, help="--adaptive warm-up")
    parser.add_argument("--threshold", type=float, default=0.1, help="--adaptive threshold")
    args = parser.parse_args()

    model, x, t = setup_data(args)
    sgd = MomentumSGD(lr=1e-4)
    sgd.setup(model)
    timer = StageTimer()
    for _ in range(2):  # warm-up: first-touch allocations, BLAS and kernel start-up
        sgd_step(model, sgd, x, t, timer)
    results = {"sgd": measure(lambda: sgd_step(model, sgd, x, t, timer), args.steps, x)}

    every = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed"))
    every.setup(model)
    kfac_step(model, every, x, t)  # warm-up
    results["kfac_every_step"] = measure(lambda: kfac_step(model, every, x, t), args.steps, x)

    growth_steps = 0
    if args.adaptive:
        schedule = StatisticsSchedule("adaptive", warmup_steps=args.warmup_steps,
                                      threshold=args.threshold, max_interval=args.interval)
        stale = KFAC(lr=1e-6, schedule=schedule)
        stale.setup(model)
        growth_steps = grow_adaptive(model, stale, x, t, args.warmup_steps, args.interval)
        how = f"adaptive schedule, every interval grown to {args.interval} in {growth_steps} steps"
    else:
        schedule = StatisticsSchedule("fixed", factor_interval=args.interval,
                                      inverse_interval=args.interval)
        stale = KFAC(lr=1e-4, schedule=schedule)
        stale.setup(model)
        kfac_step(model, stale, x, t)  # step 0: the first refresh, outside the measured cycle
        for _ in range(args.interval - 1):  # steps 1 .. M-1: reuse, so step M starts a cycle
            kfac_step(model, stale, x, t)
        how = f"fixed schedule at interval {args.interval}: one refresh + {args.interval - 1} reuse"
    results["kfac_stale"] = measure(lambda: kfac_step(model, stale, x, t), args.interval, x,
                                    cycle=True)
    # SGD again, now that allocator pools, caches and clocks have settled: the faster of the
    # two SGD measurements is the baseline, so the ratios never flatter K-FAC.
    sgd_after = measure(lambda: sgd_step(model, sgd, x, t, timer), args.steps, x)
    if sgd_after["seconds"] < results["sgd"]["seconds"]:
        results["sgd"] = sgd_after

    device = "CPU" if args.device == "cpu" else backend.cupy.cuda.runtime.getDeviceProperties(
        backend.cupy.cuda.Device().id)["name"].decode()
    print(f"{args.arch} batch {args.batchsize} {args.size}x{args.size}, one process on {device}, "
          f"seconds per iteration; stale (b) = mean over one cycle of {args.interval} steps "
          f"({how})")
    widths = [max(12, len(s)) for s in STAGES]
    header = " ".join(f"{s:>{w}s}" for s, w in zip(STAGES, widths))
    print(f"{'':18s} {'total':>8s} {header} {'x SGD':>7s}")
    base = results["sgd"]["seconds"]
    for name, r in results.items():
        print(f"{name:18s} {r['seconds']:8.3f} "
              + " ".join(f"{r['stages'][s]:{w}.3f}" for s, w in zip(STAGES, widths))
              + f" {r['seconds'] / base:7.2f}")
    # (b) preconditions every step, so it can go no lower than SGD plus that stage.
    precondition_s = results["kfac_stale"]["stages"]["precondition"]
    gflop = precondition_gflop(stale)
    floor = (base + precondition_s) / base
    print(f"floor for (b): (SGD + precondition) / SGD = {floor:.2f}; preconditioning is "
          f"{gflop:.3g} GFLOP per step, run at {gflop / precondition_s:.3g} GFLOP/s")
    print(json.dumps({
        "arch": args.arch, "batchsize": args.batchsize, "size": args.size,
        "device": device, "interval": args.interval, "adaptive": args.adaptive,
        "growth_steps": growth_steps,
        "sgd_s": round(base, 4),
        "kfac_every_step_s": round(results["kfac_every_step"]["seconds"], 4),
        "kfac_stale_s": round(results["kfac_stale"]["seconds"], 4),
        "every_step_ratio": round(results["kfac_every_step"]["seconds"] / base, 3),
        "stale_ratio": round(results["kfac_stale"]["seconds"] / base, 3),
        "precondition_gflop": round(gflop, 4), "precondition_floor_ratio": round(floor, 3),
        "stages": {name: {s: round(v, 4) for s, v in r["stages"].items()}
                   for name, r in results.items()},
    }))


if __name__ == "__main__":
    main()
