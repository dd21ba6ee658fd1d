"""The small-scale table: K-FAC vs MomentumSGD on the embedded MNIST at several global batches.

    python scripts/small_scale_table.py [--batchsizes 1024 4096 16384 60000]
                                        [--epochs 5 10 20 50] [--out result/small_scale]

For each global batch (60,000 = the whole training set, one step per epoch) both optimizers
train ``resnet_mnist`` in one process with ``scripts/comparison.py``'s own training
function (same initial weights, data order, lr warm-up then polynomial decay with momentum
scaled down with the lr, weight rescaling, precise-BN evaluation).  The learning-rate grids
(``--sgd-lrs``, ``--kfac-lrs``) are given for a batch of ``--reference-batch`` and scaled to each
batch by ``--lr-scaling``; with more than one value per grid each value is tried for
``--tune-epochs`` epochs and the best test accuracy wins (comparison.py's protocol),
with one value it is used as is.  The test accuracy is measured about ``--evals`` times per run.

Prints the table (per batch and optimizer: lr, epochs and training seconds to 98% and 99% test
accuracy, final accuracy, training seconds), writes ``small_scale.png`` (accuracy against epochs,
one panel per batch, and epochs to 98% against the batch) and ``small_scale.json`` under
``--out``, and ends with one JSON line.  ``--train-examples``/``--test-examples`` cut the data
(for smoke tests only: the table is meant for the full 60,000 / 10,000).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.training.blas_threads import share_cores_between_ranks  # noqa: E402

share_cores_between_ranks()  # one BLAS thread, as every process of this project

from utils.training import comparison  # noqa: E402

OPTIMIZERS = ("sgd", "kfac")
LR_SCALINGS = {"none": lambda ratio: 1.0, "sqrt": math.sqrt, "linear": lambda ratio: ratio}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    comparison.add_training_arguments(parser)
    parser.add_argument("--batchsizes", type=int, nargs="+", default=[1024, 4096, 16384, 60000])
    parser.add_argument("--epochs", type=float, nargs="+", default=[5, 10, 20, 50],
                        help="epoch budget per batch size (one value: the same for all)")
    parser.add_argument("--reference-batch", type=int, default=4096,
                        help="the batch the lr grids are given for")
    parser.add_argument("--lr-scaling", choices=sorted(LR_SCALINGS), default="sqrt")
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--kfac-lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--evals", type=int, default=20, help="test evaluations per run")
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--out", default="result/small_scale")
    args = parser.parse_args(argv)
    if len(args.epochs) == 1:
        args.epochs = args.epochs * len(args.batchsizes)
    if len(args.epochs) != len(args.batchsizes):
        parser.error(f"--epochs needs one value or one per batch size ({len(args.batchsizes)}),"
                     f" got {len(args.epochs)}")
    for flag, values in (("--batchsizes", args.batchsizes), ("--epochs", args.epochs),
                         ("--tune-epochs", [args.tune_epochs]), ("--evals", [args.evals]),
                         ("--reference-batch", [args.reference_batch]),
                         ("--sgd-lrs", args.sgd_lrs), ("--kfac-lrs", args.kfac_lrs)):
        if min(values) <= 0:
            parser.error(f"{flag} must be positive, got {min(values)}")
    if min(args.epochs) <= args.warmup:
        parser.error(f"every --epochs value must exceed --warmup ({args.warmup:g}): the lr "
                     f"decays after the warm-up, got {min(args.epochs):g}")
    return args


def run_args(args, batchsize, epochs):
    """The namespace :func:`utils.training.comparison.train` reads, for one batch size."""
    train_examples = args.train_examples or 60000
    if batchsize > train_examples:
        raise SystemExit(f"--batchsizes {batchsize} is larger than the {train_examples} "
                         "training examples")
    steps = int(round(epochs * (train_examples // batchsize)))
    return argparse.Namespace(
        arch=args.arch, batchsize=batchsize, epochs=epochs, momentum=args.momentum,
        damping=args.damping, warmup=args.warmup, power=args.power, decay_end=epochs,
        stats_batchsize=args.stats_batchsize, stale_warmup=args.stale_warmup,
        stale_threshold=args.stale_threshold, max_interval=args.max_interval,
        eval_every=max(1, steps // args.evals), bn_examples=args.bn_examples, seed=args.seed,
        micro_batch=args.micro_batch)


def load_data(args):
    (x_train, t_train) = comparison.load_split("train")
    (x_test, t_test) = comparison.load_split("test")
    n_train, n_test = args.train_examples or len(x_train), args.test_examples or len(x_test)
    data = (x_train[:n_train], t_train[:n_train]), (x_test[:n_test], t_test[:n_test])
    return comparison.to_device(data, args.device)


def tuned_run(name, grid, run, tune_epochs, data):
    """comparison.py's protocol: the best lr of a short run, then the full run."""
    trials = []
    if len(grid) > 1:
        for lr in grid:
            curve, finite = comparison.train(name, lr, tune_epochs, run, data)
            trials.append({"lr": lr, "accuracy": curve[-1][2] if finite else None})
        best = max(trials, key=lambda trial: (trial["accuracy"] is not None,
                                              trial["accuracy"] or 0.0, -trial["lr"]))["lr"]
    else:
        best = grid[0]
    curve, finite = comparison.train(name, best, run.epochs, run, data)
    return {"lr": best, "tuning": trials, "curve": curve, "diverged": not finite}


