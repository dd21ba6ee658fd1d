"""Options of ``train_imagenet.py``: the command line, ``--config FILE.json`` and their checks.

A config file is one JSON object whose keys are option names (``acc_iters`` or ``acc-iters``)
and whose values have the option's type (booleans for ``--x/--no-x`` flags, lists for
``--lr-milestones``).  It sets the defaults; flags given on the command line override it.
Every check here runs before any work starts and names the flag, file or key at fault.

The defaults are the embedded MNIST run (no data arguments; see the README).  Options that
depend on the data have a ``None`` default, resolved by :func:`resolve_arch` and
:func:`resolve_image_sizes`.
"""
import argparse
import json
import math
import os
import tempfile

from kfac_mn.backend import CONV_BACKENDS
from kfac_mn.communicators import COMMUNICATOR_NAMES, v_collectives
from kfac_mn.communicators.communicator_base import DEFAULT_ALPHA, DEFAULT_BANDWIDTH
from kfac_mn.distributed.assignment import ASSIGNMENTS
from models import archs

OPTIMIZERS = ("kfac", "sgd")
LR_SCHEDULES = ("poly", "step")
STAT_SCHEDULES = ("fixed", "adaptive")
DTYPES = ("float16", "float32", "float64")

#: ``--arch`` when none is given: the small ResNet on MNIST, ResNet-50 on image files
DEFAULT_ARCH = {"mnist": "resnet_mnist", "images": "resnet50"}


