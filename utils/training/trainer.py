"""The training loop of ``train_imagenet.py``, with its state in one explicit object.

A :class:`Trainer` is built from what the recipe assembled (options, communicator, model
wrapped in a :class:`~utils.training.step.MeteredClassifier`, a multi-node optimizer, lr
schedules, the two loaders) and holds everything a run changes: the interval meter, the
elapsed time, the last snapshot, the divergence guard and the log.  Per update: the
schedules set lr and momentum from the fractional epoch, the rank's batch is loaded and the
update runs (:class:`~utils.training.step.UpdateStep`); one small all-reduce then sums the
loss and accuracy over the ranks and carries any stop request (SIGTERM/SIGINT) and any
failure of the update, so all ranks agree on when to stop.  At each epoch end every rank
writes its part of a checkpoint (when due), the validation set is evaluated across ranks and
rank 0 appends to ``log.jsonl``.

Nothing good is lost (:mod:`utils.training.checkpoint`): the run stops with exit status 1,
writes nothing and names the last good checkpoint when it diverges (:class:`Divergence`).
"""
import json
import math
import os
import signal
import sys
import time

import numpy

from kfac_mn.fisher.inverse import InversionError
from kfac_mn.links import BatchNormalization
from utils.training import checkpoint, snapshot_reader, time_report
from utils.training.agreement import agreed_messages
from utils.training.data_checks import DataError
from utils.training.log import IntervalMeter, LogWriter, interval_summary, read_log
from utils.training.options import global_batch, options_dict
from utils.training.progress import ProgressBar, format_duration
from utils.training.step import UpdateStep, evaluate
from utils.training.stop_signals import StopSignals

PROG = "train_imagenet.py"
EXIT_DIVERGED = 1
EXIT_DATA = 2
EXIT_SNAPSHOT = 3


class Divergence:
    """The divergence guard: the run has diverged when the loss, the weights or the
    validation figures are not finite, when K-FAC cannot invert a factor even after its
    fallbacks, or when the interval's mean training loss stays above ``factor`` times its
    lowest so far (the first iteration's loss included) for ``patience`` log intervals."""

    def __init__(self, factor, patience):
        self.factor = factor
        self.patience = patience
        self.lowest = math.inf
        self.high = 0  # consecutive log intervals above factor x lowest

    def state(self):
        return {"lowest": self.lowest if math.isfinite(self.lowest) else None,
                "high": self.high}

    def load(self, state):
        self.lowest = math.inf if state["lowest"] is None else state["lowest"]
        self.high = state["high"]

    def first_loss(self, loss):
        self.lowest = min(self.lowest, loss)

    def interval(self, loss):
        """The reason to stop after a log interval of mean loss ``loss``, or None."""
        if self.factor and loss > self.factor * self.lowest:
            self.high += 1
            if self.high >= self.patience:
                return (f"the training loss {loss:.4g} has stayed above {self.factor:g} x its "
                        f"lowest ({self.lowest:.4g}) for {self.high} log intervals "
                        "(--divergence-factor, --divergence-patience)")
        else:
            self.high = 0
        self.lowest = min(self.lowest, loss)
        return None


