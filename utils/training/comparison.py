"""The one-process K-FAC vs momentum SGD protocol on the embedded MNIST, shared by
``scripts/compare_optimizers.py`` and ``scripts/small_scale_table.py``.

Both optimizers train the same model from the same initial weights, with the same data order,
the same schedule family (linear warm-up, then the paper's polynomial decay, momentum scaled
down with the lr) and weight rescaling instead of weight decay.  Test accuracy is measured
after re-estimating the batch-norm statistics on training images (:func:`precise_bn`); wall
seconds count training only.
"""
import contextlib
import os
import time

import numpy as np

from kfac_mn import backend, no_backprop_mode, using_config
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.backend import synchronize
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.lr_schedules import PolynomialDecay, ScaledWith, ScheduleSet
from kfac_mn.optimizer import MicroBatches
from kfac_mn.optimizer_hooks import WeightRescale
from kfac_mn.optimizers import KFAC, MomentumSGD
from models import archs
from utils.data.mnist import read_mnist_arrays
from utils.training.step import micro_batches

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
