"""Base class of the datasets whose examples are image files under a root directory."""
import os

import numpy

from utils.data.dataset_index import checked_index
from utils.data.image_decoding import decode_rgb, image_to_chw, open_image


def check_readable_directory(path, what):
    """Raise a clear error unless ``path`` is a directory we can list and read."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} does not exist: {path}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} is not a directory: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"{what} is not readable (permission denied): {path}")


class ImageFileDataset:
    """Labelled image files ``root/<relative path>``, read lazily one at a time.

    Chainer-style: ``len(ds)`` and ``ds[i] -> (image, label)`` with the image a float32
    (3, H, W) array in [0, 1] and the label an int32. The loader instead calls
    ``get_image(i)`` (the file opened lazily, ``utils.data.image_decoding.open_image``: header
    read, pixels not decoded) and ``get_label(i)`` and lets a transform decode and convert,
    so that it can choose a reduced JPEG decode and crop and resize 8-bit pixels.

    Relative paths are kept as one NumPy byte-string array rather than a list of Python
    strings: forked loader workers then share those pages instead of copying them as
    reference counts are touched.
    """

    channels = 3

    def __init__(self, root, relative_paths, labels, n_class):
        self.root = root
        self._paths = numpy.array([p.encode("utf-8") for p in relative_paths], dtype=bytes)
        self._labels = numpy.asarray(labels, dtype=numpy.int32)
        self.n_class = n_class

    def __len__(self):
        return len(self._labels)

    def _index(self, i):
        return checked_index(i, len(self), f"a dataset of {len(self)} images")

    def path(self, i):
        """Full path of example ``i``."""
        return os.path.join(self.root, self._paths[self._index(i)].decode("utf-8"))

    def get_label(self, i):
        return int(self._labels[self._index(i)])

    def get_image(self, i):
        """Example ``i`` opened lazily; decode it with ``utils.data.image_decoding.decode`` (or a
        transform), and close it with ``with`` when it may stay undecoded."""
        return open_image(self.path(i))

    def __getitem__(self, i):
        return image_to_chw(decode_rgb(self.path(i))), numpy.int32(self.get_label(i))

    @property
    def labels(self):
        """All labels, int32, in example order (read-only view)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view
