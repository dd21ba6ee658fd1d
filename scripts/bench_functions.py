"""Per-layer speed of kfac_mn.functions against PyTorch CPU on ResNet-50 shapes.

    python scripts/bench_functions.py [--batchsize 8] [--threads N] [--repeat 5] [--only conv]
                                      [--clock wall|cpu]

Both sides get the same number of threads (OpenBLAS / OpenMP threads for NumPy,
``torch.set_num_threads`` for PyTorch).  Forward and backward are timed
separately (backward: the function's own backward on a fresh forward, no graph
traversal), as the best of ``--repeat`` runs after one warm-up (on a shared
machine the fastest run is the least disturbed one), ours and torch's
interleaved.  ``--clock cpu`` measures process CPU time instead of wall time:
steadier when other jobs share the cores, but only meaningful with ``--threads 1``.
Prints a table, then one JSON line with every figure.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batchsize", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="",
                        help="run only the cases whose name contains this text")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu adds up the time of all threads: use it with --threads 1")
    if args.batchsize < 1 or args.threads < 1 or args.repeat < 1:
        parser.error("--batchsize, --threads and --repeat must be positive")
    return args


def conv_case(n, c_in, c_out, size, k, stride, pad, grad_x=True):
    return ("conv", dict(x=(n, c_in, size, size), W=(c_out, c_in, k, k), stride=stride,
                         pad=pad, grad_x=grad_x))


def cases(n):
    """ResNet-50 layers (stride in the first 1x1 of a block, as models/ does)."""
    return [
        ("conv 7x7/2 3->64 @224", *conv_case(n, 3, 64, 224, 7, 2, 3, grad_x=False)),
        ("conv 1x1 64->64 @56", *conv_case(n, 64, 64, 56, 1, 1, 0)),
        ("conv 3x3 64->64 @56", *conv_case(n, 64, 64, 56, 3, 1, 1)),
        ("conv 1x1 64->256 @56", *conv_case(n, 64, 256, 56, 1, 1, 0)),
        ("conv 1x1 256->64 @56", *conv_case(n, 256, 64, 56, 1, 1, 0)),
        ("conv 1x1/2 256->128 @56", *conv_case(n, 256, 128, 56, 1, 2, 0)),
        ("conv 3x3 128->128 @28", *conv_case(n, 128, 128, 28, 3, 1, 1)),
        ("conv 1x1 512->128 @28", *conv_case(n, 512, 128, 28, 1, 1, 0)),
        ("conv 3x3/2 128->128 @56", *conv_case(n, 128, 128, 56, 3, 2, 1)),
        ("conv 3x3 256->256 @14", *conv_case(n, 256, 256, 14, 3, 1, 1)),
        ("conv 1x1 1024->256 @14", *conv_case(n, 1024, 256, 14, 1, 1, 0)),
        ("conv 3x3 512->512 @7", *conv_case(n, 512, 512, 7, 3, 1, 1)),
        ("conv 1x1 512->2048 @7", *conv_case(n, 512, 2048, 7, 1, 1, 0)),
        ("conv 1x1/2 1024->2048 @14", *conv_case(n, 1024, 2048, 14, 1, 2, 0)),
        ("bn 64x112x112", "bn", dict(x=(n, 64, 112, 112))),
        ("bn 256x56x56", "bn", dict(x=(n, 256, 56, 56))),
        ("bn 2048x7x7", "bn", dict(x=(n, 2048, 7, 7))),
        ("relu 256x56x56", "relu", dict(x=(n, 256, 56, 56))),
        ("maxpool 3x3/2 64x112x112", "maxpool", dict(x=(n, 64, 112, 112))),
        ("avgpool 3x3/2 64x112x112", "avgpool", dict(x=(n, 64, 112, 112))),
        ("global avgpool 2048x7x7", "gap", dict(x=(n, 2048, 7, 7))),
        ("linear 2048->1000", "linear", dict(x=(n, 2048), W=(1000, 2048))),
        ("softmax CE 1000", "sce", dict(x=(n, 1000))),
    ]


def make_ours(kind, spec, rng):
    """(forward, input Variables needing grads) for our side; forward returns a Variable."""
    import numpy as np

    from kfac_mn import functions as F
    from kfac_mn.variable import Variable

    def var(shape, requires_grad=True):
        return Variable(rng.standard_normal(shape, dtype=np.float32),
                        requires_grad=requires_grad)

    x = var(spec["x"], spec.get("grad_x", True))
    if kind == "conv":
        W = var(spec["W"])
        return lambda: F.convolution_2d(x, W, stride=spec["stride"], pad=spec["pad"])
    if kind == "bn":
        c = spec["x"][1]
        gamma, beta = var((c,)), var((c,))
        mean = np.zeros(c, np.float32)
        variance = np.ones(c, np.float32)
        return lambda: F.batch_normalization(x, gamma, beta, 2e-5, mean, variance)
    if kind == "relu":
        return lambda: F.relu(x)
    if kind == "maxpool":
        return lambda: F.max_pooling_2d(x, 3, 2, 1)
    if kind == "avgpool":
        return lambda: F.average_pooling_2d(x, 3, 2, 1)
    if kind == "gap":
        return lambda: F.global_average_pooling_2d(x)
    if kind == "linear":
        W, b = var(spec["W"]), var(spec["W"][:1])
        return lambda: F.linear(x, W, b)
    t = rng.integers(0, spec["x"][1], spec["x"][0])
    return lambda: F.softmax_cross_entropy(x, t)


def make_torch(kind, spec, torch):
    """(forward, inputs needing grads) for PyTorch, same layer and shapes."""
    def var(shape, requires_grad=True):
        return torch.randn(shape).requires_grad_(requires_grad)

    x = var(spec["x"], spec.get("grad_x", True))
    nn = torch.nn.functional
    if kind == "conv":
        W = var(spec["W"])
        return (lambda: nn.conv2d(x, W, None, spec["stride"], spec["pad"])), [
            v for v in (x, W) if v.requires_grad]
    if kind == "bn":
        c = spec["x"][1]
        gamma, beta = var((c,)), var((c,))
        mean, variance = torch.zeros(c), torch.ones(c)
        return (lambda: nn.batch_norm(x, mean, variance, gamma, beta, True, 0.1, 2e-5)), [
            x, gamma, beta]
    if kind == "relu":
        return (lambda: torch.relu(x)), [x]
    if kind == "maxpool":
        return (lambda: nn.max_pool2d(x, 3, 2, 1)), [x]
    if kind == "avgpool":
        return (lambda: nn.avg_pool2d(x, 3, 2, 1)), [x]
    if kind == "gap":
        return (lambda: x.mean(dim=(2, 3))), [x]
    if kind == "linear":
        W, b = var(spec["W"]), var(spec["W"][:1])
        return (lambda: nn.linear(x, W, b)), [x, W, b]
    t = torch.randint(0, spec["x"][1], (spec["x"][0],))
    return (lambda: nn.cross_entropy(x, t)), [x]


def time_ours(forward, repeat, clock):
    import numpy as np

    fwd, bwd = [], []
    for _ in range(repeat + 1):
        start = clock()
        y = forward()
        forward_end = clock()
        node = y.creator
        targets = tuple(i for i, v in enumerate(node.inputs) if v.requires_grad)
        gy = np.ones_like(y.data)
        backward_start = clock()
        node.backward(targets, (gy,))
        end = clock()
        fwd.append(forward_end - start)
        bwd.append(end - backward_start)
        del y, node
    return min(fwd[1:]), min(bwd[1:])


def time_torch(forward, inputs, repeat, torch, clock):
    fwd, bwd = [], []
    for _ in range(repeat + 1):
        start = clock()
        y = forward()
        forward_end = clock()
        gy = torch.ones_like(y)
        backward_start = clock()
        torch.autograd.grad(y, inputs, gy)
        end = clock()
        fwd.append(forward_end - start)
        bwd.append(end - backward_start)
        del y
    return min(fwd[1:]), min(bwd[1:])


def main():
    args = parse_args()
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    title = f"layer (batch {args.batchsize}, {args.threads} thr, {args.clock})"
    header = (f"{title:32s} "
              f"{'ours fwd':>9s} {'torch fwd':>9s} {'ratio':>6s} "
              f"{'ours bwd':>9s} {'torch bwd':>9s} {'ratio':>6s} {'total ratio':>11s}")
    print(header)
    print("-" * len(header))
    total_ours = total_torch = 0.0
    for name, kind, spec in cases(args.batchsize):
        if args.only not in name:
            continue
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        ours = time_ours(make_ours(kind, spec, rng), args.repeat, clock)
        theirs = time_torch(*make_torch(kind, spec, torch), args.repeat, torch, clock)
        row = dict(layer=name, ours_fwd_ms=ours[0] * 1e3, torch_fwd_ms=theirs[0] * 1e3,
                   ours_bwd_ms=ours[1] * 1e3, torch_bwd_ms=theirs[1] * 1e3)
        row["fwd_ratio"] = row["ours_fwd_ms"] / row["torch_fwd_ms"]
        row["bwd_ratio"] = row["ours_bwd_ms"] / row["torch_bwd_ms"]
        row["ratio"] = sum(ours) / sum(theirs)
        total_ours += sum(ours)
        total_torch += sum(theirs)
        rows.append(row)
        print(f"{name:32s} {row['ours_fwd_ms']:9.2f} {row['torch_fwd_ms']:9.2f} "
              f"{row['fwd_ratio']:6.2f} {row['ours_bwd_ms']:9.2f} {row['torch_bwd_ms']:9.2f} "
              f"{row['bwd_ratio']:6.2f} {row['ratio']:11.2f}", flush=True)
    if not rows:
        raise SystemExit(f"--only {args.only!r} matches no case")
    print(f"{'sum of the rows (ms)':32s} {total_ours * 1e3:9.1f} ours, "
          f"{total_torch * 1e3:.1f} torch, ratio {total_ours / total_torch:.2f}")
    print(json.dumps(dict(batchsize=args.batchsize, threads=args.threads, repeat=args.repeat,
                          clock=args.clock,
                          total_ratio=total_ours / total_torch, rows=rows)))


if __name__ == "__main__":
    main()
