"""Pixel normalisation: 8-bit pixels -> float32 (C, H, W) network input.

Two conventions:

- per channel, ``x = (p / 255 - mean_c) / std_c`` with mean and std given on [0, 1]
  (the usual ImageNet statistics, or MNIST's);
- Chainer's mean image, ``x = (p - M[:, y, x]) / 255`` with ``M`` a (C, H, W) image in
  pixel units (Chainer's ``compute_mean.py`` output), centre-cropped to the input size.

A normaliser is called as ``normalizer(pixels, out=None)``: ``pixels`` is a uint8 (H, W) or
(H, W, K) array, or an L / RGB ``PIL.Image``; the first C = ``normalizer.channels`` channels
are used (the transforms hand over Pillow's 4-byte RGBX pixels, whose fourth byte is
padding). The pixels are split into contiguous planes once (OpenCV), and each output plane
is then written in one pass straight into ``out`` (a C-contiguous float32 (C, H, W) array,
e.g. a row of the batch), so the HWC -> CHW change costs one pass over 8-bit data.
"""
import cv2
import numpy
from PIL import Image

from utils.data.pillow_pixels import pixel_view
from utils.data.scratch import ScratchArrays

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Over the 60,000 MNIST training images on [0, 1] (tests/test_mnist.py recomputes them).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _planes(pixels, channels, scratch):
    """The first ``channels`` channels of ``pixels`` as uint8 (H, W) planes (split into
    ``scratch`` arrays)."""
    if isinstance(pixels, Image.Image):
        pixels = pixel_view(pixels)
    if not isinstance(pixels, numpy.ndarray) or pixels.dtype != numpy.uint8:
        raise ValueError("normalisers take uint8 pixel arrays or 8-bit images, got "
                         f"{getattr(pixels, 'dtype', type(pixels).__name__)}")
    if pixels.ndim == 2:
        planes = [pixels]
    elif pixels.ndim == 3:
        planes = (scratch.keep("planes", cv2.split(pixels, scratch.get("planes")))
                  if pixels.shape[2] > 1 else [pixels[:, :, 0]])
    else:
        raise ValueError(f"pixels must be (H, W) or (H, W, channels), got shape {pixels.shape}")
    if len(planes) < channels:
        raise ValueError(f"normaliser expects {channels} channels, the image has {len(planes)}")
    return planes[:channels]


def _output(out, shape):
    if out is None:
        return numpy.empty(shape, dtype=numpy.float32)
    if out.shape != shape or out.dtype != numpy.float32 or not out.flags.c_contiguous:
        raise ValueError(f"output array must be C-contiguous float32 {shape}, got "
                         f"{out.dtype} {out.shape}")
    return out


class ChannelNormalizer:
    """``x_c = (p / 255 - mean_c) / std_c`` through a lookup table: the 256 possible values
    of each channel are computed once (float64, rounded to float32), and each output plane
    is one table lookup per pixel (``cv2.LUT``), exactly the formula's float32 rounding."""

    def __init__(self, mean, std):
        mean = numpy.asarray(mean, dtype=numpy.float64).reshape(-1)
        std = numpy.asarray(std, dtype=numpy.float64).reshape(-1)
        if mean.shape != std.shape or mean.size == 0:
            raise ValueError(f"mean and std need one value per channel, got {mean} and {std}")
        if not numpy.all(std > 0):
            raise ValueError(f"std must be positive, got {std}")
        self.channels = mean.size
        levels = numpy.arange(256, dtype=numpy.float64) / 255
        self._tables = [((levels - m) / s).astype(numpy.float32).reshape(1, 256)
                        for m, s in zip(mean, std)]
        self._scratch = ScratchArrays()

    def __call__(self, pixels, out=None):
        planes = _planes(pixels, self.channels, self._scratch)
        out = _output(out, (self.channels,) + planes[0].shape)
        for plane, table, row in zip(planes, self._tables, out):
            cv2.LUT(plane, table, dst=row)
        return out


class MeanImageNormalizer:
    """Chainer style ``x = (p - M) / 255`` with the centre of a (C, H, W) mean image ``M``;
    called like ``ChannelNormalizer``."""

    def __init__(self, mean_image):
        mean_image = numpy.asarray(mean_image, dtype=numpy.float32)
        if mean_image.ndim != 3:
            raise ValueError(f"mean image must be (C, H, W), got shape {mean_image.shape}")
        self.channels = mean_image.shape[0]
        self._mean_image = mean_image
        self._scratch = ScratchArrays()

    def __call__(self, pixels, out=None):
        planes = _planes(pixels, self.channels, self._scratch)
        height, width = planes[0].shape
        _, mean_height, mean_width = self._mean_image.shape
        if height > mean_height or width > mean_width:
            raise ValueError(f"mean image {self._mean_image.shape} is smaller than the "
                             f"{width} x {height} input it should normalise")
        out = _output(out, (self.channels, height, width))
        top, left = (mean_height - height) // 2, (mean_width - width) // 2
        mean = self._mean_image[:, top:top + height, left:left + width]
        for plane, mean_plane, row in zip(planes, mean, out):
            numpy.subtract(plane, mean_plane, out=row, dtype=numpy.float32)
        out *= numpy.float32(1 / 255)
        return out


def load_mean_image(path):
    """Read a Chainer mean image (``.npy``, float (C, H, W) in pixel units) for
    ``MeanImageNormalizer``."""
    try:
        mean_image = numpy.load(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"mean image file not found: {path}") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a NumPy .npy array ({error})") from None
    if mean_image.ndim != 3 or mean_image.shape[0] not in (1, 3):
        raise ValueError(f"{path}: mean image must have shape (C, H, W) with C = 1 or 3, "
                         f"got {mean_image.shape}")
    return mean_image.astype(numpy.float32)
