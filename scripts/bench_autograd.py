"""Forward+backward speed of our ResNet-50 against PyTorch CPU on the same network.

    python scripts/bench_autograd.py [--batchsize 8] [--size 224] [--threads N]

Each framework runs in its own subprocess (so peak memories do not mix) with
the same number of BLAS / intra-op threads.  Prints a table, a per-layer-type
profile of our forward and backward (TimerHook), and as its last line one JSON
object with the figures.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_loop(step, warmup, iters):
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def run_ours(args):
    sys.path.insert(0, ROOT)
    import numpy as np

    from kfac_mn import functions as F
    from kfac_mn.function_hooks import TimerHook
    from models import archs

    rng = np.random.default_rng(0)
    model = archs["resnet50"](n_class=1000)
    x = rng.standard_normal((args.batchsize, 3, args.size, args.size)).astype(np.float32)
    t = rng.integers(0, 1000, args.batchsize).astype(np.int32)

    def step():
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x), t)
        loss.backward()

    base = rss_mb()
    seconds = time_loop(step, args.warmup, args.iters)
    result = {"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
              "peak_above_start_mb": peak_rss_mb() - base}
    timer = TimerHook()
    with timer:
        step()
    result["profile"] = [list(row) for row in timer.summary()]
    return result


def run_torch(args):
    import torch

    sys.path.insert(0, ROOT)
    from models.torch_resnet50 import TorchResNet50

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TorchResNet50(n_class=1000)
    model.train()
    x = torch.randn(args.batchsize, 3, args.size, args.size)
    t = torch.randint(0, 1000, (args.batchsize,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), t)
        loss.backward()

    base = rss_mb()
    seconds = time_loop(step, args.warmup, args.iters)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "peak_above_start_mb": peak_rss_mb() - base}


def spawn(framework, args):
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework,
           "--batchsize", str(args.batchsize), "--size", str(args.size),
           "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        if framework == "torch" and "No module named 'torch'" in out.stderr:
            return None
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{framework} benchmark failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batchsize", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run = run_ours if args.worker == "ours" else run_torch
        print(json.dumps(run(args)))
        return

    ours = spawn("ours", args)
    torch = spawn("torch", args)
    print(f"ResNet-50 forward+backward, batch {args.batchsize}, {args.size}x{args.size}, "
          f"float32, {args.threads} threads (median of {args.iters} after {args.warmup} warm-up)")
    print(f"{'':12s} {'s/iter':>8s} {'peak RSS MB':>12s} {'peak-start MB':>14s}")
    for name, r in (("kfac_mn", ours), ("pytorch", torch)):
        if r is None:
            print(f"{name:12s} {'(torch not installed)':>36s}")
            continue
        print(f"{name:12s} {r['seconds']:8.3f} {r['peak_rss_mb']:12.0f} "
              f"{r['peak_above_start_mb']:14.0f}")
    ratio = ours["seconds"] / torch["seconds"] if torch else None
    if ratio is not None:
        print(f"ratio kfac_mn / pytorch: {ratio:.2f}")
    print("\nkfac_mn profile by function type (one step, TimerHook):")
    print(f"{'function':28s} {'calls':>6s} {'forward s':>10s} {'backward s':>11s}")
    for label, calls, fwd, bwd in ours["profile"]:
        print(f"{label:28s} {calls:6d} {fwd:10.3f} {bwd:11.3f}")
    print(json.dumps({
        "batchsize": args.batchsize, "size": args.size, "threads": args.threads,
        "ours_s_per_iter": round(ours["seconds"], 4),
        "torch_s_per_iter": round(torch["seconds"], 4) if torch else None,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "ours_peak_rss_mb": round(ours["peak_rss_mb"]),
        "torch_peak_rss_mb": round(torch["peak_rss_mb"]) if torch else None,
        "ours_peak_above_start_mb": round(ours["peak_above_start_mb"]),
        "torch_peak_above_start_mb": round(torch["peak_above_start_mb"]) if torch else None,
        "profile": {label: {"forward_s": round(f, 4), "backward_s": round(b, 4)}
                    for label, _, f, b in ours["profile"]},
    }))


if __name__ == "__main__":
    main()
