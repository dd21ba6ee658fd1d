"""The per-rank loader on real photos: determinism, sharding, resume, errors, shutdown."""
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy
import pytest

from utils.data.batch_augmentation import BatchAugmentation
from utils.data.image_decoding import CorruptImageError
from utils.data.image_folder import ImageFolderDataset
from utils.data.image_list import ImageListDataset
from utils.data.loader import ShardedLoader
from utils.data.normalization import IMAGENET_MEAN, IMAGENET_STD, ChannelNormalizer
from utils.data.sample_photos import write_photo_tree
from utils.data.transforms import EvalTransform, RandomErasing, TrainTransform

IMAGENET = ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD)
TRAIN = TrainTransform(IMAGENET, size=32, erasing=RandomErasing())
EVAL = EvalTransform(IMAGENET, resize=40, crop=32)
N_CLASSES, PER_CLASS = 3, 7


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("photos"))
    write_photo_tree(root, N_CLASSES, PER_CLASS, seed=2, long_side=(40, 64))
    return root


@pytest.fixture(scope="module")
def dataset(root):
    return ImageFolderDataset(root)


def _take(loader, count):
    with loader:
        return [next(loader) for _ in range(count)]


def _same(batches, others):
    return len(batches) == len(others) and all(
        numpy.array_equal(x, y) and numpy.array_equal(t, u)
        for (x, t), (y, u) in zip(batches, others))


def _loader_children():
    return [p for p in multiprocessing.active_children() if p.name.startswith("loader-worker")]


