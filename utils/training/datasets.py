"""The datasets, transforms and per-rank loaders of a training run, built from its options.

- No ``--train``/``--val``: the embedded MNIST (60,000 / 10,000), normalised with the MNIST
  mean and std, no augmentation (flipping or cropping digits changes what they are).
- ``--train``/``--val`` a class-folder tree or a list file (paths relative to ``--root``):
  training images get the random-resized crop to ``--insize``, flips and random erasing;
  validation images the resize to ``--val-resize`` and centre crop.  Both are normalised with
  the ImageNet mean/std, or ``--mean``'s Chainer mean image.

Each training batch of a rank holds ``batchsize x acc_iters`` examples: exactly the examples
(and augmentation) of one update, which the update splits into its micro-batches.
"""
import os

from utils.data.batch_augmentation import BatchAugmentation
from utils.data.dataset_index import checked_index
from utils.data.image_folder import ImageFolderDataset
from utils.data.image_list import ImageListDataset
from utils.data.loader import ShardedLoader
from utils.data.mnist import MNISTDataset
from utils.data.normalization import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    ChannelNormalizer,
    MeanImageNormalizer,
    load_mean_image,
)
from utils.data.transforms import EvalTransform, RandomErasing, TrainTransform
from utils.training.data_checks import check_labels


class FirstExamples:
    """The first ``n`` examples of ``dataset`` (``--train-size``, ``--val-size``)."""

    def __init__(self, dataset, n):
        if n > len(dataset):
            raise ValueError(f"asked for the first {n} examples of a dataset of "
                             f"{len(dataset)}")
        self.dataset = dataset
        self.n = n
        self.n_class = dataset.n_class
        self.channels = dataset.channels

    def __len__(self):
        return self.n

    def _index(self, i):
        return checked_index(i, self.n, f"the first {self.n} examples")

    def get_image(self, i):
        return self.dataset.get_image(self._index(i))

    def get_label(self, i):
        return self.dataset.get_label(self._index(i))

    @property
    def path(self):
        """The wrapped data set's ``path(i)`` (AttributeError when it has none, as MNIST)."""
        return self.dataset.path


def dataset_kind(options):
    return "mnist" if options.train is None else "images"


def _image_dataset(path, root, n_class=None):
    if os.path.isdir(path):
        return ImageFolderDataset(path)
    return ImageListDataset(path, root=root, n_class=n_class)


def build_datasets(options):
    """``(train, val)`` datasets, cut to ``--train-size``/``--val-size``; errors name the path."""
    if options.train is None:
        train, val = MNISTDataset("train"), MNISTDataset("test")
    else:
        train = _image_dataset(options.train, options.root, options.n_class)
        if options.n_class is not None and train.n_class != options.n_class:
            raise ValueError(f"--n-class {options.n_class}: --train {options.train} has "
                             f"{train.n_class} class folders")
        check_labels(options, train)
        val = _image_dataset(options.val, options.root, n_class=train.n_class)
        train_classes = getattr(train, "class_names", None)
        val_classes = getattr(val, "class_names", None)
        if train_classes is not None and val_classes is not None \
                and train_classes != val_classes:
            raise ValueError(f"--train {options.train} and --val {options.val} have different "
                             f"class folders ({len(train_classes)} and {len(val_classes)} "
                             "classes, or other names)")
        if val.n_class > train.n_class:
            raise ValueError(f"--val {options.val} has labels up to {val.n_class - 1} but "
                             f"--train {options.train} only {train.n_class} classes")
    for flag, dataset, n in (("--train-size", train, options.train_size),
                             ("--val-size", val, options.val_size)):
        if n > len(dataset):
            raise ValueError(f"{flag} {n} is larger than the data set ({len(dataset)} "
                             "examples)")
    if options.train_size:
        train = FirstExamples(train, options.train_size)
    if options.val_size:
        val = FirstExamples(val, options.val_size)
    return train, val


def build_transforms(options, channels):
    """``(train_transform, val_transform)`` for the data of ``options``."""
    if options.train is None:
        same = EvalTransform(ChannelNormalizer(MNIST_MEAN, MNIST_STD), resize=None, crop=None)
        return same, same
    if options.mean is not None:
        normalizer = MeanImageNormalizer(load_mean_image(options.mean))
        if normalizer.channels != channels:
            raise ValueError(f"--mean {options.mean} has {normalizer.channels} channels, the "
                             f"images {channels}")
    else:
        normalizer = ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD)
    erasing = RandomErasing(options.erasing_prob) if options.erasing_prob > 0 else None
    train = TrainTransform(normalizer, size=options.insize,
                           scale=(options.crop_scale_min, 1.0), flip=options.flip,
                           erasing=erasing)
    val = EvalTransform(normalizer, resize=options.val_resize, crop=options.insize)
    return train, val


def build_loaders(options, train, val, rank, size):
    """``(train_loader, val_loader)`` of this rank.

    The training loader repeats forever and pads the last batch of an epoch; the validation
    loader reads every example once ('partial': sums over examples, not batch means).  With
    ``--skip-corrupt`` an unreadable training image is replaced by the next readable example
    (every rank's batch keeps its size) and an unreadable validation image is left out.
    """
    train_transform, val_transform = build_transforms(options, train.channels)
    augmentation = None
    if options.mixup_alpha > 0 or options.label_smoothing > 0:
        augmentation = BatchAugmentation(train.n_class, options.mixup_alpha,
                                         options.label_smoothing)
    # loader workers must not be forked from a process that has initialised MPI
    start_method = "forkserver" if options.loaderjob else None
    train_loader = ShardedLoader(
        train, options.batchsize * options.acc_iters, transform=train_transform, rank=rank,
        size=size, seed=options.seed, shuffle=True, last_batch="pad", repeat=True,
        n_workers=options.loaderjob, augmentation=augmentation,
        skip_corrupt="replace" if options.skip_corrupt else False, start_method=start_method)
    val_loader = ShardedLoader(
        val, options.val_batchsize, transform=val_transform, rank=rank, size=size,
        seed=options.seed, shuffle=False, last_batch="partial", repeat=False,
        n_workers=options.loaderjob, skip_corrupt="drop" if options.skip_corrupt else False,
        start_method=start_method)
    return train_loader, val_loader
