"""Device memory per worker for planning a run, from the cost model (any arch and batch).

    python scripts/memory_per_gpu.py --arch resnet50 --batchsize 32 --workers 1 8 128 1024

Prints, per world size, the estimate of ``kfac_mn.cost_model.memory`` in MiB: weights (with
gradients and momentum), activations kept for the backward, the largest transient (im2col
patches or backward gradients), K-FAC's factors and inverses on the most loaded worker plus the
statistic sums of a refresh step, and the stage-2 buffers.  CUDA's context (a few hundred MiB)
and the memory pool's rounding come on top.  The last line is one JSON object.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy  # noqa: E402

from kfac_mn.cost_model.memory import memory_per_worker  # noqa: E402
from kfac_mn.cost_model.trace import trace_model  # noqa: E402
from models import archs  # noqa: E402

COMPONENTS = ("weights", "activations", "workspace", "kfac_state", "buffers", "total")
MIB = 2 ** 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(archs), default="resnet50")
    parser.add_argument("--batchsize", type=int, default=32,
                        help="examples per worker and micro-batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 128, 1024])
    parser.add_argument("--optimizer", choices=("kfac", "sgd"), default="kfac")
    parser.add_argument("--comm-dtype", choices=("float16", "float32"), default="float32")
    parser.add_argument("--size", type=int, default=None,
                        help="input side (default: the architecture's insize)")
    args = parser.parse_args(argv)
    if args.batchsize < 1 or min(args.workers) < 1:
        parser.error("--batchsize and --workers must be positive")
    numpy.random.seed(0)
    in_channels = 1 if args.arch == "resnet_mnist" else 3
    model = archs[args.arch](n_class=10 if args.arch == "resnet_mnist" else 1000,
                             in_channels=in_channels)
    size = args.size or getattr(model, "insize", 28)
    profile = trace_model(model, args.arch, size, in_channels)
    rows = {workers: memory_per_worker(profile, args.batchsize, workers, args.optimizer,
                                       comm_dtype=args.comm_dtype)
            for workers in args.workers}
    print(f"{args.arch} ({profile.parameters:,} parameters), {args.optimizer}, batch "
          f"{args.batchsize} per worker, {size} x {size}, communication in {args.comm_dtype}: "
          "MiB per worker")
    print(f"{'workers':>8} " + " ".join(f"{name:>12}" for name in COMPONENTS))
    for workers, estimate in rows.items():
        print(f"{workers:>8} " + " ".join(f"{estimate[name] / MIB:12.0f}"
                                          for name in COMPONENTS))
    print(json.dumps({"arch": args.arch, "batchsize": args.batchsize,
                      "optimizer": args.optimizer, "comm_dtype": args.comm_dtype,
                      "mib_per_worker": {str(w): {k: round(v / MIB, 1) for k, v in e.items()}
                                         for w, e in rows.items()}}))


if __name__ == "__main__":
    main()
