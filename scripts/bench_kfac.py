"""K-FAC overhead on ResNet-50 in one process: MomentumSGD vs K-FAC every step vs stale K-FAC.

    python scripts/bench_kfac.py [--batchsize 8] [--size 224] [--max-interval 20]

(a) K-FAC refreshing factors and inverting every step; (b) K-FAC on the
adaptive stale schedule once every layer's interval has grown to its maximum:
the same batch is fed at every step with a tiny learning rate, standing in for
the slowly changing statistics of a run past its first few hundred iterations,
and (b) is the mean over one full cycle of ``max_interval`` steps.  Prints a
per-stage table (forward, backward, factors, inversion, precondition, update),
then one JSON line with the figures and the ratios to SGD.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kfac_mn import functions as F  # noqa: E402
from kfac_mn.fisher.schedule import StatisticsSchedule  # noqa: E402
from kfac_mn.fisher.timing import StageTimer  # noqa: E402
from kfac_mn.optimizers import KFAC, MomentumSGD  # noqa: E402
from models import archs  # noqa: E402

STAGES = ("forward", "backward", "factors", "inversion", "precondition", "update")


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


def measure(step, count):
    totals, per_stage = [], {s: 0.0 for s in STAGES}
    for _ in range(count):
        start = time.perf_counter()
        seconds = step()
        totals.append(time.perf_counter() - start)
        for stage, value in seconds.items():
            per_stage[stage] += value
    return {"seconds": float(np.mean(totals)),
            "stages": {s: v / count for s, v in per_stage.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batchsize", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--n-class", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="measured steps of SGD and (a)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="stale schedule warm-up")
    parser.add_argument("--max-interval", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n_class = args.n_class
    shape = (args.batchsize, args.in_channels, args.size, args.size)
    x = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, n_class, args.batchsize).astype(np.int32)

    np.random.seed(0)
    model = archs[args.arch](n_class=n_class, in_channels=args.in_channels)
    sgd = MomentumSGD(lr=1e-4)
    sgd.setup(model)
    timer = StageTimer()
    sgd_step(model, sgd, x, t, timer)  # warm-up
    results = {"sgd": measure(lambda: sgd_step(model, sgd, x, t, timer), args.steps)}

    every = KFAC(lr=1e-4, schedule=StatisticsSchedule("fixed"))
    every.setup(model)
    kfac_step(model, every, x, t)  # warm-up
    results["kfac_every_step"] = measure(lambda: kfac_step(model, every, x, t), args.steps)

    schedule = StatisticsSchedule("adaptive", warmup_steps=args.warmup_steps,
                                  threshold=args.threshold, max_interval=args.max_interval)
    stale = KFAC(lr=1e-6, schedule=schedule)
    stale.setup(model)
    growth_steps = 0
    while True:
        kfac_step(model, stale, x, t)
        growth_steps += 1
        intervals = stale.intervals().values()
        if stale.t > args.warmup_steps and min(intervals) == args.max_interval:
            break
        if growth_steps > 20 * args.max_interval:
            raise SystemExit("the stale intervals did not reach --max-interval; "
                             "raise --threshold")
    results["kfac_stale"] = measure(lambda: kfac_step(model, stale, x, t), args.max_interval)

    print(f"{args.arch} batch {args.batchsize} {args.size}x{args.size}, one process, "
          f"seconds per iteration (stale: mean over a cycle of {args.max_interval} steps, "
          f"reached after {growth_steps} steps)")
    header = " ".join(f"{s:>12s}" for s in STAGES)
    print(f"{'':18s} {'total':>8s} {header} {'x SGD':>7s}")
    base = results["sgd"]["seconds"]
    for name, r in results.items():
        print(f"{name:18s} {r['seconds']:8.3f} "
              + " ".join(f"{r['stages'][s]:12.3f}" for s in STAGES)
              + f" {r['seconds'] / base:7.2f}")
    print(json.dumps({
        "arch": args.arch, "batchsize": args.batchsize, "size": args.size,
        "max_interval": args.max_interval,
        "sgd_s": round(base, 4),
        "kfac_every_step_s": round(results["kfac_every_step"]["seconds"], 4),
        "kfac_stale_s": round(results["kfac_stale"]["seconds"], 4),
        "every_step_ratio": round(results["kfac_every_step"]["seconds"] / base, 3),
        "stale_ratio": round(results["kfac_stale"]["seconds"] / base, 3),
        "stages": {name: {s: round(v, 4) for s, v in r["stages"].items()}
                   for name, r in results.items()},
    }))


if __name__ == "__main__":
    main()
