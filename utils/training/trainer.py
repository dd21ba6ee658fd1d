"""The training loop of ``train_imagenet.py``, with its state in one explicit object.

A :class:`Trainer` is built from what the recipe assembled (options, communicator, model
wrapped in a :class:`~utils.training.step.MeteredClassifier`, a multi-node optimizer, lr
schedules, the two loaders) and holds everything a run changes: the interval meter, the
elapsed time, the last snapshot and the log.  Per update: the schedules set lr and momentum
from the fractional epoch, the rank's batch is loaded and the update runs
(:class:`~utils.training.step.UpdateStep`); one small all-reduce then sums the loss and
accuracy over the ranks and carries any stop request (SIGTERM/SIGINT), so all ranks agree on
when to stop.  At each epoch end the validation set is evaluated across ranks, rank 0 appends
to ``log.jsonl`` and every rank writes its part of a checkpoint.  A NaN or infinite loss stops
the run at once and keeps the last good checkpoint.
"""
import json
import math
import os
import signal
import sys
import time

import numpy

from utils.training import checkpoint
from utils.training.log import IntervalMeter, LogWriter, interval_summary, read_log
from utils.training.options import global_batch, options_dict
from utils.training.progress import ProgressBar, format_duration
from utils.training.step import UpdateStep, evaluate
from utils.training.stop_signals import StopSignals

PROG = "train_imagenet.py"
EXIT_DIVERGED = 1


