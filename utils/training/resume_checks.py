"""What a resumed run must share with the run it continues.

A checkpoint continues exactly only under the same mathematics: every option that changes
the model, the data, the loss, the optimizer or the schedule must be the one it was written
with.  The options listed in :data:`MAY_DIFFER` change none of it (where the data live, how
often to log or to checkpoint, the network model of ``--collectives auto``, ...), and three
more are allowed under a condition:

- the world size and the split of the global batch (``--batchsize``, ``--acc-iters``): the
  global batch ``workers x batchsize x acc-iters`` must stay the checkpoint's; without
  ``--acc-iters`` and ``--global-batch`` it is derived (:func:`keep_global_batch`).  Batch
  normalization then sees other micro-batches, everything else the same examples;
- ``--epoch``, as long as the learning-rate schedule stays the same (a polynomial decay
  that ends at ``--epoch`` needs ``--lr-decay-end`` to be extended);
- ``--assignment``, since K-FAC's layer owners are re-assigned on resume anyway.
"""
from utils.training.options import OptionError, decay_end

#: options that do not change what is computed
MAY_DIFFER = frozenset({
    "config", "train", "val", "root", "val_size", "val_batchsize", "val_resize", "loaderjob",
    "skip_corrupt", "verify_images", "gpu", "communicator", "collectives", "comm_alpha",
    "comm_bandwidth", "batchsize", "acc_iters", "global_batch", "epoch", "lr_decay_end",
    "assignment", "out", "overwrite", "resume", "log_interval", "val_interval",
    "snapshot_interval", "keep_snapshots", "progress", "plot", "timeout",
    "divergence_factor", "divergence_patience", "conv_backend", "batched_inversion"})


def flag(name):
    return "--" + name.replace("_", "-")


def keep_global_batch(options, meta, size):
    """Before :func:`~utils.training.options.check_world`: a resumed run without
    ``--acc-iters`` and ``--global-batch`` keeps the checkpoint's global batch."""
    if options.acc_iters is None and not options.global_batch:
        options.global_batch = meta["global_batch"]
        per_update = size * options.batchsize
        if options.global_batch % per_update:
            raise OptionError(
                f"--resume {options.resume}: the checkpoint's global batch "
                f"{options.global_batch} is not a multiple of workers x batchsize = {size} x "
                f"{options.batchsize}; choose --batchsize (or the number of workers) so that "
                "it divides")
    return options


def check_resumable(snapshot_dir, meta, options, size, train_examples):
    """Raise OptionError listing every difference that stops ``options`` (resolved, on
    ``size`` workers) from continuing the checkpoint ``snapshot_dir`` exactly."""
    saved = meta["options"]
    mine = vars(options)
    problems = [f"{flag(name)} {_show(saved[name])} (this run: {_show(mine.get(name))})"
                for name in sorted(saved)
                if name not in MAY_DIFFER and saved[name] != mine.get(name)]
    problems += [f"{flag(name)} (new option; this run: {_show(mine[name])})"
                 for name in sorted(mine) if name not in saved and name not in MAY_DIFFER]
    if saved["lr_schedule"] == "poly" and options.lr_schedule == "poly":
        before = saved["epoch"] if saved["lr_decay_end"] is None else saved["lr_decay_end"]
        if before != decay_end(options):
            problems.append(f"the polynomial lr decay ends at epoch {before:g} (this run: "
                            f"{decay_end(options):g}; to train longer on the same schedule "
                            f"pass --lr-decay-end {before:g})")
    batch = size * options.batchsize * options.acc_iters
    if batch != meta["global_batch"]:
        problems.append(f"global batch {meta['global_batch']} = {meta['size']} x "
                        f"{saved['batchsize']} x {saved['acc_iters']} (this run: {size} x "
                        f"{options.batchsize} x {options.acc_iters} = {batch}; leave out "
                        "--acc-iters and --global-batch to derive it)")
    if meta["train_examples"] != train_examples:
        problems.append(f"{meta['train_examples']} training examples (this run: "
                        f"{train_examples}; --train/--train-size)")
    if problems:
        raise OptionError(f"--resume {snapshot_dir}: the checkpoint was written with "
                          + "; ".join(problems) + ". These change what is computed, so the "
                          "run could not continue exactly: give the same values (or start a "
                          "new run with another --out)")


def _show(value):
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)
