"""The paper's claim at small scale: K-FAC vs MomentumSGD at a large batch on the embedded MNIST.

    python scripts/compare_optimizers.py [--batchsize 4096] [--epochs 20] [--out result/compare]
    python scripts/compare_optimizers.py --preset cpu      # both tuned and trained in <= 10 min
                                                           # on 2 CPU cores

``--preset cpu`` sizes the same protocol for a laptop (:data:`PRESETS`): batch 1,024, 3
epochs, lr trials of a third of an epoch, a lighter test; flags given as well override it.

Both optimizers train the same small ResNet (``resnet_mnist``) from the same
initial weights, with the same data order, the same schedule family (linear
warm-up over ``--warmup`` epochs, then the paper's polynomial decay to zero at
the last epoch, momentum scaled down with the lr) and weight rescaling instead
of weight decay (docs/SPEC.md, section 2).

Tuning protocol (the same budget for both): each optimizer tries each
learning rate of its grid (``--sgd-lrs``, ``--kfac-lrs``: three values each)
for ``--tune-epochs`` epochs; the one with the best test accuracy at the end of
that short run wins and is trained for ``--epochs`` epochs.  Nothing else is
tuned (K-FAC: damping ``--damping``, adaptive stale statistics, curvature statistics from
the first ``--stats-batchsize`` examples of each batch).

Test accuracy is measured every ``--eval-every`` iterations, after re-estimating the
batch-norm statistics on ``--bn-examples`` training images (precise BN, for both
optimizers; the training state is restored afterwards); epochs are
fractional (iterations x batch / 60,000) and wall seconds count training only
(evaluation excluded).  Prints a table (epochs and seconds to 98% and 99%,
final accuracy), writes a PNG of the curves and ``compare.json``, and ends
with one JSON line.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.training.blas_threads import share_cores_between_ranks  # noqa: E402

share_cores_between_ranks()  # one BLAS thread, as every process of this project

from utils.training.comparison import (  # noqa: E402
    TARGETS,
    add_training_arguments,
    describe_device,
    first_reaching,
    load_split,
    to_device,
    train,
)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        epochs, seconds, acc = zip(*r["curve"])
        label = f"{name} (lr {r['lr']:g})"
        axes[0].plot(epochs, acc, marker=".", label=label)
        axes[1].plot(seconds, acc, marker=".", label=label)
    for ax, xlabel in zip(axes, ("epoch", "training wall time (s)")):
        for target in TARGETS:
            ax.axhline(target, color="grey", lw=0.6, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.9, 1.0)
        ax.legend()
    fig.suptitle("MNIST, resnet_mnist, batch %d" % next(iter(results.values()))["batchsize"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: named sets of defaults: ``cpu`` fits tuning and training both optimizers into 10 minutes on
#: two CPU cores (measured in docs/REPRODUCTION.md)
PRESETS = {
    "cpu": {"batchsize": 1024, "epochs": 3, "tune_epochs": 1 / 3, "warmup": 0.25,
            "eval_every": 10, "bn_examples": 2000, "stats_batchsize": 256,
            "sgd_lrs": [0.5, 1.0, 2.0], "kfac_lrs": [0.02, 0.05, 0.1],
            "out": "result/compare_cpu"},
}


def parse_args(argv=None):
    """The options, a ``--preset``'s values as defaults that flags override."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a named set of defaults (cpu: minutes on two CPU cores)")
    parser.add_argument("--show-options", action="store_true",
                        help="print the options the run would use (one JSON object) and exit")
    add_training_arguments(parser)
    parser.add_argument("--batchsize", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sgd-lrs", type=float, nargs=3, default=[1.0, 2.0, 4.0])
    parser.add_argument("--kfac-lrs", type=float, nargs=3, default=[0.02, 0.05, 0.1])
    parser.add_argument("--decay-end", type=float, default=None,
                        help="epoch where the lr reaches 0 (default: --epochs)")
    parser.add_argument("--eval-every", type=int, default=7, help="iterations")
    parser.add_argument("--out", default="result/compare")
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.show_options:
        print(json.dumps(vars(args), sort_keys=True))
        return
    os.makedirs(args.out, exist_ok=True)

    data = to_device((load_split("train"), load_split("test")), args.device)
    results, tuning = {}, {}
    for name, grid in (("sgd", args.sgd_lrs), ("kfac", args.kfac_lrs)):
        trials = []
        for lr in grid:
            short = argparse.Namespace(**vars(args))
            short.decay_end = args.decay_end or args.epochs  # same schedule as the full run
            curve, finite = train(name, lr, args.tune_epochs, short, data)
            trials.append((curve[-1][2] if finite else -1.0, lr))
        tuning[name] = [{"lr": lr, "accuracy": acc} for acc, lr in trials]
        best_lr = max(trials)[1]
        curve, _ = train(name, best_lr, args.epochs, args, data)
        results[name] = {"lr": best_lr, "curve": curve, "batchsize": args.batchsize}

    print(f"\nMNIST {args.arch}, batch {args.batchsize}, {args.epochs} epochs on "
          f"{describe_device(args.device)}; lr chosen from 3 trials of {args.tune_epochs:g} "
          "epochs each")
    print(f"{'optimizer':10s} {'lr':>6s} " + " ".join(
        f"{'ep@' + str(int(t * 100)) + '%':>8s} {'s@' + str(int(t * 100)) + '%':>8s}"
        for t in TARGETS) + f" {'final acc':>10s} {'train s':>8s}")
    summary = {}
    for name, r in results.items():
        row = {"lr": r["lr"], "final_accuracy": r["curve"][-1][2],
               "train_seconds": r["curve"][-1][1]}
        cells = []
        for target in TARGETS:
            epoch, seconds = first_reaching(r["curve"], target)
            key = str(int(target * 100))
            row[f"epochs_to_{key}"], row[f"seconds_to_{key}"] = epoch, seconds
            cells.append("      --       --" if epoch is None else f"{epoch:8.2f} {seconds:8.1f}")
        summary[name] = row
        print(f"{name:10s} {r['lr']:6g} " + " ".join(cells)
              + f" {row['final_accuracy']:10.4f} {row['train_seconds']:8.1f}")
    sgd, kfac = summary["sgd"], summary["kfac"]
    figures = {"device": describe_device(args.device), "preset": args.preset,
               "batchsize": args.batchsize,
               "epochs": args.epochs, "tuning": tuning,
               "sgd": sgd, "kfac": kfac}
    if sgd["epochs_to_98"] and kfac["epochs_to_98"]:
        figures["epoch_ratio_98"] = round(kfac["epochs_to_98"] / sgd["epochs_to_98"], 3)
        figures["time_ratio_98"] = round(kfac["seconds_to_98"] / sgd["seconds_to_98"], 3)
    plot(results, os.path.join(args.out, "compare.png"))
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"figures": figures, "curves": {k: v["curve"] for k, v in results.items()}},
                  f, indent=1)
    print(f"curves: {os.path.join(args.out, 'compare.png')}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
