"""Redraw the loss and accuracy plots of train_imagenet.py runs, one run or several overlaid.

    python scripts/plot_log.py result/log.jsonl
    python scripts/plot_log.py result/kfac/log.jsonl result/sgd/log.jsonl --labels K-FAC SGD \\
        --out result/compare

Writes ``loss.png`` and ``accuracy.png`` into ``--out`` (default: the directory of the first
log), each against epochs and against wall time, and ``stages.png``, the seconds per update of
each stage (one bar per run); prints their paths.  The title names each run's optimizer,
workers and global batch when its ``options.json`` is beside its log.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.training.log import read_log  # noqa: E402
from utils.training.plots import plot_runs, run_title  # noqa: E402
from utils.training.time_report import plot_stages, stage_rows  # noqa: E402


def title_of(log, records):
    """The run's title from the ``options.json`` beside its log, or None."""
    path = os.path.join(os.path.dirname(os.path.abspath(log)), "options.json")
    try:
        with open(path, encoding="utf-8") as stream:
            options = json.load(stream)
        size = options["global_batch"] // (options["batchsize"] * options["acc_iters"]) \
            if options.get("global_batch") else None
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        return None
    return run_title(options, size) if size else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="log.jsonl files of train_imagenet.py runs")
    parser.add_argument("--labels", nargs="+",
                        help="one name per log (default: each log's directory name)")
    parser.add_argument("--out", help="directory for the PNGs (default: the first log's)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.logs):
        parser.error(f"--labels has {len(args.labels)} names for {len(args.logs)} logs")
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(log)))
                             for log in args.logs]
    try:
        runs = [(label, read_log(log)) for label, log in zip(labels, args.logs)]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    out = args.out or os.path.dirname(os.path.abspath(args.logs[0]))
    os.makedirs(out, exist_ok=True)
    titles = [title_of(log, records) for log, (_, records) in zip(args.logs, runs)]
    title = titles[0] if len(runs) == 1 else " vs ".join(
        f"{label}: {t}" for (label, _), t in zip(runs, titles) if t) or None
    paths = plot_runs(runs, out, title)
    if any(stage_rows(records)[0] for _, records in runs):
        paths.append(plot_stages(runs, out, title))
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