class OptionError(ValueError):
    """A bad option, config file or option combination (reported as a usage error)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" once: not where the help already names its default, nor for
    defaults resolved later (None) or booleans (the --x/--no-x pair says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text or action.default in (None, argparse.SUPPRESS) \
                or isinstance(action, argparse.BooleanOptionalAction):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise OptionError(message)


def build_parser():
    """The argument parser; its defaults train ``resnet_mnist`` on the embedded MNIST."""
    parser = _Parser(
        prog="train_imagenet.py", allow_abbrev=False,
        description="Distributed K-FAC (or momentum SGD) training under mpiexec, in the "
                    "spirit of Chainer's ImageNet example. Without --train/--val it trains a "
                    "small ResNet on the embedded MNIST.",
        formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--config", metavar="FILE.json",
        help="JSON object of option values (keys: option names); flags override it")

    data = parser.add_argument_group("data")
    data.add_argument("--train", help="training images: a list file ('<path> <label>' per "
                                      "line) or a class-folder tree (root/<class>/<image>); "
                                      "default: the embedded MNIST")
    data.add_argument("--val", help="validation images, same layouts (required with --train)")
    data.add_argument("--root", default=".", help="directory the paths of list files are "
                                                  "relative to")
    data.add_argument("--mean", help="Chainer mean image (.npy, C x H x W, pixel units) to "
                                     "subtract instead of the per-channel ImageNet mean/std")
    data.add_argument("--train-size", type=int, default=0,
                      help="use only the first N training examples (0: all)")
    data.add_argument("--val-size", type=int, default=0,
                      help="use only the first N validation examples (0: all)")
    data.add_argument("--insize", type=int, default=None,
                      help="crop size of image files (default: the architecture's)")
    data.add_argument("--val-resize", type=int, default=None,
                      help="shorter side before the validation centre crop "
                           "(default: insize * 256 / 224)")
    data.add_argument("--crop-scale-min", type=float, default=0.08,
                      help="smallest area fraction of the random-resized crop")
    data.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                      help="random horizontal flips of image files")
    data.add_argument("--erasing-prob", type=float, default=0.0,
                      help="probability of random erasing per image (0: off)")
    data.add_argument("--mixup-alpha", type=float, default=0.0,
                      help="mixup Beta(alpha, alpha) parameter (0: off)")
    data.add_argument("--label-smoothing", type=float, default=0.0,
                      help="label smoothing epsilon (0: off)")
    data.add_argument("--loaderjob", type=int, default=0,
                      help="loader worker processes per rank (0: load in the training "
                           "process)")
    data.add_argument("--n-class", type=int, default=None,
                      help="number of classes of a list file (default: its largest label + "
                           "1, which must then leave no class without an example)")
    data.add_argument("--verify-images", action=argparse.BooleanOptionalAction, default=False,
                      help="decode every image once before training (the ranks share the "
                           "work) and report all that fail at once")
    data.add_argument("--skip-corrupt", action=argparse.BooleanOptionalAction, default=False,
                      help="go on past missing or undecodable images: in training each is "
                           "replaced by the next readable example (batches keep their size), "
                           "in validation it is left out")

    model = parser.add_argument_group("model and devices")
    model.add_argument("--arch", choices=sorted(archs), default=None,
                       help="network (default: resnet_mnist on MNIST, resnet50 otherwise)")
    model.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=False,
                       help="run each rank on the GPU of its rank within the node (CuPy)")
    model.add_argument("--conv-backend", choices=CONV_BACKENDS, default="im2col",
                       help="how the GPU computes convolutions and batch norm: im2col "
                            "(im2col + cuBLAS and our CUDA kernels) or cudnn (cuDNN Frontend "
                            "graphs: pip install 'kfac_mn[gpu]'); needs --gpu")
    model.add_argument("--communicator", choices=COMMUNICATOR_NAMES, default="mpi",
                       help="collectives backend (nccl: CuPy arrays over NCCL, needs --gpu)")
    model.add_argument("--collectives", choices=v_collectives.CHOICES, default="auto",
                       help="algorithm of K-FAC's ReduceScatterV and AllGatherV: two_phase "
                            "(equal chunks, then a redistribution), native (the library's "
                            "own), allreduce (the authors' stand-in) or auto (the cheapest "
                            "for each call under the alpha-beta model of --comm-alpha and "
                            "--comm-bandwidth)")
    model.add_argument("--comm-alpha", type=float, default=DEFAULT_ALPHA,
                       help="seconds per message that --collectives auto assumes (default: "
                            f"{DEFAULT_ALPHA:g}, InfiniBand EDR; 'alpha' of scale_model.py "
                            "--calibrate)")
    model.add_argument("--comm-bandwidth", type=float, default=DEFAULT_BANDWIDTH,
                       help="bytes per second per link that --collectives auto assumes "
                            f"(default: {DEFAULT_BANDWIDTH:g}, InfiniBand EDR; 'bandwidth' of "
                            "--calibrate)")

    training = parser.add_argument_group("training")
    training.add_argument("--batchsize", "-B", type=int, default=32,
                          help="examples per worker and micro-batch")
    training.add_argument("--acc-iters", type=int, default=None,
                          help="micro-batches accumulated per update (gradients and K-FAC "
                               "factors; default: --global-batch / (workers x batchsize), "
                               "else 1)")
    training.add_argument("--global-batch", type=int, default=0,
                          help="required workers x batchsize x acc-iters (0: no check)")
    training.add_argument("--val-batchsize", type=int, default=500,
                          help="validation examples per worker and batch")
    training.add_argument("--epoch", "-E", type=float, default=1.0,
                          help="training epochs (may be fractional)")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac",
                          help="kfac: distributed K-FAC (the paper); sgd: momentum SGD with "
                               "the same schedules (the defaults are tuned for K-FAC: give "
                               "SGD its own --lr)")
    training.add_argument("--seed", type=int, default=0,
                          help="initial weights, data order and augmentation")
    training.add_argument("--out", "-o", default="result",
                          help="output directory; one that already holds a run needs "
                               "--resume (to continue it) or --overwrite")
    training.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                          help="start a new run in an --out that holds one: its log and "
                               "options are rewritten, its snapshots replaced as new ones "
                               "are written")
    training.add_argument("--resume", "-r", metavar="DIR",
                          help="continue from a checkpoint: a snapshot directory, or an "
                               "output directory (its latest snapshot)")

    schedule = parser.add_argument_group("learning rate, momentum and regularisation")
    schedule.add_argument("--lr", type=float, default=0.05, help="initial learning rate")
    schedule.add_argument("--lr-reference-batch", type=int, default=0,
                          help="if > 0, the lr is given per this many images and scaled "
                               "linearly to the global batch (Goyal et al.)")
    schedule.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="poly",
                          help="poly: lr0 (1 - (e - start) / (end - start))^power after "
                               "--lr-decay-start; step: times --lr-decay-rate at each "
                               "milestone")
    schedule.add_argument("--lr-power", type=float, default=2.0,
                          help="power of the polynomial decay")
    schedule.add_argument("--lr-decay-start", type=float, default=0.0,
                          help="epoch where the polynomial decay starts")
    schedule.add_argument("--lr-decay-end", type=float, default=None,
                          help="epoch where the polynomial decay reaches 0 (default: --epoch)")
    schedule.add_argument("--lr-milestones", type=float, nargs="+", default=[30.0, 60.0, 80.0],
                          help="epochs of the step decay")
    schedule.add_argument("--lr-decay-rate", type=float, default=0.1,
                          help="factor of the step decay at each milestone")
    schedule.add_argument("--warmup-epochs", type=float, default=0.0,
                          help="linear lr warm-up from --warmup-from x lr over these epochs")
    schedule.add_argument("--warmup-from", type=float, default=0.0,
                          help="fraction of the lr the warm-up starts from")
    schedule.add_argument("--momentum", type=float, default=0.9,
                          help="momentum of the update (scaled down with the lr, see "
                               "--momentum-scaling)")
    schedule.add_argument("--momentum-scaling", action=argparse.BooleanOptionalAction,
                          default=True,
                          help="scale momentum down with the lr (m = m0 lr / lr0 once the lr "
                               "falls)")
    schedule.add_argument("--weight-rescale", action=argparse.BooleanOptionalAction,
                          default=True,
                          help="rescale conv/FC weights to norm sqrt(2 out_channels) after "
                               "each update (the paper's replacement for weight decay)")
    schedule.add_argument("--weight-decay", type=float, default=0.0,
                          help="L2 weight decay rate (0: off)")

    kfac = parser.add_argument_group("K-FAC")
    kfac.add_argument("--damping", type=float, default=1e-3,
                      help="Tikhonov damping gamma (with pi-correction)")
    kfac.add_argument("--cov-ema-decay", type=float, default=0.1,
                      help="running-average weight r of new statistics (1: newest only)")
    kfac.add_argument("--fisher-type", choices=("emp", "mc"), default="emp",
                      help="emp: true labels; mc: labels sampled from the model")
    kfac.add_argument("--bn-fisher", choices=("diag", "unit", "full"), default="diag",
                      help="Fisher block of batch normalization")
    kfac.add_argument("--inv-dtype", choices=("float32", "float64"), default="float32",
                      help="dtype of the inversions")
    kfac.add_argument("--batched-inversion", action=argparse.BooleanOptionalAction,
                      default=False,
                      help="invert the factors of equal size due at one step as one batch "
                           "(fewer kernel launches on the GPU; the same inverses)")
    kfac.add_argument("--factor-dtype", choices=("data",) + DTYPES, default="data",
                      help="precision of the factor products (data: the data's dtype; "
                           "float16: the paper's half precision, accumulated in float32)")
    kfac.add_argument("--comm-dtype", choices=DTYPES, default="float32",
                      help="dtype of the reduce-scatter and all-gather buffers")
    kfac.add_argument("--assignment", choices=ASSIGNMENTS, default="balanced",
                      help="how layers are assigned to workers")
    kfac.add_argument("--stat-schedule", choices=STAT_SCHEDULES, default="adaptive",
                      help="fixed: refresh every --factor-interval steps; adaptive: stale "
                           "statistics with per-layer intervals")
    kfac.add_argument("--factor-interval", type=int, default=1,
                      help="fixed schedule: steps between factor refreshes")
    kfac.add_argument("--inverse-interval", type=int, default=1,
                      help="fixed schedule: steps between inversions")
    kfac.add_argument("--stale-warmup", type=int, default=50,
                      help="adaptive schedule: steps that refresh every layer")
    kfac.add_argument("--stale-threshold", type=float, default=0.1,
                      help="adaptive schedule: relative change below which a layer's "
                           "interval doubles (above it, it halves)")
    kfac.add_argument("--max-interval", type=int, default=20,
                      help="adaptive schedule: longest interval")

    output = parser.add_argument_group("logging and checkpoints")
    output.add_argument("--log-interval", type=int, default=0,
                        help="iterations per log.jsonl record (0: about 10 per epoch)")
    output.add_argument("--val-interval", type=int, default=1,
                        help="epochs between validations (the last epoch is always "
                             "validated)")
    output.add_argument("--snapshot-interval", type=int, default=1,
                        help="epochs between checkpoints (the end of the run always writes "
                             "one; 0: only then)")
    output.add_argument("--keep-snapshots", type=int, default=2,
                        help="snapshots kept (the newest; the newest that passed validation "
                             "is kept as well)")
    output.add_argument("--divergence-factor", type=float, default=10.0,
                        help="stop when the training loss exceeds this many times its lowest "
                             "so far for --divergence-patience log intervals (0: off)")
    output.add_argument("--divergence-patience", type=int, default=3,
                        help="log intervals the loss may stay above --divergence-factor x "
                             "its lowest")
    output.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a rank may wait in one collective before the job is "
                             "aborted, naming the ranks that did not arrive (0: wait forever)")
    output.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar on rank 0")
    output.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                        help="write loss and accuracy PNGs at the end")
    return parser


# -- config files -------------------------------------------------------------------------
def config_actions(parser):
    """{key: action} of every option a config file may set (all but --config)."""
    return {action.dest: action for action in parser._actions
            if action.option_strings and action.dest not in ("help", "config")}


def _describe_type(action):
    if isinstance(action, argparse.BooleanOptionalAction):
        return "true or false"
    if action.choices is not None:
        return "one of " + ", ".join(repr(choice) for choice in action.choices)
    if action.nargs == "+":
        return "a non-empty list of " + {int: "integers", float: "numbers"}.get(action.type,
                                                                              "strings")
    return {int: "an integer", float: "a number"}.get(action.type, "a string")


def _valid_scalar(action, value):
    if isinstance(action, argparse.BooleanOptionalAction):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if action.type is int:
        return isinstance(value, int)
    if action.type is float:
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _checked_value(path, key, action, value):
    if value is None and action.default is None:
        return None
    if action.nargs == "+":
        valid = (isinstance(value, list) and value
                 and all(_valid_scalar(action, item) for item in value))
    else:
        valid = _valid_scalar(action, value) and (action.choices is None
                                                  or value in action.choices)
    if not valid:
        raise OptionError(f"{path}: key {key!r} must be {_describe_type(action)}, "
                          f"got {json.dumps(value)}")
    if action.type is float:
        numbers = [float(v) for v in value] if action.nargs == "+" else [float(value)]
        if not all(math.isfinite(v) for v in numbers):
            raise OptionError(f"{path}: key {key!r} must be a finite number, got {value}")
        return numbers if action.nargs == "+" else numbers[0]
    return value


def read_config(path, parser):
    """Option values of the JSON file ``path``, checked against ``parser``'s options."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise OptionError(f"--config {path}: file not found") from None
    except OSError as error:
        raise OptionError(f"--config {path}: cannot read it ({error.strerror})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise OptionError(f"{path}:{error.lineno}:{error.colno}: not valid JSON "
                          f"({error.msg})") from None
    if not isinstance(config, dict):
        raise OptionError(f"{path}: a config file must hold one JSON object of option values")
    actions = config_actions(parser)
    values, unknown = {}, []
    for key, value in config.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            unknown.append(key)
            continue
        values[dest] = _checked_value(path, key, actions[dest], value)
    if unknown:
        raise OptionError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(k) for k in unknown)}; valid keys: "
                          f"{', '.join(sorted(actions))}")
    return values


