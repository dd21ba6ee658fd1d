"""Per-example transforms on real photos: crop statistics, flips, erasing, normalisation,
reduced JPEG decoding, interpolation."""
import concurrent.futures
import math
import pickle
import re

import cv2
import numpy
import pytest
from PIL import Image
from scipy import stats

from utils.data.image_decoding import decode_rgb, image_to_chw, open_image
from utils.data.normalization import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ChannelNormalizer,
    MeanImageNormalizer,
    load_mean_image,
)
from utils.data.sample_photos import load_photo
from utils.data.transforms import (
    EvalTransform,
    RandomErasing,
    TrainTransform,
    draft_factor,
    sample_crop_box,
)

IMAGENET = ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope="module")
def photo():
    return load_photo("chelsea").resize((300, 200))


def _rngs(count, seed=0):
    return [numpy.random.default_rng([seed, k]) for k in range(count)]


def test_crop_boxes_lie_inside_the_image_within_scale_and_ratio():
    width, height, scale, ratio = 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = numpy.array([sample_crop_box(width, height, scale, ratio, rng)
                         for rng in _rngs(3000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all()
    area = w * h / (width * height)
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1
    aspect = w / h
    assert aspect.min() >= 3 / 4 * 0.98 and aspect.max() <= 4 / 3 * 1.02
    # Sizes spread over the range: small and near-full crops both occur.
    assert area.min() < 0.12 and area.max() > 0.9


def test_crop_area_is_uniform_when_every_draw_fits():
    # Square image, square crops: no draw is rejected, so s ~ U(scale) up to rounding.
    boxes = numpy.array([sample_crop_box(1000, 1000, (0.1, 0.9), (1, 1), rng)
                         for rng in _rngs(2000)])
    area = boxes[:, 2] * boxes[:, 3] / 1e6
    assert stats.kstest(area, stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3


def test_crop_flags_fix_the_box_and_the_fallback_clamps_the_ratio():
    rng = numpy.random.default_rng(0)
    _, _, w, h = sample_crop_box(400, 400, (0.5, 0.5), (2, 2), rng)
    assert (w, h) == (400, 200)
    # A 2:1 to 3:1 box of the whole area never fits a square: centred fallback at 2:1.
    assert sample_crop_box(100, 100, (1, 1), (2, 3), rng) == (0, 25, 100, 50)


def test_train_transform_output_and_determinism(photo):
    transform = TrainTransform(IMAGENET, size=224)
    x = transform(photo, numpy.random.default_rng(5))
    assert x.shape == (3, 224, 224) and x.dtype == numpy.float32
    low = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    high = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert low <= x.min() and x.max() <= high and x.std() > 0.1
    assert numpy.array_equal(x, transform(photo, numpy.random.default_rng(5)))
    assert not numpy.array_equal(x, transform(photo, numpy.random.default_rng(6)))
    out = numpy.empty((3, 224, 224), numpy.float32)
    assert transform(photo, numpy.random.default_rng(5), out) is out
    assert numpy.array_equal(out, x)


def test_flip_frequency_is_about_one_half(photo):
    # Crop = whole image (scale 1, ratio = its aspect), so the output only flips or not.
    transform = TrainTransform(IMAGENET, size=100, scale=(1, 1), ratio=(1.5, 1.5))
    plain = IMAGENET(cv2.resize(numpy.asarray(photo), (100, 100), interpolation=cv2.INTER_LINEAR))
    flipped = plain[:, :, ::-1]
    outputs = [transform(photo, rng) for rng in _rngs(400)]
    n_plain = sum(numpy.allclose(x, plain, atol=1e-5) for x in outputs)
    n_flipped = sum(numpy.allclose(x, flipped, atol=1e-5) for x in outputs)
    assert n_plain + n_flipped == 400
    assert stats.binomtest(n_flipped, 400, 0.5).pvalue > 1e-3
    no_flip = TrainTransform(IMAGENET, size=100, scale=(1, 1), ratio=(1.5, 1.5), flip=False)
    assert all(numpy.allclose(no_flip(photo, rng), plain, atol=1e-5) for rng in _rngs(20))


def test_eval_transform_is_resize_256_then_centre_crop_224(photo):
    x = EvalTransform(IMAGENET)(photo)
    assert x.shape == (3, 224, 224)
    resized = photo.resize((384, 256), Image.Resampling.BILINEAR)  # 300 x 200 -> shorter 256
    expected = IMAGENET(resized.crop((80, 16, 304, 240)))
    assert numpy.abs(x - expected).mean() < 0.02  # one resampling vs two: rounding only
    assert numpy.array_equal(EvalTransform(IMAGENET, resize=None, crop=100)(photo),
                             IMAGENET(photo.crop((100, 50, 200, 150))))
    with pytest.raises(ValueError, match="centre crop 300 is larger than the 300 x 200 image"):
        EvalTransform(IMAGENET, resize=None, crop=300)(photo)


def test_random_erasing_rate_area_and_fill():
    erasing = RandomErasing(probability=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3))
    boxes = []
    for rng in _rngs(1000):
        x = numpy.zeros((3, 64, 64), numpy.float32)
        box = erasing(x, rng)
        if box is None:
            assert not x.any()
            continue
        top, left, h, w = box
        inside = x[:, top:top + h, left:left + w]
        assert numpy.count_nonzero(inside) == inside.size
        assert numpy.count_nonzero(x) == inside.size
        boxes.append((h, w))
    assert stats.binomtest(len(boxes), 1000, 0.5).pvalue > 1e-3
    h, w = numpy.array(boxes).T
    area = h * w / 64 ** 2
    assert area.min() >= 0.02 * 0.7 and area.max() <= 0.4 * 1.2
    assert numpy.log(h / w).min() >= math.log(0.3) - 0.3
    assert RandomErasing(probability=0)(numpy.ones((3, 8, 8)), numpy.random.default_rng()) is None


def test_train_transform_applies_erasing(photo):
    erasing = RandomErasing(probability=1.0)
    with_erasing = TrainTransform(IMAGENET, size=64, erasing=erasing)
    without = TrainTransform(IMAGENET, size=64)
    a = with_erasing(photo, numpy.random.default_rng(3))
    b = without(photo, numpy.random.default_rng(3))
    changed = a != b
    assert 0.02 * 0.7 <= changed.mean() <= 0.4 * 1.2


def test_channel_normalizer_formula(photo):
    x = IMAGENET(photo)
    pixels = numpy.asarray(photo, dtype=numpy.float64) / 255
    expected = ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    numpy.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="normaliser expects 3 channels, the image"):
        IMAGENET(photo.convert("L"))


def test_mean_image_normalizer_uses_the_centre_of_the_mean(photo, tmp_path):
    crop = photo.crop((0, 0, 64, 48))
    mean_image = numpy.random.default_rng(0).uniform(0, 255, (3, 60, 80)).astype(numpy.float32)
    path = tmp_path / "mean.npy"
    numpy.save(path, mean_image)
    normalizer = MeanImageNormalizer(load_mean_image(str(path)))
    expected = (image_to_chw(crop) * 255 - mean_image[:, 6:54, 8:72]) / 255
    numpy.testing.assert_allclose(normalizer(crop), expected, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the 300 x 200 input"):
        normalizer(photo)
    numpy.save(tmp_path / "flat.npy", mean_image[0])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'flat.npy'}: mean image must "
                                                   "have shape (C, H, W)")):
        load_mean_image(str(tmp_path / "flat.npy"))


