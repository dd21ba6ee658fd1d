"""Assemble one batch: decode, transform and stack its examples, then batch augmentation.

The same ``BatchBuilder`` runs in the main process (``n_workers=0``) and in every loader
worker, so the batch a rank gets never depends on where it was built.
"""
import numpy

from utils.data.error_notes import add_note
from utils.data.image_decoding import CorruptImageError
from utils.data.seeding import batch_rng, example_rng

#: ``skip_corrupt``: raise, leave the example out (True is 'drop'), use the next readable one
SKIP_MODES = (False, True, "drop", "replace")


class BatchCancelled(Exception):
    """Raised by ``BatchBuilder.build`` when its ``cancelled()`` turns true mid-batch."""


def allocate_float32(shape):
    return numpy.empty(shape, dtype=numpy.float32)


def _describe(dataset, index):
    path = getattr(dataset, "path", None)
    return f"example {index}" + (f" ({path(index)})" if path is not None else "")


class BatchBuilder:
    """Builds the batch of given example indices for one rank.

    ``transform(image, rng, out)`` maps ``dataset.get_image(i)`` to a float32 (C, H, W)
    array of a fixed shape, written into ``out``, the example's row of the batch (once the
    shape is known: the first example built is transformed on its own),
    ``rng = example_rng(seed, epoch, i, repeat)``; the image is closed afterwards; the optional
    ``augmentation(x, labels, rng)`` then sees the whole batch with
    ``rng = batch_rng(seed, epoch, iteration, rank)``. With ``skip_corrupt`` an image that
    cannot be read (missing or undecodable) is reported and left out of its batch (the
    batch is one shorter; ``'drop'`` or True) or replaced by the next readable example
    (``'replace'``: batches keep their size, as data-parallel training assumes).
    """

    def __init__(self, dataset, transform, augmentation=None, seed=0, rank=0,
                 skip_corrupt=False):
        self.dataset = dataset
        self.transform = transform
        self.augmentation = augmentation
        self.seed = seed
        self.rank = rank
        if skip_corrupt not in SKIP_MODES:
            raise ValueError(f"skip_corrupt must be one of {SKIP_MODES}, got {skip_corrupt!r}")
        self.skip_corrupt = "drop" if skip_corrupt is True else skip_corrupt
        self._example_shape = None

    def _transformed(self, index, rng, out=None):
        with self.dataset.get_image(index) as image:  # closes a lazily opened file
            try:
                example = self.transform(image, rng, out)
            except Exception as error:
                add_note(error, f"while transforming {_describe(self.dataset, index)}")
                raise
        if self._example_shape is not None and example.shape != self._example_shape:
            raise ValueError(
                f"{_describe(self.dataset, index)} transformed to shape {example.shape}, other "
                f"examples to {self._example_shape}: the transform must give one fixed shape")
        self._example_shape = example.shape
        if out is not None and example is not out:
            out[...] = example  # from a transform that returns a new array instead
        return example

    def example_shape(self):
        """Shape of a transformed example (transforms example 0 if none was built yet)."""
        if self._example_shape is None:
            self._transformed(0, example_rng(self.seed, 0, 0, 0))
        return self._example_shape

    def _readable(self, index, repeat, epoch, x, row, length, allocate, skipped):
        """Transform example ``index`` into row ``row`` of the batch ``x`` (allocated for
        ``length`` examples from the first example when ``x`` is None); returns ``(index
        used or None when skipped, x)``.  With ``skip_corrupt='replace'`` an unreadable
        example is replaced by the next readable one (``index + 1, index + 2, ...``)."""
        attempts = len(self.dataset) if self.skip_corrupt == "replace" else 1
        source = index
        for _ in range(attempts):
            rng = example_rng(self.seed, epoch, source, repeat)
            try:
                if x is None:
                    example = self._transformed(source, rng)
                    x = allocate((length,) + example.shape)
                    x[row] = example
                else:
                    self._transformed(source, rng, out=x[row])
                return source, x
            except (CorruptImageError, FileNotFoundError) as error:
                if not self.skip_corrupt:
                    raise
                skipped.append((source, str(error)))
                source = (source + 1) % len(self.dataset)
        if self.skip_corrupt == "replace":
            raise CorruptImageError(f"no example of the data set can be read (the last: "
                                    f"{skipped[-1][1]})")
        return None, x

    def build(self, epoch, iteration, indices, repeats, allocate=allocate_float32,
              cancelled=None):
        """Return ``(x, targets, skipped)`` for the examples ``indices`` read for the
        ``repeats``-th time this epoch. ``x`` lives in the float32 array ``allocate(shape)``;
        ``skipped`` lists ``(index, message)`` of corrupt images left out. ``cancelled()``,
        when given, is asked before each example; true raises ``BatchCancelled`` (a loader
        shutting down does not wait for a batch nobody will read)."""
        x, labels, skipped = None, [], []
        if self._example_shape is not None:
            x = allocate((len(indices),) + self._example_shape)
        for index, repeat in zip(indices.tolist(), repeats.tolist()):
            if cancelled is not None and cancelled():
                raise BatchCancelled(f"batch {iteration} of epoch {epoch} cancelled")
            source, x = self._readable(index, repeat, epoch, x, len(labels), len(indices),
                                       allocate, skipped)
            if source is not None:
                labels.append(self.dataset.get_label(source))
        if x is None:
            x = allocate((0,) + self.example_shape())
        x = x[:len(labels)]
        labels = numpy.asarray(labels, dtype=numpy.int32)
        if self.augmentation is None:
            return x, labels, skipped
        mixed, targets = self.augmentation(x, labels, batch_rng(self.seed, epoch, iteration,
                                                                self.rank))
        if mixed is not x:
            x[...] = mixed
        return x, targets, skipped
