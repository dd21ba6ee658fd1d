"""scripts/make_list.py and scripts/bench_loader.py, run as a user would."""
import json
import os
import re
import subprocess
import sys

from utils.data.image_folder import ImageFolderDataset
from utils.data.image_list import ImageListDataset
from utils.data.sample_photos import write_photo_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_make_list_writes_a_list_equivalent_to_the_tree(tmp_path):
    root = str(tmp_path / "train")
    write_photo_tree(root, 3, 2, long_side=(32, 40))
    list_path, classes_path = str(tmp_path / "train.txt"), str(tmp_path / "classes.txt")
    done = _run("scripts/make_list.py", root, list_path, "--classes", classes_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote 6 entries to {list_path}"
    assert open(list_path).read().splitlines()[2] == os.path.join("n00000001", "img_0000.JPEG") \
        + " 1"
    folder = ImageFolderDataset(root)
    listed = ImageListDataset(list_path, root=root)
    assert [listed.path(i) for i in range(6)] == [folder.path(i) for i in range(6)]
    assert open(classes_path).read().split() == list(folder.class_names)


def test_make_list_reports_bad_trees(tmp_path):
    root = tmp_path / "train"
    write_photo_tree(str(root), 1, 1, long_side=(32, 40))
    os.rename(root / "n00000000" / "img_0000.JPEG", root / "n00000000" / "a b.JPEG")
    done = _run("scripts/make_list.py", str(root), str(tmp_path / "out.txt"))
    assert done.returncode == 1
    assert re.search(r"a b\.JPEG: a list file cannot hold a path with whitespace", done.stderr)
    done = _run("scripts/make_list.py", str(tmp_path / "missing"), str(tmp_path / "out.txt"))
    assert done.returncode == 1 and "image root does not exist" in done.stderr


def test_bench_loader_prints_a_table_then_json_figures():
    done = _run("scripts/bench_loader.py", "--images", "24", "--classes", "3", "--long-side",
                "120", "160", "--batch-size", "8", "--crop", "64", "--repeats", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    header = next(k for k, line in enumerate(lines) if line.split()[:1] == ["workers"])
    assert [line.split()[0] for line in lines[header + 1:header + 3]] == ["1", "2"]
    figures = json.loads(lines[-1])
    assert figures["images"] == 24
    for n in (1, 2):
        assert figures[f"bare_{n}"] > 0 and figures[f"pipeline_{n}"] > 0
        ratio = figures[f"pipeline_{n}"] / figures[f"bare_{n}"]
        assert abs(figures[f"ratio_{n}"] - ratio) < 2e-3
        assert figures[f"pair_ratio_min_{n}"] <= figures[f"pair_ratio_max_{n}"]
        assert figures[f"cpu_ratio_{n}"] > 0
    stages = figures["stage_ms"]
    assert all(stages[name] > 0 for name in ("decode", "resize_flip", "normalise",
                                             "file->example", "decode+resize", "bare_decode"))
    for name, cost in (("in_process_ratio", "file->example"), ("resize_only_ratio",
                                                              "decode+resize")):
        ratio = stages["bare_decode"] / stages[cost]
        assert abs(figures[name] - ratio) < 2e-3 * ratio