def test_bad_transform_parameters_are_named():
    with pytest.raises(ValueError, match=re.escape("crop scale must satisfy 0 < min <= max "
                                                   "<= 1, got (0.5, 1.5)")):
        TrainTransform(IMAGENET, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="crop ratio must satisfy"):
        TrainTransform(IMAGENET, ratio=(2, 1))
    with pytest.raises(ValueError, match="crop size must be a positive integer"):
        TrainTransform(IMAGENET, size=0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        EvalTransform(IMAGENET, interpolation="lanczos")
    with pytest.raises(ValueError, match=re.escape("erasing probability must be in [0, 1]")):
        RandomErasing(probability=2)


def test_draft_factor_reduces_only_while_the_region_keeps_the_output_pixels():
    assert [draft_factor(extent, 224) for extent in (100, 447, 448, 895, 896, 1792, 9000)] \
        == [1, 1, 2, 2, 4, 8, 8]


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "chelsea.JPEG"
    load_photo("chelsea").resize((1200, 900), Image.Resampling.BICUBIC).save(path, quality=95)
    return str(path)


def test_train_crop_of_a_large_jpeg_is_decoded_at_reduced_scale(large_jpeg):
    """Crops at least twice the output are decoded by libjpeg at 1/2 to 1/8 scale; the result
    matches averaging the full-resolution crop down (OpenCV's area resize) up to rounding."""
    transform = TrainTransform(IMAGENET, size=64, scale=(0.3, 1.0), flip=False)
    full = decode_rgb(large_jpeg)
    for rng_seed in range(5):
        with open_image(large_jpeg) as image:
            x = transform(image, numpy.random.default_rng(rng_seed))
            reduced_size = image.size
        left, top, width, height = sample_crop_box(1200, 900, (0.3, 1.0), (3 / 4, 4 / 3),
                                                   numpy.random.default_rng(rng_seed))
        factor = draft_factor(min(width, height), 64)
        assert factor >= 4  # the shorter side of the crop is at least 0.3 ** 0.5 * 900 * 3 / 4
        assert reduced_size == (-(-1200 // factor), -(-900 // factor))
        crop = numpy.asarray(full)[top:top + height, left:left + width]
        reference = IMAGENET(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA))
        assert numpy.abs(x - reference).mean() < 0.08  # a box off by 8 pixels: about 0.15
        with open_image(large_jpeg) as image:  # same draws, same pixels
            assert numpy.array_equal(transform(image, numpy.random.default_rng(rng_seed)), x)
    small_crops = TrainTransform(IMAGENET, size=64, scale=(0.001, 0.001))
    with open_image(large_jpeg) as image:
        small_crops(image, numpy.random.default_rng(0))
        assert image.size == (1200, 900)  # a 38-pixel crop: decoded at full scale


def test_eval_resize_of_a_large_jpeg_is_decoded_at_reduced_scale(large_jpeg):
    transform = EvalTransform(IMAGENET, resize=200, crop=160, interpolation="area")
    with open_image(large_jpeg) as image:
        x = transform(image)
        assert image.size == (300, 225)  # 900 >= 4 * 200: a quarter-scale decode
    full = numpy.asarray(decode_rgb(large_jpeg))
    resized = cv2.resize(full, (267, 200), interpolation=cv2.INTER_AREA)
    assert numpy.abs(x - IMAGENET(resized[20:180, 53:213])).mean() < 0.06


def test_bilinear_means_plain_bilinear_when_enlarging(photo):
    """OpenCV's and Pillow's bilinear agree when enlarging (Pillow only widens its filter
    when shrinking), so 'bilinear' is the same interpolation either way. Only the outer
    output pixels differ: the crop is resized on its own (its edge pixels repeated, as
    torchvision's crop-then-resize does), where Pillow reads the pixels beyond the box."""
    transform = TrainTransform(IMAGENET, size=240, scale=(0.25, 0.25), ratio=(1.5, 1.5),
                               flip=False)
    left, top, width, height = sample_crop_box(300, 200, (0.25, 0.25), (1.5, 1.5),
                                               numpy.random.default_rng(0))
    pillow = photo.resize((240, 240), Image.Resampling.BILINEAR,
                          box=(left, top, left + width, top + height))
    x = transform(photo, numpy.random.default_rng(0))
    levels = numpy.abs(x - IMAGENET(pillow)) * 255 * numpy.reshape(IMAGENET_STD, (3, 1, 1))
    assert levels[:, 2:-2, 2:-2].max() <= 1.01 and levels.mean() < 0.5


def test_transforms_are_picklable_and_thread_safe(photo):
    """Scratch arrays are per thread and not pickled: concurrent calls give the same
    examples as sequential ones."""
    transform = pickle.loads(pickle.dumps(TrainTransform(IMAGENET, size=96)))
    expected = [transform(photo, rng) for rng in _rngs(16)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(transform, [photo] * 16, _rngs(16)))
    assert all(numpy.array_equal(a, b) for a, b in zip(results, expected))


def test_normaliser_takes_rgbx_rgb_and_grey_pixels_and_checks_out(photo):
    pixels = numpy.asarray(photo)
    rgbx = numpy.concatenate([pixels, numpy.zeros_like(pixels[:, :, :1])], axis=2)
    expected = IMAGENET(pixels)
    assert numpy.array_equal(IMAGENET(rgbx), expected)
    assert numpy.array_equal(IMAGENET(pixels[:50, :40]), expected[:, :50, :40])
    grey = ChannelNormalizer((0.5,), (0.25,))(pixels[:, :, 1])
    numpy.testing.assert_allclose(grey[0], (pixels[:, :, 1] / 255 - 0.5) / 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match=r"output array must be C-contiguous float32 \(3, 200"):
        IMAGENET(pixels, out=numpy.empty((3, 300, 200), numpy.float32).transpose(0, 2, 1))
    with pytest.raises(ValueError, match="normalisers take uint8 pixel arrays"):
        IMAGENET(pixels.astype(numpy.float32))
