"""The paper's claim at small scale: K-FAC vs MomentumSGD at a large batch on the embedded MNIST.

    python scripts/compare_optimizers.py [--batchsize 4096] [--epochs 20] [--out result/compare]

Both optimizers train the same small ResNet (``resnet_mnist``) from the same
initial weights, with the same data order, the same schedule family (linear
warm-up over ``--warmup`` epochs, then the paper's polynomial decay to zero at
the last epoch, momentum scaled down with the lr) and weight rescaling instead
of weight decay (PAPER.md).

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
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kfac_mn import backend, no_backprop_mode, using_config  # noqa: E402
from kfac_mn import functions as F  # noqa: E402
from kfac_mn import links as L  # noqa: E402
from kfac_mn.backend import synchronize  # noqa: E402
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule  # noqa: E402
from kfac_mn.lr_schedules import PolynomialDecay, ScaledWith, ScheduleSet  # noqa: E402
from kfac_mn.optimizer import MicroBatches  # noqa: E402
from kfac_mn.optimizer_hooks import WeightRescale  # noqa: E402
from kfac_mn.optimizers import KFAC, MomentumSGD  # noqa: E402
from models import archs  # noqa: E402
from utils.data.mnist import read_mnist_arrays  # noqa: E402
from utils.training.step import micro_batches  # noqa: E402

TARGETS = (0.98, 0.99)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_split(split):
    images, labels = read_mnist_arrays(split)
    x = ((images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    return x, labels.astype(np.int32)


def describe_device(device):
    """``'CPU (n cores)'`` or the GPU's name."""
    if device == "cpu":
        return f"CPU ({os.cpu_count()} cores)"
    cupy = backend.cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def to_device(data, device):
    """The ``((x, t), (x, t))`` splits as NumPy arrays, or CuPy arrays for ``--device gpu``."""
    if device == "cpu":
        return data
    if not backend.gpu_available():
        raise SystemExit("--device gpu needs CuPy and a CUDA device")
    return tuple(tuple(backend.cupy.asarray(a) for a in split) for split in data)


@contextlib.contextmanager
def precise_bn(model, x, batch=2500):
    """Inside the block every BN layer's running statistics are their average over ``x``.

    With 14 updates per epoch the running averages (decay 0.9) still carry a large part of
    their initial values early on; re-estimating them before each evaluation measures the
    weights, not that lag (precise BN).  The training state is restored on exit.
    """
    norms = [link for link in model.links() if isinstance(link, L.BatchNormalization)]
    saved = [(link.decay, link.avg_mean.copy(), link.avg_var.copy()) for link in norms]
    with no_backprop_mode(), using_config("train", True):
        for k, start in enumerate(range(0, len(x), batch)):
            for link in norms:
                link.decay = k / (k + 1.0)  # cumulative mean over the batches
            model(x[start:start + batch])
    try:
        yield
    finally:
        for link, (decay, mean, var) in zip(norms, saved):
            link.decay = decay
            link.avg_mean[...] = mean
            link.avg_var[...] = var


def evaluate(model, x, t, batch=2500):
    correct = 0
    with no_backprop_mode(), using_config("train", False):
        for i in range(0, len(x), batch):
            y = model(x[i:i + batch]).data
            correct += int((y.argmax(axis=1) == t[i:i + batch]).sum())
    return correct / len(x)


def make_optimizer(name, lr, momentum, args, steps_per_epoch):
    if name == "sgd":
        opt = MomentumSGD(lr=lr, momentum=momentum)
    else:
        schedule = StatisticsSchedule("adaptive", warmup_steps=args.stale_warmup,
                                      threshold=args.stale_threshold,
                                      max_interval=args.max_interval)
        opt = KFAC(lr=lr, momentum=momentum, damping=args.damping, schedule=schedule,
                   stats_batchsize=args.stats_batchsize)
    lr_schedule = PolynomialDecay(lr, power=args.power, start_epoch=args.warmup,
                                  end_epoch=args.decay_end or args.epochs,
                                  warmup_epochs=args.warmup, warmup_from=0.1)
    return opt, ScheduleSet(lr=lr_schedule, momentum=ScaledWith(momentum, lr_schedule))


