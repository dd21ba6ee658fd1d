"""Small ImageNet-layout trees of real photographs, for tests and the loader benchmark.

The photographs are the ones scikit-image ships in its package (``skimage.data``; no
download). Class ``k`` takes its images from photo ``k`` (cycling through the list), each
a different random crop (60-100% of each side) rescaled so that its longer side is drawn
from ``long_side``, so files differ in content, size and aspect ratio like ImageNet's.
"""
import os

import numpy
from PIL import Image

COLOUR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
                 "immunohistochemistry")
GREY_PHOTOS = ("camera", "coins", "moon", "brick", "grass", "gravel")


def load_photo(name):
    """One scikit-image sample photo as a ``PIL.Image`` (RGB or L)."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def random_view(photo, rng, long_side):
    """A random crop of ``photo`` rescaled so its longer side is ``long_side`` pixels."""
    width, height = photo.size
    crop_width = int(width * rng.uniform(0.6, 1.0))
    crop_height = int(height * rng.uniform(0.6, 1.0))
    left = int(rng.integers(0, width - crop_width + 1))
    top = int(rng.integers(0, height - crop_height + 1))
    factor = long_side / max(crop_width, crop_height)
    size = (max(1, round(crop_width * factor)), max(1, round(crop_height * factor)))
    return photo.resize(size, Image.Resampling.BICUBIC,
                        box=(left, top, left + crop_width, top + crop_height))


def write_photo_tree(root, n_classes, per_class, seed=0, long_side=(64, 96),
                     photos=COLOUR_PHOTOS, extension=".JPEG", quality=90):
    """Write ``root/n<class:08d>/img_<k:04d><extension>`` and return the list of
    ``(relative_path, label)`` in the order the class-folder scan finds them."""
    rng = numpy.random.default_rng(seed)
    entries = []
    for label in range(n_classes):
        photo = load_photo(photos[label % len(photos)])
        folder = f"n{label:08d}"
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for k in range(per_class):
            view = random_view(photo, rng, int(rng.integers(long_side[0], long_side[1] + 1)))
            relative = os.path.join(folder, f"img_{k:04d}{extension}")
            view.save(os.path.join(root, relative), quality=quality)
            entries.append((relative, label))
    return entries
