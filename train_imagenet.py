"""Train a ResNet with distributed K-FAC (or momentum SGD) under mpiexec: the reproduction harness.

    mpiexec -n 2 python train_imagenet.py        # embedded MNIST, resnet_mnist, K-FAC
    mpiexec -n 128 python train_imagenet.py --config configs/kfac_4k.json \\
        --train /data/imagenet/train --val /data/imagenet/val
    python train_imagenet.py --help               # every option

Every rank holds the whole model and trains on its shard of each global batch
(``workers x batchsize x acc-iters`` examples per update).  Per update: the schedules set lr
and momentum from the fractional epoch, the rank's batch is loaded and the update runs
(:mod:`utils.training.step`); one small all-reduce then sums the loss and accuracy over the
ranks and carries any stop request (SIGTERM/SIGINT), so all ranks agree on when to stop.
At each epoch end the validation set is evaluated across ranks, rank 0 appends to
``log.jsonl`` and every rank writes its part of a checkpoint.  A NaN or infinite loss stops
the run at once and keeps the last good checkpoint.  Rank 0 shows a progress bar and, at the
end, writes ``loss.png`` and ``accuracy.png``.

Exit status: 0 done, 1 diverged (NaN/inf loss), 2 bad options or data (before any work),
128 + signal number after a checkpoint on SIGTERM/SIGINT.
"""
import json
import math
import os
import signal
import sys
import time

from utils.training.blas_threads import share_cores_between_ranks

share_cores_between_ranks()  # before NumPy starts its BLAS threads

import numpy  # noqa: E402

from kfac_mn import backend  # noqa: E402
from kfac_mn.communicators import create_communicator  # noqa: E402
from models import archs  # noqa: E402
from utils.training import checkpoint  # noqa: E402
from utils.training.datasets import build_datasets, build_loaders, dataset_kind  # noqa: E402
from utils.training.log import (  # noqa: E402
    IntervalMeter,
    LogWriter,
    interval_summary,
    read_log,
)
from utils.training.optimizer import build_optimizer, build_schedules  # noqa: E402
from utils.training.options import (  # noqa: E402
    OptionError,
    check_world,
    global_batch,
    options_dict,
    parse_options,
    resolve_arch,
    resolve_image_sizes,
)
from utils.training.progress import ProgressBar, format_duration  # noqa: E402
from utils.training.step import MeteredClassifier, UpdateStep, evaluate  # noqa: E402
from utils.training.stop_signals import StopSignals  # noqa: E402

EXIT_DIVERGED, EXIT_USAGE = 1, 2
PROG = "train_imagenet.py"


def fail_usage(message, rank):
    """Report a usage error once (rank 0) and leave with status 2 on every rank."""
    if rank == 0:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    sys.exit(EXIT_USAGE)


def _message(error):
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


class Run:
    """The state of one training run on one rank (built by :func:`prepare`)."""

    def __init__(self, options, comm):
        self.options = options
        self.comm = comm
        self.is_root = comm.rank == 0
        self.resume_dir = None
        self.resume_meta = None


def prepare(run):
    """Everything that can fail on bad input, before any training: datasets, the resume
    checkpoint's compatibility, the model.  Raises OptionError/ValueError/OSError."""
    options, comm = run.options, run.comm
    check_world(options, comm.size)
    kind = dataset_kind(options)
    resolve_arch(options, kind)
    if options.gpu and not backend.gpu_available():
        raise OptionError("--gpu needs CuPy and a visible CUDA device")
    run.train_set, run.val_set = build_datasets(options)
    if options.resume is not None:
        run.resume_dir = checkpoint.find_snapshot(options.resume)
        run.resume_meta = checkpoint.read_meta(run.resume_dir)
        checkpoint.check_resumable(run.resume_dir, run.resume_meta, options, comm.size,
                                   comm.rank)
        for key, flag, mine in (("seed", "--seed", options.seed),
                                ("global_batch", "--global-batch",
                                 global_batch(options, comm.size)),
                                ("train_examples", "--train/--train-size",
                                 len(run.train_set))):
            if run.resume_meta[key] != mine:
                raise ValueError(f"--resume {run.resume_dir}: the checkpoint has {key} "
                                 f"{run.resume_meta[key]}, this run {mine} ({flag}); the "
                                 "data order could not continue")
    numpy.random.seed(options.seed)  # the initializers draw from NumPy's global RNG
    run.model = archs[options.arch](n_class=run.train_set.n_class,
                                    in_channels=run.train_set.channels)
    if kind == "images":
        resolve_image_sizes(options, run.model.insize)


def agree_on_errors(comm, error):
    """Every rank learns whether any rank failed; returns the message to report (or None)."""
    errors = comm.gather_obj(None if error is None else _message(error))
    combined = None
    if comm.rank == 0 and any(e is not None for e in errors):
        distinct = sorted({e for e in errors if e is not None})
        combined = distinct[0] if len(distinct) == 1 else "; ".join(
            f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None)
    return comm.bcast_obj(combined)


