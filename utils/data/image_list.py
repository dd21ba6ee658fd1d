"""Chainer's list-file layout: one ``<relative path> <integer label>`` per line; reading it
(:func:`read_image_list`, :class:`ImageListDataset`) and writing one from a class-folder tree
(:func:`write_image_list`, ``scripts/make_list.py``)."""
import os

from utils.data.image_file_dataset import ImageFileDataset, check_readable_directory
from utils.data.image_folder import scan_class_folders


def write_image_list(root, list_path, classes_path=None):
    """Scan ``root`` and write the list file (and the class names); return the count."""
    class_names, paths, labels = scan_class_folders(root)
    for path in paths:
        if len(path.split()) != 1:
            raise ValueError(f"{os.path.join(root, path)}: a list file cannot hold a path "
                             "with whitespace (fields are whitespace-separated)")
    with open(list_path, "w", encoding="utf-8") as stream:
        stream.writelines(f"{path} {label}\n" for path, label in zip(paths, labels))
    if classes_path is not None:
        with open(classes_path, "w", encoding="utf-8") as stream:
            stream.writelines(f"{name}\n" for name in class_names)
    return len(paths)


def read_image_list(list_path, n_class=None):
    """Parse a list file and return ``(relative_paths, labels)`` in file order.

    Fields are separated by whitespace, so paths cannot contain spaces (as in Chainer's
    ``LabeledImageDataset``). Blank lines are skipped. Every other line must have exactly
    two fields, a relative path and an integer label in ``[0, n_class)`` (``n_class=None``
    only requires labels >= 0). Each violation raises ``ValueError`` naming file and line.
    """
    if n_class is not None and n_class < 1:
        raise ValueError(f"n_class must be a positive integer, got {n_class}")
    try:
        with open(list_path, "rb") as stream:
            raw_lines = stream.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"image list file not found: {list_path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"image list path is a directory: {list_path}") from None
    paths, labels = [], []
    for line_number, raw in enumerate(raw_lines, start=1):
        where = f"{list_path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{where}: line is not valid UTF-8") from None
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(
                f"{where}: expected '<path> <label>', found {len(fields)} fields: {line.strip()!r}")
        path, label_text = fields
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{where}: label {label_text!r} is not an integer") from None
        if label < 0 or (n_class is not None and label >= n_class):
            allowed = "[0, inf)" if n_class is None else f"[0, {n_class})"
            raise ValueError(f"{where}: label {label} is outside the class range {allowed}")
        if os.path.isabs(path):
            raise ValueError(f"{where}: path {path!r} must be relative to the image root")
        paths.append(path)
        labels.append(label)
    if not paths:
        raise ValueError(f"{list_path}: the list file has no entries")
    return paths, labels


class ImageListDataset(ImageFileDataset):
    """Images named by a list file, paths relative to ``root`` (Chainer's layout).

    ``n_class`` defaults to ``max(label) + 1``; pass it explicitly to have labels checked
    against the model's class count.
    """

    def __init__(self, list_path, root=".", n_class=None):
        check_readable_directory(root, "image root")
        paths, labels = read_image_list(list_path, n_class)
        super().__init__(root, paths, labels, max(labels) + 1 if n_class is None else n_class)
        self.list_path = list_path
