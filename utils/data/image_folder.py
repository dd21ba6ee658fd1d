"""The class-folder layout: ``root/<class name>/<image file>`` (ImageNet's ``train/<wnid>/``)."""
import os

from utils.data.image_file_dataset import ImageFileDataset, check_readable_directory

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _is_image_file(entry):
    return (entry.is_file() and not entry.name.startswith(".")
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)


def scan_class_folders(root):
    """Return ``(class_names, relative_paths, labels)`` for a class-folder tree.

    Class folders are the non-hidden sub-directories of ``root``; the label of a class is
    the position of its folder name in sorted order, so the same tree always gives the
    same labels. Within a class, files with an image extension (case-insensitive) are
    taken in sorted name order; other files and nested folders are ignored. An empty tree
    or an empty class folder is an error naming the folder.
    """
    check_readable_directory(root, "image root")
    with os.scandir(root) as entries:
        class_names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise ValueError(
            f"no class folders under image root {root} (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        check_readable_directory(folder, "class folder")
        with os.scandir(folder) as entries:
            files = sorted(e.name for e in entries if _is_image_file(e))
        if not files:
            raise ValueError(
                f"class folder {folder} contains no image files "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(os.path.join(name, f) for f in files)
        labels.extend([label] * len(files))
    return class_names, paths, labels


class ImageFolderDataset(ImageFileDataset):
    """Images in ``root/<class>/`` folders; ``class_names[label]`` is the folder name."""

    def __init__(self, root):
        class_names, paths, labels = scan_class_folders(root)
        super().__init__(root, paths, labels, len(class_names))
        self.class_names = tuple(class_names)