def summary_row(batchsize, name, result):
    row = {"batchsize": batchsize, "optimizer": name, "lr": result["lr"],
           "final_accuracy": result["curve"][-1][2], "train_seconds": result["curve"][-1][1],
           "diverged": result["diverged"]}
    for target in comparison.TARGETS:
        epoch, seconds = comparison.first_reaching(result["curve"], target)
        key = str(int(target * 100))
        row[f"epochs_to_{key}"], row[f"seconds_to_{key}"] = epoch, seconds
    return row


def print_table(rows):
    targets = [str(int(t * 100)) for t in comparison.TARGETS]
    print(f"{'batch':>6} {'optimizer':>9} {'lr':>8} "
          + " ".join(f"{'ep@' + t + '%':>8} {'s@' + t + '%':>8}" for t in targets)
          + f" {'final acc':>10} {'train s':>8}")
    for row in rows:
        cells = []
        for t in targets:
            epoch, seconds = row[f"epochs_to_{t}"], row[f"seconds_to_{t}"]
            cells.append(f"{'--':>8} {'--':>8}" if epoch is None
                         else f"{epoch:8.2f} {seconds:8.1f}")
        print(f"{row['batchsize']:>6} {row['optimizer']:>9} {row['lr']:8.4g} " + " ".join(cells)
              + f" {row['final_accuracy']:10.4f} {row['train_seconds']:8.1f}"
              + (" diverged" if row["diverged"] else ""))


def plot(results, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted(results)
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4 * (len(batches) + 1), 3.8))
    for ax, batchsize in zip(axes, batches):
        for name in OPTIMIZERS:
            epochs, _, accuracy = zip(*results[batchsize][name]["curve"])
            label = f"{name} lr {results[batchsize][name]['lr']:.3g}"
            ax.plot(epochs, accuracy, marker=".", label=label)
        for target in comparison.TARGETS:
            ax.axhline(target, color="grey", lw=0.6, ls="--")
        ax.set_title(f"batch {batchsize}")
        ax.set_xlabel("epoch")
        ax.set_ylim(0.9, 1.0)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy")
    summary = axes[-1]
    for name in OPTIMIZERS:
        points = [(row["batchsize"], row["epochs_to_98"]) for row in rows
                  if row["optimizer"] == name and row["epochs_to_98"] is not None]
        if points:
            summary.plot(*zip(*points), marker="o", label=name)
    summary.set_xscale("log")
    summary.set_xlabel("global batch")
    summary.set_ylabel("epochs to 98% test accuracy")
    if summary.get_legend_handles_labels()[0]:
        summary.legend(fontsize=8)
    else:
        summary.set_title("no run reached 98%")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = load_data(args)
    grids = {"sgd": args.sgd_lrs, "kfac": args.kfac_lrs}
    results, rows = {}, []
    for batchsize, epochs in zip(args.batchsizes, args.epochs):
        run = run_args(args, batchsize, epochs)
        scale = LR_SCALINGS[args.lr_scaling](batchsize / args.reference_batch)
        results[batchsize] = {}
        for name in OPTIMIZERS:
            grid = [lr * scale for lr in grids[name]]
            result = tuned_run(name, grid, run, min(args.tune_epochs, epochs), data)
            results[batchsize][name] = result
            rows.append(summary_row(batchsize, name, result))
    device = comparison.describe_device(args.device)
    print(f"\n{args.arch}, {len(data[0][0]):,} training / {len(data[1][0]):,} test examples, "
          f"one process on {device}; lr grids for batch {args.reference_batch} scaled by "
          f"{args.lr_scaling}")
    print_table(rows)
    plot(results, rows, os.path.join(args.out, "small_scale.png"))
    figures = {"device": device, "arch": args.arch, "train_examples": len(data[0][0]),
               "test_examples": len(data[1][0]), "lr_scaling": args.lr_scaling,
               "reference_batch": args.reference_batch, "rows": rows}
    with open(os.path.join(args.out, "small_scale.json"), "w") as f:
        json.dump({**figures, "runs": {str(b): r for b, r in results.items()}}, f, indent=1)
    print(f"plot: {os.path.join(args.out, 'small_scale.png')}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
