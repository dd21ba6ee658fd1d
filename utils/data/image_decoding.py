"""Open and decode image files to 8-bit ``PIL.Image`` pixels, with errors that name the file.

Decoding happens in two steps so that a transform can look at the header first:
``open_image(path)`` reads the header only (size and mode are known, no pixels are decoded),
``reduce_while_decoding`` may then ask a JPEG for a 1/2, 1/4 or 1/8 scale decode, and
``decode`` decodes. ``decode_rgb(path)`` does all of it at full scale.

Any format Pillow reads is accepted (JPEG, PNG, ...). For three-channel use, colour modes
are mapped to RGB: greyscale (``L``, ``LA``, ``1``) is replicated to three channels, CMYK and
YCbCr are converted by Pillow, palette images go through RGBA so that transparency is
dropped cleanly, and 16-bit greyscale (``I;16*``, ``I``, as 16-bit PNGs decode) keeps its 8
most significant bits. For one-channel use, greyscale modes map to ``L`` the same way and a
colour image is an error. An image already in the wanted mode is returned without a copy.
"""
import struct

import numpy
from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GREY_MODES = ("L", "LA", "1") + _SIXTEEN_BIT_MODES

# What Pillow raises for bytes it cannot decode (truncated data, unknown format, bad headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class CorruptImageError(OSError):
    """The file exists and is readable but Pillow cannot decode it as an image."""


def open_image(path):
    """Open ``path`` lazily (``PIL.Image.open``: header parsed, pixels not decoded yet).

    Raises ``FileNotFoundError`` / ``PermissionError`` / ``IsADirectoryError`` naming the path
    when the file cannot be opened, and ``CorruptImageError`` naming the path when its header
    is not an image's. Pillow closes the file once the pixels are decoded; use the image as a
    context manager (``with open_image(path) as image:``) to close it in any case.
    """
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"image path is a directory, not a file: {path}") from None
    except PermissionError:
        raise PermissionError(f"image file is not readable (permission denied): {path}") from None
    except _DECODE_ERRORS as error:
        raise CorruptImageError(f"corrupt image {path}: {error}") from None


def reduce_while_decoding(image, factor):
    """Ask a not yet decoded JPEG to decode at ``1 / factor`` of its size (libjpeg's DCT
    scaling, which averages like an area filter; ``factor`` 2, 4 or 8), and return the
    factor applied: ``factor``, or 1 (nothing changes) for other formats, for images already
    decoded and for ``factor`` 1. Source pixel ``x`` maps to ``x / factor`` afterwards; the
    image's ``size`` becomes the reduced one (rounded up)."""
    if factor not in (1, 2, 4, 8):
        raise ValueError(f"JPEG decoding reduces by 1, 2, 4 or 8, got {factor!r}")
    width, height = image.size
    if factor == 1 or width < factor or height < factor:
        return 1
    request = image.draft(None, (width // factor, height // factor))
    if request is None:
        return 1
    _, (_, _, scaled_width, _) = request  # the source's extent in decoded pixels
    return round(width / scaled_width)


def decode(image, channels=3):
    """Decode ``image`` (a no-op when already decoded) and return it as 8-bit RGB
    (``channels=3``) or L (``channels=1``). Undecodable bytes raise ``CorruptImageError``
    naming the file."""
    if channels not in (1, 3):
        raise ValueError(f"images decode to 1 (L) or 3 (RGB) channels, not {channels!r}")
    try:
        image.load()
    except _DECODE_ERRORS as error:
        name = getattr(image, "filename", "") or "(in memory)"
        raise CorruptImageError(f"corrupt image {name}: {error}") from None
    return _to_rgb(image) if channels == 3 else _to_grey(image)


def decode_rgb(path):
    """Read ``path`` and return its pixels as a decoded RGB ``PIL.Image`` (errors as in
    ``open_image`` and ``decode``)."""
    with open_image(path) as image:
        return decode(image, 3)


def _sixteen_to_eight_bits(image):
    high_byte = numpy.asarray(image).astype(numpy.uint32) >> 8
    return Image.fromarray(numpy.minimum(high_byte, 255).astype(numpy.uint8))


def _to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_to_eight_bits(image)
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return image.convert("RGB")


def _to_grey(image):
    if image.mode == "L":
        return image
    if image.mode not in _GREY_MODES:
        name = getattr(image, "filename", "") or "(in memory)"
        raise ValueError(f"image {name} has colour mode {image.mode}; one-channel input "
                         "needs a greyscale image")
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_eight_bits(image)
    return image.convert("L")


def image_to_chw(image):
    """``PIL.Image`` -> float32 array (C, H, W) with values in [0, 1] (C = 1 for greyscale)."""
    pixels = numpy.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return numpy.multiply(pixels.transpose(2, 0, 1), numpy.float32(1 / 255), dtype=numpy.float32)