# -- parsing ------------------------------------------------------------------------------
def parse_options(argv=None):
    """Parse ``argv`` (default: ``sys.argv[1:]``) with the config file's values as defaults.

    Raises :class:`OptionError` for any bad flag, config file or combination; the checks that
    need the world size are in :func:`check_world`.
    """
    parser = build_parser()
    known, _ = _config_only_parser().parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_config(known.config, parser))
    options = parser.parse_args(argv)
    check_options(options)
    return options


def _config_only_parser():
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    return parser


def _at_least(options, name, lowest):
    value = getattr(options, name)
    if value is not None and value < lowest:
        raise OptionError(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")


def _check_finite(options):
    """Every number option (flags and config keys) is finite: NaN passes every range check
    (all comparisons with it are false), and a NaN lr or damping would only show up as NaN
    weights."""
    for action in config_actions(build_parser()).values():
        if action.type is not float:
            continue
        value = getattr(options, action.dest)
        values = value if isinstance(value, list) else [value]
        if any(v is not None and not math.isfinite(v) for v in values):
            raise OptionError(f"{action.option_strings[0]} must be a finite number, got "
                              f"{value}")


#: files whose presence in --out means it holds a run
RUN_FILES = ("log.jsonl", "options.json", "latest.json")


def _check_output(options):
    """--out before any work: not a file, writable (or creatable), and not a run's directory
    unless --resume or --overwrite."""
    out = options.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise OptionError(f"--out {out}: is a file, not a directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:  # a probe file says more than os.access (read-only mounts, root)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OptionError(f"--out {out}: cannot write in {existing} ({error.strerror})") \
            from None
    if os.path.isdir(out) and options.resume is None and not options.overwrite:
        found = sorted(name for name in os.listdir(out)
                       if name in RUN_FILES or name.startswith("snapshot_iter_"))
        if found:
            raise OptionError(
                f"--out {out} already holds a run ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}); continue it with --resume {out}, "
                "choose another --out, or pass --overwrite to start a new run there")


def check_options(options):
    """Checks of single options and of combinations that do not need the world size."""
    _check_finite(options)
    _check_output(options)
    for name, lowest in (("batchsize", 1), ("val_batchsize", 1), ("acc_iters", 1),
                         ("global_batch", 0), ("train_size", 0), ("val_size", 0),
                         ("insize", 1), ("val_resize", 1), ("loaderjob", 0), ("seed", 0),
                         ("lr_reference_batch", 0), ("factor_interval", 1),
                         ("inverse_interval", 1), ("stale_warmup", 0), ("max_interval", 1),
                         ("log_interval", 0), ("val_interval", 1), ("snapshot_interval", 0),
                         ("keep_snapshots", 1), ("divergence_patience", 1), ("n_class", 1)):
        _at_least(options, name, lowest)
    if not options.epoch > 0:
        raise OptionError(f"--epoch must be positive, got {options.epoch}")
    for name in ("lr", "damping", "weight_decay", "mixup_alpha", "warmup_epochs",
                 "lr_decay_start"):
        if getattr(options, name) < 0:
            raise OptionError(f"--{name.replace('_', '-')} must be >= 0, got "
                              f"{getattr(options, name)}")
    if options.timeout < 0:
        raise OptionError(f"--timeout must be >= 0 (0: off), got {options.timeout}")
    if options.divergence_factor != 0 and not options.divergence_factor > 1:
        raise OptionError(f"--divergence-factor must be 0 (off) or larger than 1, got "
                          f"{options.divergence_factor}")
    if not 0 <= options.momentum <= 1:
        raise OptionError(f"--momentum must be in [0, 1], got {options.momentum}")
    if not 0 < options.cov_ema_decay <= 1:
        raise OptionError(f"--cov-ema-decay must be in (0, 1], got {options.cov_ema_decay}")
    for name in ("erasing_prob", "warmup_from"):
        if not 0 <= getattr(options, name) <= 1:
            raise OptionError(f"--{name.replace('_', '-')} must be in [0, 1], got "
                              f"{getattr(options, name)}")
    if not 0 <= options.label_smoothing < 1:
        raise OptionError(f"--label-smoothing must be in [0, 1), got {options.label_smoothing}")
    if not 0 < options.crop_scale_min <= 1:
        raise OptionError(f"--crop-scale-min must be in (0, 1], got {options.crop_scale_min}")
    if options.communicator == "nccl" and not options.gpu:
        raise OptionError("--communicator nccl needs --gpu (NCCL moves CuPy arrays)")
    if options.conv_backend == "cudnn" and not options.gpu:
        raise OptionError("--conv-backend cudnn needs --gpu (on the CPU convolutions always "
                          "run as im2col + GEMM)")
    for name in ("comm_alpha", "comm_bandwidth"):
        if not (math.isfinite(getattr(options, name)) and getattr(options, name) > 0):
            raise OptionError(f"--{name.replace('_', '-')} must be a positive number, got "
                              f"{getattr(options, name)}")
    if not options.lr_decay_rate > 0:
        raise OptionError(f"--lr-decay-rate must be positive, got {options.lr_decay_rate}")
    if options.stat_schedule == "fixed" and options.inverse_interval % options.factor_interval:
        raise OptionError(f"--inverse-interval ({options.inverse_interval}) must be a multiple "
                          f"of --factor-interval ({options.factor_interval})")
    if options.lr_schedule == "poly":
        end = decay_end(options)
        if end <= options.lr_decay_start:
            raise OptionError(f"--lr-decay-end ({end:g}) must be after --lr-decay-start "
                              f"({options.lr_decay_start:g})")
        if options.warmup_epochs > options.lr_decay_start:
            raise OptionError(f"--warmup-epochs ({options.warmup_epochs:g}) must end by "
                              f"--lr-decay-start ({options.lr_decay_start:g})")
    _check_data_options(options)


def _check_data_options(options):
    if (options.train is None) != (options.val is None):
        given, missing = ("--train", "--val") if options.val is None else ("--val", "--train")
        raise OptionError(f"{given} needs {missing} too (or neither, for the embedded MNIST)")
    for flag, path in (("--train", options.train), ("--val", options.val),
                       ("--mean", options.mean)):
        if path is not None and not os.path.exists(path):
            raise OptionError(f"{flag} {path}: no such file or directory")
    uses_list = any(path is not None and os.path.isfile(path)
                    for path in (options.train, options.val))
    if uses_list and not os.path.isdir(options.root):
        raise OptionError(f"--root {options.root}: not a directory (the list files' paths "
                          "are relative to it)")
    if options.train is None:
        for flag, value in (("--mean", options.mean), ("--insize", options.insize),
                            ("--val-resize", options.val_resize), ("--n-class", options.n_class)):
            if value is not None:
                raise OptionError(f"{flag} applies to image files; the embedded MNIST is "
                                  "used as it is (28 x 28)")


def decay_end(options):
    """Epoch where the polynomial decay reaches zero."""
    return options.epoch if options.lr_decay_end is None else options.lr_decay_end


def resolve_arch(options, dataset_kind):
    """``--arch`` left to the data (``dataset_kind``: 'mnist' or 'images')."""
    if options.arch is None:
        options.arch = DEFAULT_ARCH[dataset_kind]
    return options


def resolve_image_sizes(options, arch_insize):
    """``--insize`` (default: the architecture's) and ``--val-resize`` for image files."""
    if options.insize is None:
        options.insize = arch_insize
    if options.val_resize is None:
        options.val_resize = round(options.insize * 256 / 224)
    if options.val_resize < options.insize:
        raise OptionError(f"--val-resize ({options.val_resize}) is smaller than --insize "
                          f"({options.insize})")
    return options


def check_world(options, size):
    """Resolve ``--acc-iters`` and check the batch arithmetic for ``size`` workers."""
    per_update = size * options.batchsize
    if options.acc_iters is None:
        if options.global_batch and options.global_batch % per_update:
            raise OptionError(
                f"--global-batch {options.global_batch} is not a multiple of workers x "
                f"batchsize = {size} x {options.batchsize} = {per_update}; choose "
                "--batchsize or the number of workers so that it divides")
        options.acc_iters = options.global_batch // per_update if options.global_batch else 1
    elif options.global_batch and options.global_batch != per_update * options.acc_iters:
        raise OptionError(
            f"--global-batch {options.global_batch} needs workers x batchsize x acc-iters to "
            f"match, got {size} x {options.batchsize} x {options.acc_iters} = "
            f"{per_update * options.acc_iters}")
    return options


def global_batch(options, size):
    return size * options.batchsize * options.acc_iters


def options_dict(options):
    """The options as a JSON-friendly dict, sorted by name (stored in logs and checkpoints)."""
    return dict(sorted(vars(options).items()))