def build(run):
    """Model on its device, optimizer, schedules, loaders, log; then the resumed state."""
    options, comm = run.options, run.comm
    run.classifier = MeteredClassifier(run.model)
    if options.gpu:
        backend.cupy.cuda.Device(comm.intra_rank).use()
        run.classifier.to_gpu()
    run.optimizer = build_optimizer(options, comm, run.classifier)
    run.schedules = build_schedules(options, comm.size)
    run.train_loader, run.val_loader = build_loaders(options, run.train_set, run.val_set,
                                                     comm.rank, comm.size)
    run.meter = IntervalMeter()
    run.elapsed_before = 0.0
    run.last_snapshot = None
    run.log_path = os.path.join(options.out, "log.jsonl")
    kept_records = []
    if run.resume_dir is not None:
        state = checkpoint.load_snapshot(run.resume_dir, comm.rank,
                                         checkpoint.RankSnapshot(run.classifier, run.optimizer))
        run.train_loader.load_state_dict(state["loader"])
        checkpoint.set_rng_states(state["rng"])
        run.meter.load(state["meter"])
        run.elapsed_before = state["elapsed_time"]
        run.last_snapshot = run.resume_dir
        old_log = os.path.join(os.path.dirname(os.path.abspath(run.resume_dir)), "log.jsonl")
        if run.is_root and os.path.isfile(old_log):
            kept_records = [record for record in read_log(old_log)
                            if record["iteration"] <= state["iteration"]]
    if run.is_root:
        os.makedirs(options.out, exist_ok=True)
        checkpoint.atomic_write_text(os.path.join(options.out, "options.json"),
                                     json.dumps(options_dict(options), indent=1) + "\n")
        run.log = LogWriter(run.log_path)
        run.log.start(kept_records)
    comm.barrier()


def save(run, iteration):
    """Every rank writes its part of the snapshot at ``iteration``; returns its directory."""
    options, comm = run.options, run.comm
    state = {"iteration": iteration, "loader": run.train_loader.state_dict(),
             "rng": checkpoint.rng_states(), "meter": run.meter.state(),
             "elapsed_time": run.elapsed(), "options": options_dict(options)}
    meta = {"iteration": iteration, "epoch": iteration / run.iterations_per_epoch,
            "size": comm.size, "arch": options.arch, "optimizer": options.optimizer,
            "seed": options.seed, "global_batch": global_batch(options, comm.size),
            "train_examples": len(run.train_set), "options": options_dict(options)}
    snapshot = checkpoint.RankSnapshot(run.classifier, run.optimizer, state)
    run.last_snapshot = checkpoint.write_snapshot(options.out, comm, snapshot, meta)
    return run.last_snapshot


def log_record(run, iteration, lr):
    """The record of the interval that ends at ``iteration`` (the meter is then reset)."""
    record = {"iteration": iteration, "epoch": iteration / run.iterations_per_epoch,
              "elapsed_time": run.elapsed(), **run.meter.summary(), "lr": lr,
              "momentum": run.optimizer.momentum}
    if run.options.optimizer == "kfac":
        record["damping"] = run.optimizer.damping
        record["kfac/intervals"] = interval_summary(run.optimizer.intervals())
        record["kfac/due_layers"] = run.meter.due_layers / run.meter.updates
    run.meter.reset()
    return record


def validate(run, record):
    result = evaluate(run.model, run.val_loader, run.comm)
    record.update({"validation/main/loss": result["loss"],
                   "validation/main/accuracy": result["accuracy"],
                   "validation/main/accuracy_top5": result["accuracy_top5"]})


def epoch_summary(record, epoch):
    text = (f"epoch {epoch} (iteration {record['iteration']}): loss {record['main/loss']:.4f} "
            f"accuracy {record['main/accuracy']:.4f}")
    if "validation/main/loss" in record:
        text += (f" | validation loss {record['validation/main/loss']:.4f} top-1 "
                 f"{record['validation/main/accuracy']:.4f} top-5 "
                 f"{record['validation/main/accuracy_top5']:.4f}")
    return text + f" | {format_duration(record['elapsed_time'])}"


def diverged(run, iteration, loss):
    where = f"iteration {iteration} (epoch {iteration / run.iterations_per_epoch:.2f})"
    if run.last_snapshot is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = (f"the last good checkpoint is {run.last_snapshot}; continue from it with "
                f"--resume {run.last_snapshot}")
    run.progress.close()
    if run.is_root:
        sys.stderr.write(f"{PROG}: the training loss is {loss} at {where}; stopping without "
                         f"writing a checkpoint: {kept}\n")
    sys.exit(EXIT_DIVERGED)


