"""Cost model of one training iteration on P workers: SGD, K-FAC every step, stale K-FAC.

    python scripts/scale_model.py [--ranks 1 2 4 ... 4096] [--batchsize 32] [--out result/scale]
    OPENBLAS_NUM_THREADS=1 python scripts/scale_model.py --calibrate machine.json
    python scripts/scale_model.py --machine-json machine.json --arch resnet_mnist \\
        [--measured-compute bench_kfac.json] --compare-measured bench_comm.json

Weak scaling, as in the paper: every worker keeps ``--batchsize`` examples (32 by default) and
the global batch grows with P.  The model itself, stage by stage, with its defaults and its
calibration, is the library's :mod:`kfac_mn.cost_model`; this script is its command line.

Defaults (``--machine v100-edr``): one Tesla V100 per worker and InfiniBand EDR between
workers (``kfac_mn.cost_model.machine.V100_EDR``).  ``--machine-json`` replaces them with
another machine's parameters; ``--calibrate OUT.json`` measures this machine's (in this
process, then under ``mpiexec -n 2``: alpha and bandwidth by an MPI ping-pong, the overhead
of one call of our communicator, and the packing costs of stages 2 and 4 timed on two ResNets
that the comparison below does not use); explicit flags override both.

``--measured-compute FILE`` takes the compute of stage 1, 3 and 5 from a measured one-process
run instead (the JSON line of ``scripts/bench_kfac.py`` for the same model): each measured
stage (forward + backward, factors, running factors, inversion, precondition, update)
rescales the modelled per-layer costs of that stage, forward/backward/factors linearly in the
batch, so stage 3 is still split over owners as the assignment splits it.

``--compare-measured FILE ...`` prints the model next to measured runs of the same model: the
JSON line of ``scripts/bench_kfac.py`` (P = 1) or of ``scripts/bench_comm.py`` (its measured
part: ``models.resnet_mnist`` at 28x28 on its ranks, float32 and float16 communication).

Every variable-count algorithm of the communicators is modelled with the communicators' own
formulas (:mod:`kfac_mn.communicators.v_collectives`): ``native``, ``two_phase``,
``allreduce`` (the authors' stand-in) and ``auto`` (the cheapest per call).  Prints the table
of stage times against P for ``--kfac-collectives`` (default ``auto``), stale K-FAC under
every algorithm side by side with SGD (and their ratio), the estimated minutes of the paper's
runs on 1,024 workers under every algorithm next to the paper's 10 minutes, writes
``scale_model.png`` (stages of ``--kfac-collectives``), ``scale_algorithms.png`` (every
algorithm against SGD) and ``scale_model.json`` under ``--out``, and ends with one JSON line:
the table's rows, ``minutes_45_epochs_stale`` and ``stale_over_sgd_per_iteration`` per
algorithm at P = 1,024, ``minutes_45_epochs_sgd`` and ``paper_minutes``.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import models  # noqa: E402
from kfac_mn.communicators import v_collectives  # noqa: E402
from kfac_mn.cost_model import calibration  # noqa: E402
from kfac_mn.cost_model.comparison import (  # noqa: E402
    comparison_rows,
    last_json_line,
    make_compute,
)
from kfac_mn.cost_model.machine import MACHINE_FIELDS, V100_EDR, load_machine  # noqa: E402
from kfac_mn.cost_model.paper import HEADLINE, PAPER_RUN, paper_estimates  # noqa: E402
from kfac_mn.cost_model.stage_costs import MODES, STAGES, scaling_table  # noqa: E402
from kfac_mn.cost_model.trace import trace_model  # noqa: E402
from kfac_mn.distributed import assignment as layer_assignment  # noqa: E402


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


def print_side_by_side(tables, batchsize):
    """Stale K-FAC's ms per iteration under every algorithm, next to SGD, and the ratio."""
    print("\nstale K-FAC under every variable-count algorithm, ms per iteration (ratio: "
          "stale K-FAC / SGD)")
    names = list(tables)
    print(f"{'P':>5} {'SGD':>8} | " + " ".join(f"{name:>10}" for name in names)
          + " | " + " ".join(f"{name + '/SGD':>14}" for name in names))
    for index, row in enumerate(tables[names[0]]):
        sgd = row["sgd"]["total"]
        stale = [tables[name][index]["kfac_stale"]["total"] for name in names]
        print(f"{row['ranks']:>5} {sgd * 1e3:8.1f} | "
              + " ".join(f"{value * 1e3:10.1f}" for value in stale) + " | "
              + " ".join(f"{value / sgd:14.2f}" for value in stale))


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