class Trainer:
    """One training run on one rank; :meth:`run` trains, :meth:`finish` reports."""

    def __init__(self, options, comm, classifier, optimizer, schedules, train_loader,
                 val_loader, train_examples):
        self.options = options
        self.comm = comm
        self.is_root = comm.rank == 0
        self.classifier = classifier
        self.optimizer = optimizer
        self.schedules = schedules
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.train_examples = train_examples
        self.iterations_per_epoch = train_loader.iterations_per_epoch
        self.meter = IntervalMeter()
        self.elapsed_before = 0.0  # seconds of the runs this one continues
        self.started = None        # time.monotonic() when this run's loop started
        self.last_snapshot = None
        self.log_path = os.path.join(options.out, "log.jsonl")
        self.log = None
        self.progress = None

    # -- state ----------------------------------------------------------------------------
    def resume(self, snapshot_dir):
        """Continue exactly from a snapshot: weights, optimizer, loader, RNGs, meter, time.

        Returns the records of the old ``log.jsonl`` up to the snapshot (rank 0; [] else)."""
        state = checkpoint.load_snapshot(snapshot_dir, self.comm.rank,
                                         checkpoint.RankSnapshot(self.classifier,
                                                                 self.optimizer))
        self.train_loader.load_state_dict(state["loader"])
        checkpoint.set_rng_states(state["rng"])
        self.meter.load(state["meter"])
        self.elapsed_before = state["elapsed_time"]
        self.last_snapshot = snapshot_dir
        old_log = os.path.join(os.path.dirname(os.path.abspath(snapshot_dir)), "log.jsonl")
        if not (self.is_root and os.path.isfile(old_log)):
            return []
        return [record for record in read_log(old_log)
                if record["iteration"] <= state["iteration"]]

    def start_log(self, kept_records=()):
        """Rank 0 writes ``options.json`` and starts ``log.jsonl`` with ``kept_records``."""
        if self.is_root:
            os.makedirs(self.options.out, exist_ok=True)
            checkpoint.atomic_write_text(
                os.path.join(self.options.out, "options.json"),
                json.dumps(options_dict(self.options), indent=1) + "\n")
            self.log = LogWriter(self.log_path)
            self.log.start(list(kept_records))
        self.comm.barrier()

    def elapsed(self):
        """Training seconds so far, the runs this one continues included."""
        if self.started is None:
            return self.elapsed_before
        return self.elapsed_before + time.monotonic() - self.started

    def save(self, iteration):
        """Every rank writes its part of the snapshot at ``iteration``; returns its folder."""
        options, comm = self.options, self.comm
        state = {"iteration": iteration, "loader": self.train_loader.state_dict(),
                 "rng": checkpoint.rng_states(), "meter": self.meter.state(),
                 "elapsed_time": self.elapsed(), "options": options_dict(options)}
        meta = {"iteration": iteration, "epoch": iteration / self.iterations_per_epoch,
                "size": comm.size, "arch": options.arch, "optimizer": options.optimizer,
                "seed": options.seed, "global_batch": global_batch(options, comm.size),
                "train_examples": self.train_examples, "options": options_dict(options)}
        snapshot = checkpoint.RankSnapshot(self.classifier, self.optimizer, state)
        self.last_snapshot = checkpoint.write_snapshot(options.out, comm, snapshot, meta)
        return self.last_snapshot

    # -- the loop -------------------------------------------------------------------------
    def run(self):
        """Train to ``--epoch``; returns the exit status (0 done, 128 + signal if stopped)."""
        options, comm = self.options, self.comm
        per_epoch = self.iterations_per_epoch
        total = max(1, math.ceil(options.epoch * per_epoch - 1e-9))
        log_interval = options.log_interval or max(1, per_epoch // 10)
        iteration = self.train_loader.iteration
        self.started = time.monotonic()
        self.progress = ProgressBar(total, first_iteration=iteration, enabled=options.progress,
                                    quiet=not self.is_root)
        step = UpdateStep(self.optimizer, self.classifier, options.acc_iters)
        if self.is_root:
            self.progress.message(
                f"{PROG}: {options.arch} on {self.train_examples} training examples, "
                f"{options.optimizer} on {comm.size} worker(s), global batch "
                f"{global_batch(options, comm.size)} ({comm.size} x {options.batchsize} x "
                f"{options.acc_iters}), {total} iterations ({per_epoch} per epoch)"
                + (f", resumed at iteration {iteration}" if iteration else ""))
        with StopSignals() as stop:
            while iteration < total:
                start = time.perf_counter()
                lr = self.schedules.apply(self.optimizer, iteration / per_epoch)["lr"]
                x, t = next(self.train_loader)
                report = step(x, t)
                local = numpy.append(self.classifier.pop_totals(), float(stop.requested))
                totals = comm.allreduce_obj(local)
                iteration += 1
                if not math.isfinite(totals[0]):
                    self.diverged(iteration, totals[0] / max(totals[2], 1.0))
                self.meter.add(totals[:3], report, time.perf_counter() - start)
                meter = self.meter
                self.progress.update(iteration, iteration / per_epoch,
                                     meter.loss / meter.examples, lr,
                                     meter.examples / meter.seconds if meter.seconds else 0.0)
                epoch_end = iteration % per_epoch == 0 or iteration == total
                if iteration % log_interval == 0 or epoch_end:
                    self.end_interval(iteration, lr, epoch_end, total)
                if totals[3] > 0:
                    return self.stopped(iteration, stop.signum)
        return 0

    def end_interval(self, iteration, lr, epoch_end, total):
        """Log the interval that ends at ``iteration``; at an epoch end also validate (every
        ``--val-interval`` epochs and at the end), report and checkpoint."""
        record = self.log_record(iteration, lr)
        epoch = math.ceil(iteration / self.iterations_per_epoch)
        if epoch_end and (epoch % self.options.val_interval == 0 or iteration == total):
            self.validate(record)
        record["elapsed_time"] = self.elapsed()
        if self.is_root:
            self.log.write(record)
        if epoch_end:
            self.progress.message(epoch_summary(record, epoch))
            if iteration == total or (self.options.snapshot_interval
                                      and epoch % self.options.snapshot_interval == 0):
                self.save(iteration)

    def log_record(self, iteration, lr):
        """The record of the interval that ends at ``iteration`` (the meter is then reset)."""
        record = {"iteration": iteration, "epoch": iteration / self.iterations_per_epoch,
                  "elapsed_time": self.elapsed(), **self.meter.summary(), "lr": lr,
                  "momentum": self.optimizer.momentum}
        if self.options.optimizer == "kfac":
            record["damping"] = self.optimizer.damping
            record["kfac/intervals"] = interval_summary(self.optimizer.intervals())
            record["kfac/due_layers"] = self.meter.due_layers / self.meter.updates
        self.meter.reset()
        return record

    def validate(self, record):
        result = evaluate(self.classifier.predictor, self.val_loader, self.comm)
        record.update({"validation/main/loss": result["loss"],
                       "validation/main/accuracy": result["accuracy"],
                       "validation/main/accuracy_top5": result["accuracy_top5"]})

    def diverged(self, iteration, loss):
        """A NaN or infinite loss: stop at once, keeping the last good checkpoint."""
        where = f"iteration {iteration} (epoch {iteration / self.iterations_per_epoch:.2f})"
        if self.last_snapshot is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (f"the last good checkpoint is {self.last_snapshot}; continue from it with "
                    f"--resume {self.last_snapshot}")
        self.progress.close()
        if self.is_root:
            sys.stderr.write(f"{PROG}: the training loss is {loss} at {where}; stopping "
                             f"without writing a checkpoint: {kept}\n")
        sys.exit(EXIT_DIVERGED)

    def stopped(self, iteration, signum):
        """SIGTERM/SIGINT: checkpoint at ``iteration`` (unless just written), then exit."""
        if self.last_snapshot is None or not self.last_snapshot.endswith(
                checkpoint.snapshot_name(iteration)):
            self.save(iteration)
        name = signal.Signals(signum).name if signum else "a stop signal on another rank"
        self.progress.message(f"{PROG}: received {name}: wrote the checkpoint "
                              f"{self.last_snapshot} at iteration {iteration}; continue with "
                              f"--resume {self.options.out}")
        return 128 + (signum or signal.SIGTERM)

    def finish(self):
        """Rank 0: plots and the closing lines naming the outputs."""
        self.progress.close()
        if not self.is_root:
            return
        records = read_log(self.log_path)
        lines = [f"{PROG}: finished in {format_duration(self.elapsed())}"]
        validated = [r for r in records if "validation/main/accuracy" in r]
        if validated:
            last = validated[-1]
            lines[0] += (f"; validation top-1 {last['validation/main/accuracy']:.4f}, top-5 "
                         f"{last['validation/main/accuracy_top5']:.4f}, loss "
                         f"{last['validation/main/loss']:.4f} (epoch {last['epoch']:.2f})")
        lines.append(f"  log:        {self.log_path}")
        if self.options.plot:
            from utils.training.plots import plot_runs

            paths = plot_runs([("run", records)], self.options.out)
            lines.append(f"  plots:      {', '.join(paths)}")
        lines.append(f"  checkpoint: {self.last_snapshot} (continue with --resume "
                     f"{self.options.out})")
        print("\n".join(lines), flush=True)


def epoch_summary(record, epoch):
    """One line for the end of an epoch: training and (if measured) validation figures."""
    text = (f"epoch {epoch} (iteration {record['iteration']}): loss {record['main/loss']:.4f} "
            f"accuracy {record['main/accuracy']:.4f}")
    if "validation/main/loss" in record:
        text += (f" | validation loss {record['validation/main/loss']:.4f} top-1 "
                 f"{record['validation/main/accuracy']:.4f} top-5 "
                 f"{record['validation/main/accuracy_top5']:.4f}")
    return text + f" | {format_duration(record['elapsed_time'])}"