def test_batches_do_not_depend_on_workers_and_repeat_on_rerun(dataset):
    augment = BatchAugmentation(N_CLASSES, mixup_alpha=0.4, label_smoothing=0.1)

    def run(n_workers):
        loader = ShardedLoader(dataset, 4, transform=TRAIN, rank=1, size=2, seed=11,
                               n_workers=n_workers, prefetch=2, augmentation=augment)
        return _take(loader, 8)  # 3 iterations per epoch: crosses two epoch boundaries

    in_process = run(0)
    x, t = in_process[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == numpy.float32
    assert t.shape == (4, N_CLASSES) and t.dtype == numpy.float32
    assert _same(in_process, run(1))
    assert _same(in_process, run(2))
    assert _same(run(2), run(2))
    other_seed = _take(ShardedLoader(dataset, 4, transform=TRAIN, rank=1, size=2, seed=12,
                                     augmentation=augment), 1)
    assert not numpy.array_equal(other_seed[0][0], x)


def test_int_labels_and_epoch_bookkeeping(dataset):
    loader = ShardedLoader(dataset, 5, transform=EVAL, seed=0)
    assert loader.iterations_per_epoch == 5  # 21 images, batch 5, padded
    seen = []
    with loader:
        for _ in range(6):
            x, t = next(loader)
            assert t.dtype == numpy.int32 and t.shape == (5,)
            assert 0 <= t.min() and t.max() < N_CLASSES
            seen.append((loader.epoch, loader.iteration_in_epoch, loader.is_new_epoch,
                         loader.iteration))
    assert seen[3] == (0, 4, False, 4)
    assert seen[4] == (1, 0, True, 5)
    assert seen[5] == (1, 1, False, 6)
    assert loader.epoch_detail == pytest.approx(1.2)


def test_evaluation_pass_covers_every_example_once_across_ranks(dataset):
    """Three ranks, partial policy, shuffled: rows over ranks = each example once."""
    expected = sorted(EVAL(dataset.get_image(i)).tobytes() for i in range(len(dataset)))
    rows, labels = [], []
    for rank in range(3):
        loader = ShardedLoader(dataset, 2, transform=EVAL, rank=rank, size=3, seed=4,
                               last_batch="partial", repeat=False, n_workers=1)
        with loader:
            for x, t in loader:
                rows.extend(row.tobytes() for row in x)
                labels.extend(t.tolist())
            assert loader.epoch == 1
            loader.reset()
            assert len(list(loader)) == loader.iterations_per_epoch
    assert sorted(rows) == expected
    assert sorted(labels) == sorted(dataset.labels.tolist())


def test_resume_from_state_dict_continues_the_same_batches(dataset):
    def make(n_workers):
        return ShardedLoader(dataset, 3, transform=TRAIN, seed=5, n_workers=n_workers,
                             augmentation=BatchAugmentation(N_CLASSES, mixup_alpha=1.0))
    with make(2) as loader:
        head = [next(loader) for _ in range(9)]
        state = loader.state_dict()
        tail = [next(loader) for _ in range(6)]
    assert state["epoch"] == 1 and state["iteration_in_epoch"] == 2
    with make(0) as resumed:
        resumed.load_state_dict(state)
        assert (resumed.epoch, resumed.iteration_in_epoch) == (1, 2)
        assert _same([next(resumed) for _ in range(6)], tail)
    with make(1) as rewound:  # loading a state also discards batches already prefetched
        next(rewound)
        rewound.load_state_dict({**state, "epoch": 0, "iteration_in_epoch": 0})
        assert _same([next(rewound) for _ in range(9)], head)


def test_state_from_another_configuration_is_refused(dataset):
    with ShardedLoader(dataset, 3, transform=EVAL, seed=5) as loader:
        state = loader.state_dict()
    with ShardedLoader(dataset, 3, transform=EVAL, seed=6) as other:
        with pytest.raises(ValueError, match="loader state 'seed' is 5 but this loader has 6"):
            other.load_state_dict(state)
        with pytest.raises(KeyError, match="loader state has no 'epoch'"):
            other.load_state_dict({k: v for k, v in state.items() if k != "epoch"})
    # Same global batch of 6 over two ranks instead of one: the state carries over.
    with ShardedLoader(dataset, 6, transform=EVAL, seed=5) as one_rank:
        one_rank.load_state_dict({**state, "global_batch_size": 6})


@pytest.fixture()
def list_with_corrupt(tmp_path, root, dataset):
    (tmp_path / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    lines = [f"{os.path.relpath(dataset.path(i), str(tmp_path))} {dataset.get_label(i)}"
             for i in range(6)]
    lines.insert(2, "broken.JPEG 0")
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return ImageListDataset(str(path), root=str(tmp_path)), str(tmp_path / "broken.JPEG")


def test_corrupt_image_from_a_worker_names_its_path_and_closes_the_loader(list_with_corrupt):
    data, broken = list_with_corrupt
    loader = ShardedLoader(data, 7, transform=EVAL, n_workers=1, shuffle=False)
    with pytest.raises(CorruptImageError, match=re.escape(f"corrupt image {broken}")) as info:
        next(loader)
    assert "raised in loader worker 0" in "".join(getattr(info.value, "__notes__", []))
    with pytest.raises(RuntimeError, match="the loader is closed"):
        next(loader)
    assert not _loader_children()


def test_skip_corrupt_leaves_the_image_out_and_counts_it(list_with_corrupt):
    data, broken = list_with_corrupt
    loader = ShardedLoader(data, 7, transform=EVAL, n_workers=1, shuffle=False,
                           skip_corrupt=True)
    with loader:
        with pytest.warns(RuntimeWarning, match=re.escape(f"skipped corrupt image {broken}")):
            x, t = next(loader)
        assert x.shape[0] == t.shape[0] == 6 and loader.n_skipped == 1
        next(loader)
        assert loader.n_skipped == 2 and loader.state_dict()["n_skipped"] == 2


def test_missing_image_from_a_worker_names_its_path_or_is_gone_past(tmp_path, root, dataset):
    path = tmp_path / "list.txt"
    path.write_text(f"{os.path.relpath(dataset.path(0), root)} 0\nn00000000/gone.JPEG 0\n"
                    f"{os.path.relpath(dataset.path(1), root)} 1\n")
    listed = ImageListDataset(str(path), root=root)
    gone = os.path.join(root, "n00000000", "gone.JPEG")
    with ShardedLoader(listed, 3, transform=EVAL, n_workers=1, shuffle=False) as loader:
        with pytest.raises(FileNotFoundError, match=re.escape(f"image file not found: {gone}")):
            next(loader)
    with ShardedLoader(listed, 3, transform=EVAL, n_workers=1, shuffle=False,
                       skip_corrupt="drop") as loader:
        with pytest.warns(RuntimeWarning, match=re.escape(f"skipped image file not found: "
                                                          f"{gone}")):
            x, t = next(loader)
        assert t.tolist() == [0, 1] and loader.n_skipped == 1
    # 'replace': the batch keeps its size; the missing example's place goes to the next one
    with ShardedLoader(listed, 3, transform=EVAL, n_workers=0, shuffle=False,
                       skip_corrupt="replace") as loader:
        with pytest.warns(RuntimeWarning):
            x, t = next(loader)
        assert t.tolist() == [0, 1, 1] and loader.n_skipped == 1
        assert numpy.array_equal(x[1], x[2])


def test_replacing_never_hands_out_an_empty_batch_and_gives_up_only_on_nothing(tmp_path, root,
                                                                               dataset):
    path = tmp_path / "list.txt"
    good = os.path.relpath(dataset.path(0), root)
    path.write_text("a/gone.JPEG 0\nb/gone.JPEG 1\n" + f"{good} 2\n")
    with ShardedLoader(ImageListDataset(str(path), root=root), 1, transform=EVAL, size=3,
                       rank=0, shuffle=False, skip_corrupt="replace") as loader:
        with pytest.warns(RuntimeWarning):
            x, t = next(loader)
        assert len(t) == 1 and t.tolist() == [2]  # examples 0 and 1 are missing
    path.write_text("a/gone.JPEG 0\nb/gone.JPEG 1\n")
    with ShardedLoader(ImageListDataset(str(path), root=root), 1, transform=EVAL,
                       shuffle=False, skip_corrupt="replace") as loader:
        with pytest.raises(OSError, match="no example of the data set can be read"):
            next(loader)


def test_close_stops_workers_and_a_dead_worker_is_reported(dataset):
    loader = ShardedLoader(dataset, 2, transform=EVAL, n_workers=2)
    next(loader)
    assert len(_loader_children()) == 2
    loader.close()
    loader.close()
    assert not _loader_children()
    loader = ShardedLoader(dataset, 2, transform=EVAL, n_workers=1, prefetch=1)
    next(loader)
    worker = _loader_children()[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join()
    with pytest.raises(RuntimeError, match=r"loader worker 0 \(pid \d+\) died"):
        for _ in range(3):
            next(loader)


def test_interpreter_exit_without_close_neither_hangs_nor_leaks(root):
    script = textwrap.dedent(f"""
        from utils.data.image_folder import ImageFolderDataset
        from utils.data.loader import ShardedLoader
        from utils.data.normalization import IMAGENET_MEAN, IMAGENET_STD, ChannelNormalizer
        from utils.data.transforms import EvalTransform
        transform = EvalTransform(ChannelNormalizer(IMAGENET_MEAN, IMAGENET_STD), 40, 32)
        loader = ShardedLoader(ImageFolderDataset({root!r}), 4, transform=transform,
                               n_workers=2, prefetch=3)
        next(loader)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "leaked" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_bad_loader_arguments_are_named(dataset):
    with pytest.raises(ValueError, match="n_workers must be an integer >= 0"):
        ShardedLoader(dataset, 2, transform=EVAL, n_workers=-1)
    with pytest.raises(ValueError, match="prefetch must be an integer >= 1"):
        ShardedLoader(dataset, 2, transform=EVAL, prefetch=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        ShardedLoader(dataset, 2, transform=EVAL, seed=-3)
    with pytest.raises(ValueError, match="the dataset has 3 classes but the batch augmentation "
                                         "was built for 2"):
        ShardedLoader(dataset, 2, transform=EVAL, augmentation=BatchAugmentation(2, 0.4))
    with pytest.raises(TypeError, match="list has no get_image or get_label"):
        ShardedLoader([(numpy.zeros((3, 4, 4)), 0)] * 4, 2, transform=EVAL)


def test_worker_batches_are_lent_views_reused_once_dropped(dataset):
    reference = _take(ShardedLoader(dataset, 4, transform=TRAIN, seed=3), 14)
    with ShardedLoader(dataset, 4, transform=TRAIN, seed=3, n_workers=1, prefetch=2) as loader:
        kept, _ = next(loader)
        assert not kept.flags.owndata  # a view of the worker's shared memory, not a copy
        addresses = set()
        for k in range(1, 14):
            x, t = next(loader)
            assert numpy.array_equal(x, reference[k][0]) and numpy.array_equal(t, reference[k][1])
            addresses.add(x.__array_interface__["data"][0])
            del x, t
        assert numpy.array_equal(kept, reference[0][0])  # not reused while held
        assert len(addresses) <= 3  # dropped batches' segments are reused
    assert numpy.array_equal(kept, reference[0][0])  # and it outlives the loader


class SlowDataset:
    """``dataset`` with 50 ms per image: a batch of 16 takes about 0.8 s to build."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def get_label(self, i):
        return self.dataset.get_label(i)

    def get_image(self, i):
        import time
        time.sleep(0.05)
        return self.dataset.get_image(i)


def test_close_abandons_a_batch_in_progress(dataset):
    import time

    loader = ShardedLoader(SlowDataset(dataset), 16, transform=EVAL, n_workers=1, prefetch=2)
    next(loader)  # the worker goes on with the next (prefetched) batch
    time.sleep(0.1)
    start = time.perf_counter()
    loader.close()
    assert time.perf_counter() - start < 0.4  # not the ~0.7 s left of the batch it was on
    assert not _loader_children()
