"""PNG plots of training logs: loss and accuracy against epochs and against wall time.

``plot_runs([(label, records), ...], out_dir)`` writes ``loss.png`` and ``accuracy.png``, each
with two panels (x = epoch, x = elapsed wall seconds).  Training curves are lines, validation
points are markers on a dashed line, one colour per run, so several runs (K-FAC vs SGD)
overlay in the same axes.
"""
import os

PLOTS = (
    ("loss.png", "loss", (("main/loss", "train"), ("validation/main/loss", "validation"))),
    ("accuracy.png", "accuracy", (("main/accuracy", "train"),
                                  ("validation/main/accuracy", "validation top-1"))),
)
X_AXES = (("epoch", "epoch"), ("elapsed_time", "wall time (s)"))


def _series(records, x_key, y_key):
    points = [(record[x_key], record[y_key]) for record in records
              if isinstance(record.get(y_key), (int, float)) and x_key in record]
    return [x for x, _ in points], [y for _, y in points]


def run_title(options, size):
    """What a plot's title says of a run: optimizer, workers, global batch, model, data."""
    data = "embedded MNIST" if options["train"] is None else os.path.basename(
        os.path.normpath(options["train"]))
    return (f"{options['optimizer']} on {size} worker(s), global batch "
            f"{size * options['batchsize'] * options['acc_iters']}, {options['arch']}, {data}")


def plot_runs(runs, out_dir, title=None):
    """Draw ``runs`` (``(label, records)`` pairs) into ``out_dir`` under ``title``; returns
    the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for file_name, y_label, series in PLOTS:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for axis, (x_key, x_label) in zip(axes, X_AXES):
            for index, (label, records) in enumerate(runs):
                prefix = f"{label} " if len(runs) > 1 else ""
                for (y_key, kind), style in zip(series, ({"ls": "-"},
                                                         {"ls": "--", "marker": "o"})):
                    x, y = _series(records, x_key, y_key)
                    if x:
                        axis.plot(x, y, color=f"C{index}", label=prefix + kind, ms=3, **style)
            axis.set_xlabel(x_label)
            axis.set_ylabel(y_label)
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend()
        if title:
            figure.suptitle(title)
        if y_label == "loss":
            for axis in axes:
                if axis.lines and all(min(line.get_ydata()) > 0 for line in axis.lines):
                    axis.set_yscale("log")
        figure.tight_layout()
        path = os.path.join(out_dir, file_name)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths
