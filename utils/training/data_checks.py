"""Checks of the image files before any training, shared out among the ranks.

- Every listed file must exist (``os.stat``: cheap even for ImageNet's 1.3 million files).
- ``--verify-images`` also decodes every image once, with a pool of threads per rank (Pillow
  releases the GIL while decoding) and a progress bar on rank 0.
- Labels: a list file without ``--n-class`` declares ``max(label) + 1`` classes, and then
  every one of them must have a training example: a stray label 4000 among 4 classes would
  otherwise build a 4001-class model.

Rank ``r`` checks examples ``r, r + P, ...`` of each set; rank 0 gathers every problem and
reports them all at once.  Without ``--skip-corrupt`` they are an error (nothing has been
trained yet); with it they are listed as the files the run will go past.
"""
import concurrent.futures
import os
import sys

import numpy

from utils.data.image_decoding import CorruptImageError, decode_rgb

SHOWN = 20  # problems listed in a message; the rest are counted


class DataError(ValueError):
    """Files of a data set are missing or undecodable (the message lists them)."""


def _files(dataset):
    """``path(i)`` of an image-file data set, or None (the embedded MNIST has no files)."""
    return getattr(dataset, "path", None)


def missing_files(dataset, indices):
    """Paths of ``dataset``'s examples ``indices`` that are not readable files."""
    path = _files(dataset)
    return [] if path is None else [path(i) for i in indices if not os.path.isfile(path(i))]


def _decode_problem(path):
    try:
        decode_rgb(path)
    except (CorruptImageError, OSError) as error:
        return str(error)
    return None


def undecodable_files(dataset, indices, threads, progress=None):
    """``[message]`` for the examples ``indices`` whose file does not decode (or is
    missing); ``progress(n)`` is called as images are done."""
    path = _files(dataset)
    if path is None:
        return []
    problems = []
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for problem in pool.map(_decode_problem, (path(i) for i in indices), chunksize=64):
            if problem is not None:
                problems.append(problem)
            if progress is not None:
                progress(1)
    return problems


class DecodeProgress:
    """``progress(n)``: a line on stderr at every tenth of ``total`` images decoded (one line
    each, readable in a redirected log)."""

    def __init__(self, total, stream=None):
        self.total = max(1, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self._shown = 0

    def __call__(self, n):
        self.done += n
        tenths = min(10, self.done * 10 // self.total)
        if tenths > self._shown:
            self._shown = tenths
            self.stream.write(f"verifying images: {self.done} of about {self.total} "
                              f"(rank 0's share) decoded\n")
            self.stream.flush()


def check_labels(options, train_set):
    """A list file's labels must leave no class of ``range(n_class)`` without an example,
    unless ``--n-class`` declares the count."""
    if options.n_class is not None or not hasattr(train_set, "labels"):
        return
    present = numpy.unique(numpy.asarray(train_set.labels))
    if len(present) != train_set.n_class:
        absent = sorted(set(range(train_set.n_class)) - set(present.tolist()))
        raise DataError(
            f"--train {options.train}: the largest label is {train_set.n_class - 1}, so the "
            f"model would have {train_set.n_class} classes, but {len(absent)} of them have no "
            f"example (labels {_listed(absent, 8)}); fix the labels, or pass --n-class N if "
            "the data really has N classes")


def _listed(items, shown=SHOWN):
    items = list(items)
    text = ", ".join(str(item) for item in items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")


def check_files(options, train_set, val_set, comm, threads=1, bar=None):
    """Every rank checks its share of both sets; returns the problems (the same on every
    rank), each ``"--train: <message>"``; raises :class:`DataError` listing them all unless
    ``--skip-corrupt``.  ``bar(n)``: progress of this rank's decoding (rank 0 shows it)."""
    mine = []
    for flag, dataset in (("--train", train_set), ("--val", val_set)):
        indices = range(comm.rank, len(dataset), comm.size)
        if options.verify_images:
            problems = undecodable_files(dataset, indices, threads, bar)
        else:
            problems = [f"image file not found: {path}"
                        for path in missing_files(dataset, indices)]
        mine += [f"{flag}: {problem}" for problem in problems]
    gathered = comm.gather_obj(mine)
    problems = comm.bcast_obj(None if gathered is None else sorted(sum(gathered, [])))
    if problems and not options.skip_corrupt:
        raise DataError(f"{len(problems)} image file{'s' if len(problems) > 1 else ''} "
                        f"cannot be read: {_listed(problems)}; fix or remove "
                        f"{'them' if len(problems) > 1 else 'it'} (list files: the lines), or "
                        "pass --skip-corrupt to go past them")
    return problems
