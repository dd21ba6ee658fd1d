"""Redraw the loss and accuracy plots of train_imagenet.py runs, one run or several overlaid.

    python scripts/plot_log.py result/log.jsonl
    python scripts/plot_log.py result/kfac/log.jsonl result/sgd/log.jsonl --labels K-FAC SGD \\
        --out result/compare

Writes ``loss.png`` and ``accuracy.png`` into ``--out`` (default: the directory of the first
log), each against epochs and against wall time, and prints their paths.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.training.log import read_log  # noqa: E402
from utils.training.plots import plot_runs  # noqa: E402


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
    for path in plot_runs(runs, out):
        print(path)


if __name__ == "__main__":
    main()