def train(run):
    """The training loop; returns the exit status."""
    options, comm = run.options, run.comm
    run.iterations_per_epoch = run.train_loader.iterations_per_epoch
    total = max(1, math.ceil(options.epoch * run.iterations_per_epoch - 1e-9))
    log_interval = options.log_interval or max(1, run.iterations_per_epoch // 10)
    iteration = run.train_loader.iteration
    started = time.monotonic()
    run.elapsed = lambda: run.elapsed_before + time.monotonic() - started
    run.progress = ProgressBar(total, first_iteration=iteration, enabled=options.progress,
                               quiet=not run.is_root)
    step = UpdateStep(run.optimizer, run.classifier, options.acc_iters)
    if run.is_root:
        run.progress.message(
            f"{PROG}: {options.arch} on {len(run.train_set)} training examples, "
            f"{options.optimizer} on {comm.size} worker(s), global batch "
            f"{global_batch(options, comm.size)} ({comm.size} x {options.batchsize} x "
            f"{options.acc_iters}), {total} iterations ({run.iterations_per_epoch} per epoch)"
            + (f", resumed at iteration {iteration}" if iteration else ""))
    with StopSignals() as stop:
        while iteration < total:
            start = time.perf_counter()
            lr = run.schedules.apply(run.optimizer, iteration / run.iterations_per_epoch)["lr"]
            x, t = next(run.train_loader)
            report = step(x, t)
            local = numpy.append(run.classifier.pop_totals(), float(stop.requested))
            totals = comm.allreduce_obj(local)
            iteration += 1
            if not math.isfinite(totals[0]):
                diverged(run, iteration, totals[0] / max(totals[2], 1.0))
            run.meter.add(totals[:3], report, time.perf_counter() - start)
            meter = run.meter
            run.progress.update(iteration, iteration / run.iterations_per_epoch,
                                meter.loss / meter.examples, lr,
                                meter.examples / meter.seconds if meter.seconds else 0.0)
            epoch_end = iteration % run.iterations_per_epoch == 0 or iteration == total
            if iteration % log_interval == 0 or epoch_end:
                record = log_record(run, iteration, lr)
                epoch = math.ceil(iteration / run.iterations_per_epoch)
                if epoch_end and (epoch % options.val_interval == 0 or iteration == total):
                    validate(run, record)
                record["elapsed_time"] = run.elapsed()
                if run.is_root:
                    run.log.write(record)
                if epoch_end:
                    run.progress.message(epoch_summary(record, epoch))
                    if iteration == total or (options.snapshot_interval
                                              and epoch % options.snapshot_interval == 0):
                        save(run, iteration)
            if totals[3] > 0:
                return stopped(run, iteration, stop.signum)
    return 0


def stopped(run, iteration, signum):
    """SIGTERM/SIGINT: checkpoint at ``iteration`` (unless just written), then exit."""
    if run.last_snapshot is None or not run.last_snapshot.endswith(
            checkpoint.snapshot_name(iteration)):
        save(run, iteration)
    name = signal.Signals(signum).name if signum else "a stop signal on another rank"
    run.progress.message(f"{PROG}: received {name}: wrote the checkpoint {run.last_snapshot} "
                         f"at iteration {iteration}; continue with --resume "
                         f"{run.options.out}")
    return 128 + (signum or signal.SIGTERM)


def finish(run):
    """Rank 0: plots and the closing lines naming the outputs."""
    run.progress.close()
    if not run.is_root:
        return
    records = read_log(run.log_path)
    lines = [f"{PROG}: finished in {format_duration(run.elapsed())}"]
    validated = [r for r in records if "validation/main/accuracy" in r]
    if validated:
        last = validated[-1]
        lines[0] += (f"; validation top-1 {last['validation/main/accuracy']:.4f}, top-5 "
                     f"{last['validation/main/accuracy_top5']:.4f}, loss "
                     f"{last['validation/main/loss']:.4f} (epoch {last['epoch']:.2f})")
    lines.append(f"  log:        {run.log_path}")
    if run.options.plot:
        from utils.training.plots import plot_runs

        paths = plot_runs([("run", records)], run.options.out)
        lines.append(f"  plots:      {', '.join(paths)}")
    lines.append(f"  checkpoint: {run.last_snapshot} (continue with --resume "
                 f"{run.options.out})")
    print("\n".join(lines), flush=True)


def main(argv=None):
    # imported here, not at the top: loader workers started by forkserver import this module
    # and must not initialise MPI
    from mpi4py import MPI

    world_rank = MPI.COMM_WORLD.Get_rank()
    try:
        options = parse_options(argv)
        comm = create_communicator(options.communicator)
    except OptionError as error:
        fail_usage(str(error), world_rank)
    except RuntimeError as error:  # what the communicator needs is missing (CuPy, NCCL, GPU)
        fail_usage(f"--communicator {options.communicator}: {error}", world_rank)
    run = Run(options, comm)
    error = None
    try:
        prepare(run)
    except (OptionError, ValueError, OSError, KeyError) as caught:
        error = caught
    message = agree_on_errors(comm, error)
    if message is not None:
        fail_usage(message, comm.rank)
    build(run)
    try:
        status = train(run)
        if status == 0:
            finish(run)
    finally:
        run.train_loader.close()
        run.val_loader.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