def non_finite_parameters(model):
    """Paths of the parameters holding NaN or infinity (one check per parameter)."""
    return [path for path, param in model.namedparams()
            if param.data is not None and not bool(param.xp.isfinite(param.data).all())]


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
        self.epoch_totals = numpy.zeros(3)  # loss x examples, hits, examples of this epoch
        self.divergence = Divergence(options.divergence_factor, options.divergence_patience)
        self.elapsed_before = 0.0  # seconds of the runs this one continues
        self.started = None        # time.monotonic() when this run's loop started
        self.last_snapshot = None  # the newest snapshot written or resumed
        self.last_validated = None  # the newest snapshot whose validation passed
        self.log_path = os.path.join(options.out, "log.jsonl")
        self.log = None
        self.progress = None

    # -- state ----------------------------------------------------------------------------
    def resume(self, snapshot_dir, meta):
        """Continue exactly from a snapshot: weights, optimizer, loader, RNGs, meter, time,
        on this run's number of ranks (K-FAC's layers re-assigned when it differs).

        Returns the records of the old ``log.jsonl`` up to the snapshot (rank 0; [] else)."""
        owned = getattr(self.optimizer, "owned_layers", None)
        # layer paths as the serializer writes them, without the leading "/"
        owns = None if owned is None else {path.strip("/") for path in owned()}.__contains__
        state = snapshot_reader.load_snapshot(
            snapshot_dir, meta, self.comm.rank,
            checkpoint.RankSnapshot(self.classifier, self.optimizer), owns)
        self.train_loader.load_state_dict(state["loader"])
        checkpoint.set_rng_states(state["rng"])
        self.meter.load(state["meter"])
        self.epoch_totals = numpy.asarray(state["epoch_totals"], dtype=float)
        self.divergence.load(state["divergence"])
        self.elapsed_before = state["elapsed_time"]
        self.last_snapshot = snapshot_dir
        if checkpoint.passed_validation(snapshot_dir):
            self.last_validated = snapshot_dir
        if meta["size"] != self.comm.size and self.is_root:
            has_bn = any(isinstance(link, BatchNormalization)
                         for link in self.classifier.links())
            sys.stderr.write(
                f"{PROG}: resuming a run of {meta['size']} workers on {self.comm.size}, with "
                f"the same global batch {meta['global_batch']} ({self.comm.size} x "
                f"{self.options.batchsize} x {self.options.acc_iters}); K-FAC's layers are "
                "re-assigned to the workers" + (
                    "; batch normalization computes its statistics over other micro-batches "
                    "now, so the run differs from an uninterrupted one" if has_bn else "")
                + "\n")
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
        """Every rank writes its part of the snapshot at ``iteration``; returns its folder.
        Stops the run (exit 1 or 3) when the state is not finite or the files cannot be
        written; either way the earlier snapshots stay as they were."""
        options, comm = self.options, self.comm
        state = {"iteration": iteration, "loader": self.train_loader.state_dict(),
                 "rng": checkpoint.rng_states(), "meter": self.meter.state(),
                 "epoch_totals": self.epoch_totals.tolist(),
                 "divergence": self.divergence.state(),
                 "elapsed_time": self.elapsed(), "options": options_dict(options)}
        meta = {"iteration": iteration, "epoch": iteration / self.iterations_per_epoch,
                "size": comm.size, "arch": options.arch, "optimizer": options.optimizer,
                "seed": options.seed, "global_batch": global_batch(options, comm.size),
                "train_examples": self.train_examples, "options": options_dict(options)}
        owners = getattr(self.optimizer, "owners", None)
        if owners:  # K-FAC's layer owners, by the serializer's layer paths
            meta["kfac_owners"] = {name.strip("/"): rank for name, rank in owners.items()}
        snapshot = checkpoint.RankSnapshot(self.classifier, self.optimizer, state)
        try:
            self.last_snapshot = checkpoint.write_snapshot(options.out, comm, snapshot, meta,
                                                           options.keep_snapshots)
        except checkpoint.NonFiniteState as error:
            self.diverged(iteration, f"the state to checkpoint is not finite ({error})")
        except checkpoint.SnapshotWriteError as error:
            self.stop_with(EXIT_SNAPSHOT, f"{error}; free some space (or choose another "
                                          f"--out) and continue with --resume "
                                          f"{options.out}")
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
                failure, report = None, None
                try:
                    report = step(x, t)
                except InversionError as error:  # after K-FAC's own fallbacks
                    failure = f"K-FAC could not invert a factor ({error})"
                epoch_end = (iteration + 1) % per_epoch == 0 or iteration + 1 == total
                logged = (iteration + 1) % log_interval == 0 or epoch_end
                if failure is None and logged:
                    bad = non_finite_parameters(self.classifier)
                    if bad:
                        failure = f"the weights are not finite ({', '.join(bad[:3])} ...)"
                local = numpy.append(self.classifier.pop_totals(),
                                     [float(stop.requested), float(failure is not None)])
                totals = comm.allreduce_obj(local)
                iteration += 1
                if totals[4] > 0:
                    self.diverged(iteration, agreed_messages(comm, failure, by_rank=comm.size > 1))
                if not math.isfinite(totals[0]):
                    self.diverged(iteration, f"the training loss is "
                                             f"{totals[0] / max(totals[2], 1.0)}")
                if iteration == 1:
                    self.divergence.first_loss(totals[0] / totals[2])
                self.meter.add(totals[:3], report, time.perf_counter() - start)
                self.epoch_totals += totals[:3]
                meter = self.meter
                self.progress.update(iteration, iteration / per_epoch,
                                     meter.loss / meter.examples, lr,
                                     meter.examples / meter.seconds if meter.seconds else 0.0)
                if logged:
                    self.end_interval(iteration, lr, epoch_end, total)
                if totals[3] > 0:
                    return self.stopped(iteration, stop.signum)
        return 0

    def end_interval(self, iteration, lr, epoch_end, total):
        """Log the interval that ends at ``iteration``; at an epoch end also checkpoint
        (every ``--snapshot-interval`` epochs and at the end) and validate (every
        ``--val-interval`` epochs and at the end)."""
        record = self.log_record(iteration, lr)
        reason = self.divergence.interval(record["main/loss"])
        if reason is not None:
            self.diverged(iteration, reason)
        epoch = math.ceil(iteration / self.iterations_per_epoch)
        saved = None
        if epoch_end and (iteration == total or (self.options.snapshot_interval and epoch
                                                 % self.options.snapshot_interval == 0)):
            saved = self.save(iteration)
        if epoch_end and (epoch % self.options.val_interval == 0 or iteration == total):
            self.validate(record, iteration, saved)
        record["elapsed_time"] = self.elapsed()
        if self.is_root:
            self.log.write(record)
        if epoch_end:
            loss, hits, examples = self.epoch_totals
            self.progress.message(epoch_summary(record, iteration / self.iterations_per_epoch,
                                                loss / examples, hits / examples))
            self.epoch_totals = numpy.zeros(3)

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

    def validate(self, record, iteration, saved):
        """Evaluate; a finite result marks the snapshot ``saved`` (if any) as validated.  An
        unreadable validation image stops the run (exit 2) once the training state is safe
        in a checkpoint; non-finite figures are a divergence."""
        try:
            result = evaluate(self.classifier.predictor, self.val_loader, self.comm)
        except DataError as error:
            if saved is None:
                saved = self.save(iteration)
            self.stop_with(EXIT_DATA, f"validation: {error}; the training state is in "
                                      f"{saved}: fix the file (or pass --skip-corrupt) and "
                                      f"continue with --resume {self.options.out}")
        figures = {"validation/main/loss": result["loss"],
                   "validation/main/accuracy": result["accuracy"],
                   "validation/main/accuracy_top5": result["accuracy_top5"]}
        record.update(figures)
        if not all(math.isfinite(value) for value in figures.values()):
            self.diverged(iteration, f"the validation loss is {result['loss']}")
        if saved is not None:
            if self.is_root:
                checkpoint.mark_validated(saved, figures)
            self.last_validated = saved

    def diverged(self, iteration, reason):
        """Stop at once (exit 1), writing nothing, naming the last good checkpoint."""
        where = f"iteration {iteration} (epoch {iteration / self.iterations_per_epoch:.2f})"
        good = self.last_snapshot
        if good is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = (f"the last good checkpoint is {good}; continue from it with --resume "
                    f"{good}")
            if self.last_validated not in (None, good):
                kept += (f" (the newest that passed validation is {self.last_validated})")
        self.stop_with(EXIT_DIVERGED, f"{reason} at {where}; stopping without writing a "
                                      f"checkpoint: {kept}")

    def stop_with(self, status, message):
        """Every rank leaves with ``status``; rank 0 says why."""
        if self.progress is not None:
            self.progress.close()
        if self.is_root:
            sys.stderr.write(f"{PROG}: {message}\n")
            sys.stderr.flush()
        sys.exit(status)

    def stopped(self, iteration, signum):
        """SIGTERM/SIGINT on any rank: checkpoint at ``iteration`` (unless just written), then
        every rank exits with 128 + the signal's number.

        The ranks first learn which signal reached which rank (a launcher forwards it to all,
        a node's signal may reach some).  Rank 0 says what stays if the launcher's grace period
        ends the job before the checkpoint is complete (Open MPI's mpiexec sends SIGKILL 1 s
        after forwarding SIGTERM unless told otherwise; SLURM after its KillWait): the previous
        snapshot."""
        received = self.comm.gather_obj(signum)
        if received is not None:
            signals = sorted({s for s in received if s})
            ranks = [rank for rank, s in enumerate(received) if s]
            where = "" if len(ranks) == len(received) else \
                f" (on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            received = (signals[0], "/".join(signal.Signals(s).name for s in signals) + where)
        signum, name = self.comm.bcast_obj(received)
        if self.last_snapshot is None or not self.last_snapshot.endswith(
                checkpoint.snapshot_name(iteration)):
            kept = self.last_snapshot or "no snapshot (none written yet)"
            self.progress.message(f"{PROG}: received {name}: writing the checkpoint at "
                                  f"iteration {iteration}; should the launcher end the job "
                                  f"before it is complete, {kept} stays the latest")
            self.save(iteration)
        self.progress.message(f"{PROG}: received {name}: wrote the checkpoint "
                              f"{self.last_snapshot} at iteration {iteration}; continue with "
                              f"--resume {self.options.out}")
        return 128 + signum

    def finish(self):
        """Rank 0: where the time went, the plots and the closing lines naming the outputs."""
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
        table = time_report.format_table(records)
        if table:
            lines.append(table)
        lines.append(f"  log:        {self.log_path}")
        if self.options.plot:
            from utils.training.plots import plot_runs, run_title

            title = run_title(options_dict(self.options), self.comm.size)
            paths = plot_runs([("run", records)], self.options.out, title)
            if table:
                paths.append(time_report.plot_stages([("run", records)], self.options.out,
                                                     title))
            lines.append(f"  plots:      {', '.join(paths)}")
        lines.append(f"  checkpoint: {self.last_snapshot} (continue with --resume "
                     f"{self.options.out})")
        print("\n".join(lines), flush=True)


def epoch_summary(record, epoch, loss, accuracy):
    """One line for the end of an epoch (``epoch`` fractional at the end of a shorter run):
    the training ``loss`` and ``accuracy`` averaged over the whole epoch, and the validation
    figures if measured."""
    label = f"{epoch:g}" if epoch == int(epoch) else f"{epoch:.2f}"
    text = (f"epoch {label} (iteration {record['iteration']}): loss {loss:.4f} "
            f"accuracy {accuracy:.4f}")
    if "validation/main/loss" in record:
        text += (f" | validation loss {record['validation/main/loss']:.4f} top-1 "
                 f"{record['validation/main/accuracy']:.4f} top-5 "
                 f"{record['validation/main/accuracy_top5']:.4f}")
    return text + f" | {format_duration(record['elapsed_time'])}"
