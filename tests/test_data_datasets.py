"""The two ImageNet layouts (class folders, Chainer list file) on trees of real photos."""
import os
import re

import numpy
import pytest

from utils.data.image_folder import ImageFolderDataset, scan_class_folders
from utils.data.image_list import ImageListDataset, read_image_list, write_image_list
from utils.data.sample_photos import GREY_PHOTOS, write_photo_tree

N_CLASSES, PER_CLASS = 3, 5


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train"))
    entries = write_photo_tree(root, N_CLASSES, PER_CLASS, seed=1, long_side=(48, 80))
    return root, entries


@pytest.fixture(scope="module")
def list_file(tree, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lists") / "train.txt")
    write_image_list(tree[0], path)
    return path


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_folder_dataset_reads_real_photos_with_sorted_class_labels(tree):
    root, entries = tree
    dataset = ImageFolderDataset(root)
    assert len(dataset) == N_CLASSES * PER_CLASS
    assert dataset.class_names == tuple(f"n{k:08d}" for k in range(N_CLASSES))
    assert dataset.n_class == N_CLASSES
    assert [dataset.get_label(i) for i in range(len(dataset))] == [e[1] for e in entries]
    for i in (0, 7, len(dataset) - 1):
        image, label = dataset[i]
        assert image.dtype == numpy.float32 and image.ndim == 3 and image.shape[0] == 3
        assert 48 <= max(image.shape[1:]) <= 80
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.02
        assert label.dtype == numpy.int32 and label == entries[i][1]
        assert dataset.path(i) == os.path.join(root, entries[i][0])


def test_list_dataset_matches_the_folder_dataset(tree, list_file):
    root, _ = tree
    folder = ImageFolderDataset(root)
    listed = ImageListDataset(list_file, root=root)
    assert len(listed) == len(folder) and listed.n_class == N_CLASSES
    assert numpy.array_equal(listed.labels, folder.labels)
    for i in range(0, len(folder), 4):
        assert listed.path(i) == folder.path(i)
        assert numpy.array_equal(listed[i][0], folder[i][0])


def test_list_file_rejects_a_line_with_the_wrong_number_of_fields(tmp_path):
    path = _write(tmp_path / "bad.txt", "a.jpg 0\n\nb.jpg 1 extra\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: expected '<path> <label>', "
                                                   "found 3 fields")):
        read_image_list(path)
    path = _write(tmp_path / "one.txt", "a.jpg\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected")):
        read_image_list(path)


def test_list_file_rejects_a_non_integer_label(tmp_path):
    path = _write(tmp_path / "bad.txt", "a.jpg 0\nb.jpg 1.5\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: label '1.5' is not an integer")):
        read_image_list(path)


def test_list_file_rejects_labels_outside_the_class_range(tmp_path):
    path = _write(tmp_path / "bad.txt", "a.jpg 0\nb.jpg 1000\n")
    with pytest.raises(ValueError, match=re.escape(
            f"{path}:2: label 1000 is outside the class range [0, 1000)")):
        read_image_list(path, n_class=1000)
    path = _write(tmp_path / "negative.txt", "a.jpg -1\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: label -1 is outside")):
        read_image_list(path)


def test_list_file_rejects_absolute_paths_and_empty_files(tmp_path):
    path = _write(tmp_path / "abs.txt", "/data/a.jpg 0\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: path '/data/a.jpg' must be "
                                                   "relative")):
        read_image_list(path)
    path = _write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: the list file has no entries")):
        read_image_list(path)


def test_missing_list_file_and_unreadable_root_are_named(tmp_path, list_file):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image list file not found: "
                                                          f"{missing}")):
        read_image_list(missing)
    root = str(tmp_path / "no_root")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image root does not exist: {root}")):
        ImageListDataset(list_file, root=root)
    with pytest.raises(FileNotFoundError, match=re.escape(f"image root does not exist: {root}")):
        ImageFolderDataset(root)
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"image root is not a directory: {list_file}")):
        ImageFolderDataset(list_file)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads directories without permission")
def test_root_without_read_permission_is_named(tmp_path):
    root = tmp_path / "locked"
    root.mkdir()
    root.chmod(0)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"image root is not readable "
                                                            f"(permission denied): {root}")):
            ImageFolderDataset(str(root))
    finally:
        root.chmod(0o755)


def test_empty_class_folder_and_empty_tree_are_errors(tmp_path):
    root = tmp_path / "train"
    write_photo_tree(str(root), 2, 1, long_side=(32, 40))
    (root / "n00000002").mkdir()
    (root / "n00000002" / "notes.txt").write_text("not an image")
    empty = os.path.join(str(root), "n00000002")
    with pytest.raises(ValueError, match=re.escape(f"class folder {empty} contains no image "
                                                   "files")):
        ImageFolderDataset(str(root))
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"no class folders under image root {bare}")):
        scan_class_folders(str(bare))


def test_missing_and_corrupt_images_name_their_path(tmp_path, tree):
    root, entries = tree
    path = _write(tmp_path / "list.txt", f"{entries[0][0]} 0\nn00000000/gone.JPEG 0\n")
    dataset = ImageListDataset(path, root=root)
    assert dataset[0][0].shape[0] == 3
    gone = os.path.join(root, "n00000000", "gone.JPEG")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image file not found: {gone}")):
        dataset[1]
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    path = _write(tmp_path / "list2.txt", "broken.JPEG 0\n")
    broken = os.path.join(str(tmp_path), "broken.JPEG")
    with pytest.raises(OSError, match=re.escape(f"corrupt image {broken}")):
        ImageListDataset(path, root=str(tmp_path))[0]


def test_greyscale_photos_come_out_as_three_channels(tmp_path):
    root = str(tmp_path / "grey")
    write_photo_tree(root, 2, 2, long_side=(40, 50), photos=GREY_PHOTOS, extension=".png")
    dataset = ImageFolderDataset(root)
    image, _ = dataset[3]
    assert image.shape[0] == 3 and numpy.array_equal(image[0], image[2])


def test_index_out_of_range_is_an_index_error(tree):
    dataset = ImageFolderDataset(tree[0])
    with pytest.raises(IndexError, match="index 15 out of range for a dataset of 15 images"):
        dataset[15]
