"""Zero-copy NumPy views of the pixels of a decoded 8-bit ``PIL.Image`` (modes L and RGB).

``numpy.asarray(image)`` copies: Pillow's array interface goes through ``tobytes()``, which
for RGB also repacks Pillow's 4-byte pixels into 3 bytes; for ImageNet-size photos that copy
costs about a quarter of the JPEG decode itself. Pillow >= 11.2 instead exports its pixel
storage through the Arrow C data interface (``image.__arrow_c_array__()``): an L image as
``width * height`` uint8 values, an RGB image as ``width * height`` fixed-size lists of four
uint8, Pillow's RGBX layout (the fourth byte is padding). ``pixel_view`` reads the data
pointer out of the exported ``ArrowArray`` struct (a stable C ABI,
https://arrow.apache.org/docs/format/CDataInterface.html) and wraps it in a read-only array
that owns the export; the export in turn holds Pillow's storage, so the view stays valid
after the image object is gone.

Where there is no such export (Pillow < 11.2, or an image stored in several memory blocks,
i.e. larger than Pillow's block size, 16 MiB by default) it falls back to ``numpy.asarray``,
a copy with three bytes per RGB pixel.
"""
import ctypes
import functools

import numpy
from PIL import Image

# Arrow format strings of the exports we read: uint8, and a fixed-size list of 4 uint8.
_UINT8, _FOUR_UINT8 = b"C", b"+w:4"
# The C structs, read as arrays of 64-bit words (pointers included; x86-64 and arm64).
# ArrowSchema: format, name, metadata, flags, n_children, children, dictionary, release,
# private_data. ArrowArray: length, null_count, offset, n_buffers, n_children, buffers,
# children, dictionary, release, private_data.
_SCHEMA_WORDS, _ARRAY_WORDS = ctypes.c_int64 * 9, ctypes.c_int64 * 10
_FORMAT, _N_CHILDREN, _CHILDREN = 0, 4, 5
_LENGTH, _NULL_COUNT, _OFFSET, _N_BUFFERS, _ARRAY_N_CHILDREN, _BUFFERS, _ARRAY_CHILDREN = range(7)

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _pointer_at(address):
    return ctypes.c_void_p.from_address(address).value


def _format(schema):
    return ctypes.string_at(schema[_FORMAT])


class _ExportedPixels:
    """Owns the two Arrow capsules (their destructors release the export) and presents the
    pixel buffer through the NumPy array interface."""

    def __init__(self, capsules, address, shape):
        self._capsules = capsules
        self.__array_interface__ = {"shape": shape, "typestr": "|u1",
                                    "data": (address, True), "version": 3}


def _uint8_values(array, length):
    """Address of the values of an Arrow uint8 array of ``length`` values at offset 0
    without nulls, else None (the type was checked by ``_exports_read_layout``)."""
    if (array[_LENGTH] != length or array[_OFFSET] != 0 or array[_NULL_COUNT] != 0
            or array[_N_BUFFERS] != 2):
        return None
    return _pointer_at(array[_BUFFERS] + 8)  # buffers[1]: buffers[0] is the validity bitmap


@functools.lru_cache(maxsize=None)
def _exports_read_layout(mode):
    """Whether this Pillow exports ``mode`` images in the layout ``pixel_view`` reads
    (checked once per mode, on the schema of a 1 x 1 image; 64-bit pointers only)."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    schema_capsule, _ = Image.new(mode, (1, 1)).__arrow_c_array__()
    schema = _SCHEMA_WORDS.from_address(_capsule_pointer(schema_capsule, b"arrow_schema"))
    if mode == "L":
        return _format(schema) == _UINT8 and schema[_N_CHILDREN] == 0
    return (_format(schema) == _FOUR_UINT8 and schema[_N_CHILDREN] == 1
            and _format(_SCHEMA_WORDS.from_address(_pointer_at(schema[_CHILDREN]))) == _UINT8)


def _exported_address(image, shape):
    """(address of the pixel bytes or None, the capsules that keep them alive)."""
    try:
        capsules = image.__arrow_c_array__()
    except ValueError:  # rows not in one block
        return None, None
    array = _ARRAY_WORDS.from_address(_capsule_pointer(capsules[1], b"arrow_array"))
    n_pixels = shape[0] * shape[1]
    if len(shape) == 2:
        return _uint8_values(array, n_pixels), capsules
    if (array[_ARRAY_N_CHILDREN] != 1 or array[_LENGTH] != n_pixels or array[_OFFSET] != 0
            or array[_NULL_COUNT] != 0):
        return None, capsules
    child = _ARRAY_WORDS.from_address(_pointer_at(array[_ARRAY_CHILDREN]))
    return _uint8_values(child, 4 * n_pixels), capsules


def pixel_view(image):
    """Read-only uint8 pixels of a decoded L or RGB image without copying where Pillow
    allows: (H, W) for L; (H, W, 4) RGBX for RGB (channel 3 is padding), or (H, W, 3) from
    the copying fallback. Callers use the first three channels of an RGB view."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"pixel views take 8-bit L or RGB images, got mode {image.mode}")
    width, height = image.size
    if width and height and hasattr(image, "__arrow_c_array__") and _exports_read_layout(
            image.mode):
        shape = (height, width) if image.mode == "L" else (height, width, 4)
        image.load()
        address, capsules = _exported_address(image, shape)
        if address:
            return numpy.asarray(_ExportedPixels(capsules, address, shape))
    return numpy.asarray(image)
