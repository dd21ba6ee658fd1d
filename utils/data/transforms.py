"""Per-example transforms: ``PIL.Image`` -> normalised float32 (C, H, W) array.

A transform is called as ``transform(image, rng, out=None)``; ``rng`` is the example's own
``numpy.random.Generator`` (see ``utils.data.seeding``), so its augmentation depends only on
(seed, epoch, example index); ``out``, when given, is the float32 array to fill (a row
of the batch). ``image`` may be decoded already or only opened (``utils.data.image_decoding.
open_image``): the transforms draw their random parameters from the header size, let a
JPEG decode at a reduced scale where that loses nothing the output keeps (see
``draft_factor``), and then decode it.

Cropping, resizing and flipping run with OpenCV on the 8-bit pixels, viewed without a copy
(``utils.data.pillow_pixels``), into per-thread scratch arrays (``utils.data.scratch``);
conversion to float happens once, at the output size, inside the normaliser. A crop is
resized on its own, its edge pixels repeated where the filter reaches past it
(torchvision's crop-then-resize; Pillow's ``resize(box=...)`` reads the pixels beyond the
box instead, which changes only the outermost output pixels). Interpolations
(``INTERPOLATIONS``): ``'bilinear'`` (the default) and ``'bicubic'`` sample the source at
the output pixel centres with a fixed 2 x 2 or 4 x 4 kernel, so when they shrink an image
they do not antialias (as torchvision's tensor resize with ``antialias=False``; Pillow's
filters widen with the scale instead). ``'area'`` averages the source pixels each output
pixel covers, the antialiased choice for shrinking (e.g. the evaluation resize);
``'nearest'`` copies the source pixel under each centre.
"""
import math

import cv2
import numpy

from utils.data.image_decoding import decode, reduce_while_decoding
from utils.data.pillow_pixels import pixel_view
from utils.data.scratch import ScratchArrays

INTERPOLATIONS = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST_EXACT,
    "area": cv2.INTER_AREA,
}


def _check_interval(name, interval, lowest, highest):
    low, high = interval
    if not lowest < low <= high <= highest:
        raise ValueError(f"{name} must satisfy {lowest} < min <= max <= {highest}, got {interval}")
    return float(low), float(high)


def _check_size(name, size):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")
    return size


def _interpolation(name):
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def draft_factor(source_extent, output_extent):
    """The JPEG decode reduction (1, 2, 4 or 8) for a region ``source_extent`` pixels across
    (its shorter side) that ends up ``output_extent`` pixels across: the largest power of two
    ``k <= 8`` with ``source_extent >= k * output_extent``. The reduced region still has at
    least the output's pixels, so only a downscale (by less than 2 when ``k < 8``) follows;
    there is no reduction unless the region is at least twice the output."""
    factor = 1
    while factor < 8 and source_extent >= 2 * factor * output_extent:
        factor *= 2
    return factor


def sample_crop_box(width, height, scale, ratio, rng, attempts=10):
    """Random-resized crop box ``(left, top, crop_width, crop_height)`` in source pixels.

    The Inception crop (Szegedy et al. 2015, as in torchvision): draw the area fraction
    ``s ~ U(scale)`` and the aspect ratio ``r = w / h`` with ``log r ~ U(log ratio)``, set
    ``w = round(sqrt(s A r))`` and ``h = round(sqrt(s A / r))`` for the image area ``A``, and
    accept if the box fits, placing its top-left corner uniformly (``floor(u (W - w + 1))``).
    Each attempt draws its four uniforms at once. After ``attempts`` misses fall back to the
    largest centred box whose aspect ratio is clamped into ``ratio``.
    """
    area = width * height
    log_low = math.log(ratio[0])
    log_span = math.log(ratio[1]) - log_low
    for _ in range(attempts):
        u_area, u_aspect, u_left, u_top = rng.random(4).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + log_span * u_aspect)
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(u_left * (width - crop_width + 1))
            top = int(u_top * (height - crop_height + 1))
            return left, top, crop_width, crop_height
    aspect = width / height
    if aspect < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (width - crop_width) // 2, (height - crop_height) // 2, crop_width, crop_height


def _reduced_box(box, factor):
    """``(left, top, right, bottom)`` in the pixels of an image decoded at ``1 / factor``
    (source pixel ``x`` lands at ``x / factor``): the edges divided by ``factor`` and rounded,
    so each moves by at most half a decoded pixel and the box stays inside the image."""
    return tuple(round(edge / factor) for edge in box)