def update(opt, lossfun, x, t, micro_batch):
    """One update on the batch ``(x, t)``; returns its mean loss (a device scalar).

    With ``micro_batch`` (an int) forward and backward run on parts of at most that many
    examples (gradient accumulation, for batches that do not fit in memory at once), handed
    to either optimizer as :class:`MicroBatches`.  Batch normalization then normalizes each
    part with its own statistics.
    """
    k = 1 if not micro_batch else -(-len(x) // micro_batch)
    args = (x, t) if k == 1 else (MicroBatches(micro_batches(x, t, k)),)
    return opt.update(lossfun, *args).data


def train(name, lr, epochs, args, data, log=print):
    """One run; returns the curve [(epoch, train seconds, test accuracy)] and the intervals."""
    (x_train, t_train), (x_test, t_test) = data
    np.random.seed(args.seed)
    model = archs[args.arch](n_class=10, in_channels=1)
    xp = backend.get_array_module(x_train)
    if xp is not np:
        model.to_gpu()
    steps_per_epoch = len(x_train) // args.batchsize
    opt, schedules = make_optimizer(name, lr, args.momentum, args, steps_per_epoch)
    opt.setup(model)
    opt.add_hook(WeightRescale())

    def lossfun(x, t):
        return F.softmax_cross_entropy(model(x), t)

    order_rng = np.random.default_rng(args.seed)
    curve, seconds, iteration = [], 0.0, 0
    total = int(round(epochs * steps_per_epoch))
    while iteration < total:
        order = order_rng.permutation(len(x_train))
        for step in range(steps_per_epoch):
            if iteration >= total:
                break
            idx = xp.asarray(order[step * args.batchsize:(step + 1) * args.batchsize])
            start = time.perf_counter()
            schedules.apply(opt, iteration / steps_per_epoch)
            loss = update(opt, lossfun, x_train[idx], t_train[idx], args.micro_batch)
            synchronize(loss)  # on the GPU, charge the step for its kernels
            seconds += time.perf_counter() - start
            iteration += 1
            if iteration % args.eval_every == 0 or iteration == total:
                epoch = iteration / steps_per_epoch
                with precise_bn(model, x_train[:args.bn_examples]):
                    acc = evaluate(model, x_test, t_test)
                curve.append((epoch, seconds, acc))
                extra = ""
                if name == "kfac":
                    values = sorted(opt.intervals().values())
                    extra = f" intervals min/median/max {values[0]}/{values[len(values) // 2]}" \
                            f"/{values[-1]}"
                log(f"  {name} lr={lr:g} epoch {epoch:5.2f} loss {float(loss):.4f} "
                    f"test {acc:.4f} train {seconds:7.1f}s{extra}")
                if not np.isfinite(float(loss)):
                    log(f"  {name} lr={lr:g} diverged")
                    return curve, False
    return curve, True


def first_reaching(curve, target):
    for epoch, seconds, acc in curve:
        if acc >= target:
            return epoch, seconds
    return None, None


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


def add_training_arguments(parser):
    """The flags of one training run that this script and ``small_scale_table.py`` share."""
    parser.add_argument("--arch", default="resnet_mnist")
    parser.add_argument("--tune-epochs", type=float, default=2)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=1.0, help="lr warm-up epochs")
    parser.add_argument("--power", type=float, default=2.0, help="polynomial decay power")
    parser.add_argument("--stats-batchsize", type=int, default=512,
                        help="examples of each batch that feed K-FAC's statistics")
    parser.add_argument("--stale-warmup", type=int, default=10)
    parser.add_argument("--stale-threshold", type=float, default=0.1)
    parser.add_argument("--max-interval", type=int, default=8)
    parser.add_argument("--bn-examples", type=int, default=10000,
                        help="training images that re-estimate the BN statistics before a test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="at most this many examples per forward/backward: batches above "
                        "it accumulate gradients (and K-FAC statistics) over parts, each "
                        "normalized by BN on its own (default: whole batches)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--batchsize", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sgd-lrs", type=float, nargs=3, default=[1.0, 2.0, 4.0])
    parser.add_argument("--kfac-lrs", type=float, nargs=3, default=[0.02, 0.05, 0.1])
    parser.add_argument("--decay-end", type=float, default=None,
                        help="epoch where the lr reaches 0 (default: --epochs)")
    parser.add_argument("--eval-every", type=int, default=7, help="iterations")
    parser.add_argument("--out", default="result/compare")
    args = parser.parse_args()
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
    figures = {"device": describe_device(args.device), "batchsize": args.batchsize,
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