def plot_algorithms(tables, path):
    """Stale K-FAC's ms per iteration against P under every algorithm, next to SGD."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = next(iter(tables.values()))
    ranks = [row["ranks"] for row in first]
    ax.plot(ranks, [row["sgd"]["total"] * 1e3 for row in first], "k--", label="SGD")
    for name, rows in tables.items():
        if name != "auto":
            ax.plot(ranks, [row["kfac_stale"]["total"] * 1e3 for row in rows], marker="o",
                    markersize=3, label=f"stale K-FAC, {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers P")
    ax.set_ylabel("modelled ms per iteration")
    ax.set_title("stale K-FAC by variable-count algorithm (auto = the cheapest)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- calibration of this machine ----------------------------------------------------------
#: the two models whose packing work ``--calibrate`` times: ResNets for 32 x 32 inputs, one
#: narrow and one wide, so that costs per tensor and per value can be told apart; neither is
#: a model the check against measured runs uses, so that check stays a test of the model
PACKING_MODELS = {"narrow": (8, 16), "wide": (48, 96)}


def pingpong_worker():
    """Under mpiexec -n 2: the ping-pong, then both ranks time their packing work; rank 0
    prints alpha, bandwidth and the ranks' packing samples as one JSON line."""
    from mpi4py import MPI

    from kfac_mn.communicators import create_communicator
    from models.resnet_small import ResNetSmall

    alpha, bandwidth = calibration.pingpong(MPI.COMM_WORLD)
    builders = {name: functools.partial(ResNetSmall, channels, (1, 1), (1, 2), 10, 3,
                                        insize=32)
                for name, channels in PACKING_MODELS.items()}
    sample = calibration.packing_sample(create_communicator(), builders)
    samples = MPI.COMM_WORLD.gather(sample, root=0)
    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps({"alpha": alpha, "bandwidth": bandwidth, "packing": samples}))


