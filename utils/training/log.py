"""``log.jsonl``: one JSON object per log interval, written by rank 0.

Keys of a record (Chainer's LogReport names where there is one):

- ``iteration``, ``epoch`` (fractional), ``elapsed_time`` (wall seconds of the run, training
  and validation, summed over resumed parts);
- ``main/loss``, ``main/accuracy``: means over the interval's training examples, all ranks;
- ``lr``, ``momentum`` and, for K-FAC, ``damping``, ``kfac/intervals`` (min, median and max
  refresh interval over layers) and ``kfac/due_layers`` (mean layers refreshed per step);
- ``images_per_second`` (global), ``seconds/<stage>`` (mean per update on rank 0) and
  ``bytes_sent``, ``bytes_received`` (rank 0's, summed over the interval);
- at validations, ``validation/main/loss``, ``validation/main/accuracy`` (top-1) and
  ``validation/main/accuracy_top5``.
"""
import json
import math
import os

import numpy


class IntervalMeter:
    """Sums over the updates of one log interval; ``state()``/``load()`` for checkpoints."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss = self.hits = self.examples = 0.0
        self.updates = 0
        self.seconds = 0.0
        self.stage_seconds = {}
        self.bytes_sent = self.bytes_received = 0
        self.due_layers = 0
        self.algorithms = {}  # {operation: {variable-count algorithm: calls}}

    def add(self, totals, report, seconds):
        """One update: ``totals`` = (loss x examples, hits, examples) over all ranks."""
        loss, hits, examples = totals
        self.loss += loss
        self.hits += hits
        self.examples += examples
        self.updates += 1
        self.seconds += seconds
        for stage, values in report["stages"].items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + values["seconds"]
            for operation, totals in values.get("collectives", {}).items():
                for name, calls in totals.get("algorithms", {}).items():
                    ran = self.algorithms.setdefault(operation, {})
                    ran[name] = ran.get(name, 0) + calls
        self.bytes_sent += report["bytes_sent"]
        self.bytes_received += report["bytes_received"]
        self.due_layers += report.get("due_layers", 0)

    def summary(self):
        """The training part of a log record."""
        record = {"main/loss": self.loss / self.examples,
                  "main/accuracy": self.hits / self.examples,
                  "images_per_second": self.examples / self.seconds if self.seconds else 0.0,
                  "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}
        if self.algorithms:  # which variable-count algorithm ran, calls per operation
            record["collectives"] = {operation: dict(sorted(ran.items()))
                                     for operation, ran in sorted(self.algorithms.items())}
        for stage, seconds in self.stage_seconds.items():
            record[f"seconds/{stage}"] = seconds / self.updates
        return record

    def state(self):
        return dict(vars(self))

    def load(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def interval_summary(intervals):
    """min / median / max of the per-layer refresh intervals."""
    values = sorted(intervals.values())
    return {"min": values[0], "median": float(numpy.median(values)), "max": values[-1]}


def _finite(value):
    """JSON has no NaN or infinity: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    return value


class LogWriter:
    """Appends records to ``path`` (one JSON line each, flushed at once)."""

    def __init__(self, path):
        self.path = path

    def start(self, kept_records):
        """Begin the file with ``kept_records`` (those before a resumed checkpoint)."""
        with open(self.path, "w", encoding="utf-8") as stream:
            for record in kept_records:
                stream.write(json.dumps(record) + "\n")

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(json.dumps(_finite(record)) + "\n")


def read_log(path):
    """The records of a ``log.jsonl``; a bad line is an error naming ``path:line``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from None
            if not isinstance(record, dict) or "iteration" not in record \
                    or "epoch" not in record:
                raise ValueError(f"{path}:{number}: a record needs 'iteration' and 'epoch'")
            records.append(record)
    return records