class RandomErasing:
    """Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation", Alg. 1).

    With probability ``probability``, draw an area fraction ``s_e ~ U(area)`` of the
    H x W input and an aspect ratio ``r_e`` (log-uniform in ``ratio``, symmetric between
    tall and wide as in torchvision, where the paper draws it uniformly), set
    ``H_e = round(sqrt(s_e H W r_e))``, ``W_e = round(sqrt(s_e H W / r_e))``, and if the
    rectangle fits place it uniformly and fill it with N(0, 1) noise. The input is already
    normalised, so the noise stands for random pixels with the data's mean and spread
    (torchvision's ``value='random'``). Up to ``attempts`` draws; none fitting erases nothing.
    """

    def __init__(self, probability=0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3), attempts=10):
        if not 0 <= probability <= 1:
            raise ValueError(f"erasing probability must be in [0, 1], got {probability}")
        self.probability = float(probability)
        self.area = _check_interval("erasing area", area, 0, 1)
        self.ratio = _check_interval("erasing ratio", ratio, 0, math.inf)
        self.attempts = _check_size("erasing attempts", attempts)

    def __call__(self, x, rng):
        """Erase in place in the float (C, H, W) array ``x``; return ``(top, left, h, w)`` or
        ``None``."""
        if rng.random() >= self.probability:
            return None
        channels, height, width = x.shape
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.attempts):
            target_area = height * width * rng.uniform(*self.area)
            aspect = math.exp(rng.uniform(log_low, log_high))
            box_height = round(math.sqrt(target_area * aspect))
            box_width = round(math.sqrt(target_area / aspect))
            if 0 < box_height < height and 0 < box_width < width:
                top = int(rng.integers(0, height - box_height + 1))
                left = int(rng.integers(0, width - box_width + 1))
                noise = rng.standard_normal((channels, box_height, box_width), numpy.float32)
                x[:, top:top + box_height, left:left + box_width] = noise
                return top, left, box_height, box_width
        return None


class TrainTransform:
    """Training augmentation: random-resized crop to ``size`` x ``size``, horizontal flip
    with probability 1/2, normalisation, then optional random erasing.

    Random draws per example, in this order: the crop (see ``sample_crop_box``), one
    uniform for the flip (when enabled), then the erasing draws. When the crop's shorter
    side is at least twice ``size``, a JPEG not decoded yet is decoded at 1/2, 1/4 or 1/8
    scale (``draft_factor``) and the box is mapped onto the reduced pixels (``_reduced_box``).
    """

    def __init__(self, normalizer, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip=True, erasing=None, interpolation="bilinear"):
        self.normalizer = normalizer
        self.size = _check_size("crop size", size)
        self.scale = _check_interval("crop scale", scale, 0, 1)
        self.ratio = _check_interval("crop ratio", ratio, 0, math.inf)
        self.flip = bool(flip)
        self.erasing = erasing
        self._interpolation = _interpolation(interpolation)
        self._scratch = ScratchArrays()

    def __call__(self, image, rng, out=None):
        left, top, width, height = sample_crop_box(*image.size, self.scale, self.ratio, rng)
        flip = self.flip and rng.random() < 0.5
        box = (left, top, left + width, top + height)
        factor = reduce_while_decoding(image, draft_factor(min(width, height), self.size))
        if factor > 1:
            box = _reduced_box(box, factor)
        pixels = pixel_view(decode(image, self.normalizer.channels))
        left, top, right, bottom = box
        crop = self._scratch.keep("crop", cv2.resize(
            pixels[top:bottom, left:right], (self.size, self.size),
            dst=self._scratch.get("crop"), interpolation=self._interpolation))
        if flip:
            cv2.flip(crop, 1, dst=crop)
        x = self.normalizer(crop, out)
        if self.erasing is not None:
            self.erasing(x, rng)
        return x


class EvalTransform:
    """Evaluation: scale the shorter side to ``resize``, take the centre ``crop`` x ``crop``
    (ImageNet: 256 and 224), normalise. Either step can be ``None``; with both ``None``
    the image is only normalised (MNIST).

    The whole image is resized, then cropped, so every interpolation (``'area'`` included)
    means what it does for a plain resize. A JPEG not decoded yet whose shorter side is at
    least twice ``resize`` is decoded at 1/2, 1/4 or 1/8 scale first (``draft_factor``).
    """

    def __init__(self, normalizer, resize=256, crop=224, interpolation="bilinear"):
        self.normalizer = normalizer
        self.resize = None if resize is None else _check_size("resize", resize)
        self.crop = None if crop is None else _check_size("crop size", crop)
        self._interpolation = _interpolation(interpolation)
        self._scratch = ScratchArrays()

    def __call__(self, image, rng=None, out=None):
        width, height = image.size
        factor = 1.0 if self.resize is None else self.resize / min(width, height)
        scaled_width, scaled_height = round(width * factor), round(height * factor)
        if self.crop is not None and self.crop > min(scaled_width, scaled_height):
            raise ValueError(f"centre crop {self.crop} is larger than the {width} x {height} "
                             f"image scaled to {scaled_width} x {scaled_height}")
        if self.resize is not None:
            reduce_while_decoding(image, draft_factor(min(width, height), self.resize))
        pixels = pixel_view(decode(image, self.normalizer.channels))
        if self.resize is not None:
            pixels = self._scratch.keep("resized", cv2.resize(
                pixels, (scaled_width, scaled_height), dst=self._scratch.get("resized"),
                interpolation=self._interpolation))
        if self.crop is not None:
            left, top = (scaled_width - self.crop) // 2, (scaled_height - self.crop) // 2
            pixels = pixels[top:top + self.crop, left:left + self.crop]
        return self.normalizer(pixels, out)