def measure_network():
    from kfac_mn.communicators.mpiexec import run_under_mpiexec

    done = run_under_mpiexec(2, os.path.abspath(__file__), ["--pingpong-worker"],
                             timeout=120, capture=True)
    if done.returncode != 0:
        raise SystemExit(f"the MPI ping-pong under mpiexec -n 2 failed (exit "
                         f"{done.returncode}):\n{done.stdout}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def calibrate(path):
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    compute = calibration.measure_compute()
    network = measure_network()
    packing = calibration.packing_parameters(network.pop("packing"), network["alpha"])
    values = {**compute, **network, **packing,
              "act_bytes": 4, "comm_bytes": 4, "im2col": True,
              "note": f"measured by scripts/scale_model.py --calibrate on {os.uname().nodename}"
                      f" ({os.cpu_count()} cores, OPENBLAS_NUM_THREADS={threads}); float32 "
                      "activations and communication, im2col convolutions"}
    with open(path, "w") as f:
        json.dump(values, f, indent=1)
    print(json.dumps(values))


# -- comparison with measured runs ----------------------------------------------------------
def print_comparison(rows, tolerance=0.3):
    print(f"\nmodel vs measured (stages 2 and 4: min over ranks, the others: max), within "
          f"{tolerance:.0%}?")
    print(f"{'run':<40} {'stage':<38} {'model ms':>9} {'measured ms':>12} {'ratio':>6}")
    for run, stage, model, found in rows:
        ratio = model / found if found else math.inf
        flag = "ok" if abs(ratio - 1) <= tolerance else "OFF"
        print(f"{run:<40} {stage:<38} {model * 1e3:9.2f} {found * 1e3:12.2f} {ratio:6.2f} "
              f"{flag}")


# -- the paper's run -----------------------------------------------------------------------
def paper_figures(tables, batchsize):
    """Print and return the minutes of the paper's 1,024-worker runs under every algorithm,
    and stale K-FAC / SGD per iteration there."""
    workers = PAPER_RUN["workers"]
    estimates, ratios = {}, {}
    for name, rows in tables.items():
        row = next(row for row in rows if row["ranks"] == workers)
        estimates[name] = {setting: {key: round(value, 3) if key in MODES else value
                                     for key, value in values.items()}
                           for setting, values in paper_estimates(row, batchsize).items()}
        ratios[name] = round(row["kfac_stale"]["total"] / row["sgd"]["total"], 3)
    print(f"\nestimated minutes on {workers:,} workers (global batch {workers * batchsize:,}); "
          f"the paper: 74.9% top-1 in about {PAPER_RUN['minutes']:g} minutes (45 epochs, "
          f"{PAPER_RUN['iterations']:,} iterations)")
    print(f"{'K-FAC collectives':<18} {'setting':<38} {'iterations':>10} {'SGD':>7} "
          f"{'K-FAC':>7} {'stale':>7} {'stale/SGD per iteration':>24}")
    for name, settings in estimates.items():
        for setting, values in settings.items():
            print(f"{name:<18} {setting:<38} {values['iterations']:>10} "
                  + " ".join(f"{values[mode]:7.1f}" for mode in MODES)
                  + f" {ratios[name]:24.2f}")
    return {"paper_estimates": estimates,
            "minutes_45_epochs_stale": {name: settings[HEADLINE]["kfac_stale"]
                                        for name, settings in estimates.items()},
            "minutes_45_epochs_sgd": estimates["native"][HEADLINE]["sgd"],
            "stale_over_sgd_per_iteration": ratios,
            "paper_minutes": PAPER_RUN["minutes"]}


# -- main ---------------------------------------------------------------------------------
def resolve_machine(args):
    machine = V100_EDR
    if args.machine_json:
        try:
            machine = load_machine(args.machine_json)
        except ValueError as error:
            raise SystemExit(f"--machine-json {error}") from None
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
    parser.add_argument("--kfac-collectives", choices=v_collectives.CHOICES,
                        default="auto", help="the algorithm of the ReduceScatterV / "
                        "AllGatherV in the stage table and plot (all of them are compared "
                        "side by side): native (the library's V collective), two_phase (equal "
                        "chunks + redistribution), allreduce (the authors' stand-in), auto "
                        "(the cheapest per call, as our communicators choose)")
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


def trace_arch(arch, size=None, in_channels=3, n_class=1000):
    """The cost model's profile of ``models.archs[arch]`` at ``size`` (its insize)."""
    if arch not in models.archs:
        raise SystemExit(f"--arch {arch!r} is not one of {', '.join(sorted(models.archs))}")
    np.random.seed(0)
    model = models.archs[arch](n_class=n_class, in_channels=in_channels)
    return trace_model(model, arch, size or model.insize, in_channels)


def main(argv=None):
    args = parse_args(argv)
    if args.pingpong_worker:
        pingpong_worker()
        return
    if args.calibrate:
        calibrate(args.calibrate)
        return
    machine = resolve_machine(args)
    try:
        measured = last_json_line(args.measured_compute) if args.measured_compute else None
        profile = trace_arch(args.arch, args.size, args.in_channels, args.n_class)
        compute = make_compute(profile, machine, args.batchsize, measured)
        comparison = []
        for path in args.compare_measured:
            comparison += comparison_rows(last_json_line(path), machine, trace_arch,
                                          args.in_channels, args.n_class, measured)
    except ValueError as error:
        raise SystemExit(f"scale_model.py: {error}") from None
    tables = {name: scaling_table(profile, compute, machine, args.ranks, args.stale_interval,
                                  args.assignment, name)
              for name in v_collectives.CHOICES}
    rows = tables[args.kfac_collectives]
    print_table(rows, profile, machine, args)
    print_side_by_side(tables, args.batchsize)
    figures = {"arch": profile.arch, "size": profile.size, "batchsize": args.batchsize,
               "machine": dataclasses.asdict(machine), "stale_interval": args.stale_interval,
               "assignment": args.assignment, "kfac_collectives": args.kfac_collectives,
               "compute": "measured" if measured else "modelled", "rows": rows}
    workers = PAPER_RUN["workers"]
    if workers in args.ranks:
        figures.update(paper_figures(tables, args.batchsize))
    if comparison:
        print_comparison(comparison)
        figures["comparison"] = [dict(zip(("run", "stage", "model_s", "measured_s"), row))
                                 for row in comparison]
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, "scale_model.png"))
    plot_algorithms(tables, os.path.join(args.out, "scale_algorithms.png"))
    with open(os.path.join(args.out, "scale_model.json"), "w") as f:
        json.dump({**figures, "algorithms": tables}, f, indent=1)
    print(f"plot: {os.path.join(args.out, 'scale_model.png')}")
    print(json.dumps(figures))

if __name__ == "__main__":
    main()
