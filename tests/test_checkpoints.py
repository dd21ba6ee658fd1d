"""Checkpoints that never lose a good state (utils.training.checkpoint, snapshot_reader,
resume_checks), in one process: what is kept, what is refused, what a damaged file does."""
import errno
import json
import os
import random
import types

import numpy as np
import pytest

from kfac_mn.optimizers import MomentumSGD
from models import archs
from utils.training import checkpoint, snapshot_reader
from utils.training.options import OptionError, check_world, parse_options
from utils.training.resume_checks import check_resumable, keep_global_batch
from utils.training.step import MeteredClassifier


class OneRank:
    """The collectives write_snapshot and choose_snapshot use, for a single process."""

    rank, size = 0, 1

    def gather_obj(self, obj, root=0):
        return [obj]

    def bcast_obj(self, obj, root=0):
        return obj

    def barrier(self):
        pass


def model_and_optimizer(seed):
    np.random.seed(seed)
    classifier = MeteredClassifier(archs["resnet8"](n_class=3, in_channels=1))
    optimizer = MomentumSGD(lr=0.1).setup(classifier)
    return classifier, optimizer


def train_one_step(classifier, optimizer, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    optimizer.update(classifier, x, rng.integers(0, 3, 4).astype(np.int32))


def meta(iteration, **changes):
    options = {"arch": "resnet8", "optimizer": "sgd"}
    return {"iteration": iteration, "size": 1, "options": options, **changes}


def write(out, iteration, keep=2, state=None, model=None):
    classifier, optimizer = model or model_and_optimizer(0)
    return checkpoint.write_snapshot(str(out), OneRank(),
                                     checkpoint.RankSnapshot(classifier, optimizer, state or {}),
                                     meta(iteration), keep)


def listing(out):
    return sorted(os.listdir(out))


def test_snapshot_round_trip_restores_model_optimizer_state_and_rngs(tmp_path):
    classifier, optimizer = model_and_optimizer(0)
    train_one_step(classifier, optimizer, 1)
    np.random.seed(5)
    random.seed(6)
    state = {"iteration": 1, "rng": checkpoint.rng_states(), "loader": {"epoch": 0}}
    expected_draws = (np.random.random(3).tolist(), random.random())
    directory = write(tmp_path, 1, state=state, model=(classifier, optimizer))
    assert directory == str(tmp_path / "snapshot_iter_000001")
    assert listing(directory) == ["meta.json", "rank_0.npz"]
    written = json.loads((tmp_path / "snapshot_iter_000001" / "meta.json").read_text())
    assert written["files"]["rank_0.npz"]["bytes"] == os.path.getsize(
        checkpoint.rank_file(directory, 0))

    found, saved, skipped = snapshot_reader.choose_snapshot(str(tmp_path), OneRank())
    assert (found, skipped) == (directory, [])
    restored, restored_optimizer = model_and_optimizer(1)  # other weights
    loaded = snapshot_reader.load_snapshot(found, saved, 0,
                                           checkpoint.RankSnapshot(restored, restored_optimizer))
    assert loaded == json.loads(json.dumps(state))
    for (path, a), (_, b) in zip(classifier.namedparams(), restored.namedparams()):
        assert np.array_equal(a.data, b.data), path
        assert np.array_equal(a.update_rule.state["v"], b.update_rule.state["v"]), path
    assert restored_optimizer.t == 1
    np.random.seed(0)
    random.seed(0)
    checkpoint.set_rng_states(loaded["rng"])
    assert (np.random.random(3).tolist(), random.random()) == expected_draws


def test_the_newest_k_and_the_newest_validated_snapshot_are_kept(tmp_path):
    model = model_and_optimizer(0)
    first = write(tmp_path, 4, model=model)
    checkpoint.mark_validated(first, {"validation/main/loss": 0.5})
    os.makedirs(tmp_path / ".snapshot_iter_000005.partial")  # a crash mid-write
    os.makedirs(tmp_path / "snapshot_iter_000006")  # a folder without meta.json
    for iteration in (8, 12, 16):
        latest = write(tmp_path, iteration, model=model)
    assert latest == str(tmp_path / "snapshot_iter_000016")
    assert json.loads((tmp_path / "latest.json").read_text()) == {
        "snapshot": "snapshot_iter_000016"}
    # keep=2: 12 and 16; 4 passed validation and no newer one has
    assert listing(tmp_path) == ["latest.json", "snapshot_iter_000004", "snapshot_iter_000012",
                                 "snapshot_iter_000016"]
    checkpoint.mark_validated(latest, {"validation/main/loss": 0.4})
    write(tmp_path, 20, keep=1, model=model)
    assert listing(tmp_path) == ["latest.json", "snapshot_iter_000016", "snapshot_iter_000020"]
    # non-finite validation figures do not count as passed
    checkpoint.mark_validated(str(tmp_path / "snapshot_iter_000020"),
                              {"validation/main/loss": float("nan")})
    assert not checkpoint.passed_validation(str(tmp_path / "snapshot_iter_000020"))


def test_a_state_that_is_not_finite_is_never_written(tmp_path):
    classifier, optimizer = model_and_optimizer(0)
    train_one_step(classifier, optimizer, 1)
    good = write(tmp_path, 2, model=(classifier, optimizer))
    before = listing(tmp_path)
    param = next(iter(classifier.params()))
    param.update_rule.state["v"][...] = np.nan
    with pytest.raises(checkpoint.NonFiniteState, match=r"rank 0: optimizer/.*/v not finite"):
        write(tmp_path, 4, model=(classifier, optimizer))
    assert listing(tmp_path) == before and listing(good) == ["meta.json", "rank_0.npz"]


@pytest.mark.parametrize("failing", ["rank file", "meta.json", "latest.json"])
def test_a_full_disk_names_the_file_and_leaves_the_previous_snapshot_latest(tmp_path,
                                                                             monkeypatch,
                                                                             failing):
    good = write(tmp_path, 2)
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in listing(tmp_path)}
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "rank file":
        def save_npz(path, obj, compression):
            with open(path + ".part", "wb") as stream:  # something half written
                stream.write(b"PK")
            full.filename = path
            raise full

        monkeypatch.setattr(checkpoint, "save_npz", save_npz)
        named = str(tmp_path / "snapshot_iter_000004" / "rank_0.npz")
    else:
        real = checkpoint.atomic_write_text

        def atomic_write_text(path, text):
            if os.path.basename(path) == failing:
                full.filename = path + ".tmp"
                raise full
            real(path, text)

        monkeypatch.setattr(checkpoint, "atomic_write_text", atomic_write_text)
        named = str(tmp_path / ("snapshot_iter_000004/meta.json" if failing == "meta.json"
                                else "latest.json.tmp"))
    with pytest.raises(checkpoint.SnapshotWriteError) as error:
        write(tmp_path, 4)
    message = str(error.value)
    assert named in message and "No space left on device" in message, message
    assert f"the previous snapshot {good} stays the latest" in message
    assert listing(tmp_path) == ["latest.json", "snapshot_iter_000002"]
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in before} == before
    assert snapshot_reader.choose_snapshot(str(tmp_path), OneRank())[0] == good


def damage(path, how):
    data = bytearray(open(path, "rb").read())
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "bit flip":
        data[len(data) // 2] ^= 0x10
    elif how == "garbage":
        data = b"\x00garbage"
    elif how == "edited":
        record = json.loads(data)
        record["iteration"] += 1
        data = json.dumps(record).encode()
    with open(path, "wb") as stream:
        stream.write(data)


@pytest.mark.parametrize("name, how, says", [
    ("rank_0.npz", "empty", "rank_0.npz has 0 bytes, {size} were written"),
    ("rank_0.npz", "truncated", "rank_0.npz has {half} bytes, {size} were written"),
    ("rank_0.npz", "bit flip", "rank_0.npz: its SHA-256 differs from the one recorded"),
    ("meta.json", "garbage", "meta.json: not valid JSON"),
    ("meta.json", "edited", "meta.json: its contents do not match its checksum"),
])
def test_a_damaged_snapshot_is_named_and_the_newest_intact_one_used(tmp_path, name, how, says):
    older = write(tmp_path, 2)
    newer = write(tmp_path, 4)
    size = os.path.getsize(checkpoint.rank_file(newer, 0))
    damage(os.path.join(newer, name), how)
    expected = os.path.join(newer, name) + says.split(name, 1)[1].format(size=size,
                                                                         half=size // 2)
    found, _, skipped = snapshot_reader.choose_snapshot(str(tmp_path), OneRank())
    assert found == older and len(skipped) == 1 and expected in skipped[0], skipped
    with pytest.raises(snapshot_reader.DamagedSnapshot) as error:
        snapshot_reader.choose_snapshot(newer, OneRank())
    assert expected in str(error.value)
    assert str(error.value).endswith(f"use --resume {older} (the newest intact snapshot) "
                                     "instead")
    damage(checkpoint.rank_file(older, 0), "bit flip")
    with pytest.raises(snapshot_reader.DamagedSnapshot, match="no intact snapshot there"):
        snapshot_reader.choose_snapshot(str(tmp_path), OneRank())


def test_a_garbage_latest_json_falls_back_to_the_snapshot_folders(tmp_path):
    write(tmp_path, 2, keep=3)
    newest = write(tmp_path, 4, keep=3)
    damage(str(tmp_path / "latest.json"), "garbage")
    assert snapshot_reader.choose_snapshot(str(tmp_path), OneRank())[0] == newest


def test_resume_errors_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume .*: no checkpoint there"):
        snapshot_reader.choose_snapshot(str(tmp_path), OneRank())
    with pytest.raises(FileNotFoundError, match="no such directory"):
        snapshot_reader.choose_snapshot(str(tmp_path / "missing"), OneRank())


# -- what a resumed run must share --------------------------------------------------------
def saved_meta(argv, size):
    options = check_world(parse_options(argv + ["--out", "run"]), size)
    options.arch = "resnet_mnist"
    return {"size": size, "global_batch": size * options.batchsize * options.acc_iters,
            "train_examples": 192, "options": dict(vars(options))}


def resumed(argv, size, meta):
    options = parse_options(argv + ["--out", "run", "--resume", "run"])
    keep_global_batch(options, meta, size)
    check_world(options, size)
    options.arch = "resnet_mnist"
    return options


def test_resume_lists_every_option_that_changes_the_math(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = saved_meta(["--batchsize", "8"], 4)
    same = resumed(["--batchsize", "8", "--log-interval", "3", "--timeout", "5"], 4, meta)
    check_resumable("run", meta, same, 4, 192)
    changed = resumed(["--batchsize", "8", "--bn-fisher", "full", "--lr", "0.1",
                       "--damping", "0.01"], 4, meta)
    with pytest.raises(OptionError) as error:
        check_resumable("run", meta, changed, 4, 192)
    message = str(error.value)
    assert message.startswith("--resume run: the checkpoint was written with "), message
    for part in ("--bn-fisher diag (this run: full)", "--damping 0.001 (this run: 0.01)",
                 "--lr 0.05 (this run: 0.1)", "could not continue exactly"):
        assert part in message, message
    longer = resumed(["--batchsize", "8", "--epoch", "2"], 4, meta)
    with pytest.raises(OptionError, match=r"the polynomial lr decay ends at epoch 1 \(this run: "
                                          r"2; to train longer on the same schedule pass "
                                          r"--lr-decay-end 1\)"):
        check_resumable("run", meta, longer, 4, 192)
    check_resumable("run", meta, resumed(["--batchsize", "8", "--epoch", "2",
                                          "--lr-decay-end", "1"], 4, meta), 4, 192)


def test_resume_on_another_world_size_keeps_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = saved_meta(["--batchsize", "8"], 4)  # global batch 32
    on_two = resumed(["--batchsize", "8"], 2, meta)
    assert on_two.acc_iters == 2
    check_resumable("run", meta, on_two, 2, 192)
    explicit = resumed(["--batchsize", "8", "--acc-iters", "1"], 2, meta)
    with pytest.raises(OptionError, match=r"global batch 32 = 4 x 8 x 1 \(this run: 2 x 8 x 1 = "
                                          r"16; leave out --acc-iters and --global-batch"):
        check_resumable("run", meta, explicit, 2, 192)
    with pytest.raises(OptionError, match="global batch 32 is not a multiple of workers x "
                                          "batchsize = 3 x 8"):
        resumed(["--batchsize", "8"], 3, meta)


def test_check_resumable_accepts_a_namespace_of_resolved_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = saved_meta([], 1)
    options = types.SimpleNamespace(**meta["options"])
    check_resumable("run", meta, options, 1, 192)
    with pytest.raises(OptionError, match="192 training examples"):
        check_resumable("run", meta, options, 1, 100)


def test_a_rank_reads_its_layers_factors_from_their_old_owners_files_only(tmp_path):
    for rank, layer in ((0, "a"), (1, "b"), (2, "c")):
        np.savez(checkpoint.rank_file(str(tmp_path), rank), **{
            "model/W": np.full(2, 7.0), "optimizer/rng_state": np.full(1, rank),
            f"optimizer/fisher/{layer}/factor_A": np.full((2, 2), float(rank))})
    owners = {"a": 0, "b": 1, "c": 2}
    archive = snapshot_reader.MergedArchive(str(tmp_path), 3, 1, {"c"}.__contains__, owners)
    assert archive.files == ["model/W", "optimizer/fisher/c/factor_A", "optimizer/rng_state"]
    assert archive["optimizer/fisher/c/factor_A"][0, 0] == 2 and archive["optimizer/rng_state"]
    assert sorted(archive._open) == [1, 2]  # rank 1's own file and c's old owner's
    archive.close()
    # rank 4 of a larger world: rank 1's (4 mod 3) file, without its label sampler's state
    archive = snapshot_reader.MergedArchive(str(tmp_path), 3, 4, {"a", "b"}.__contains__)
    assert archive.files == ["model/W", "optimizer/fisher/a/factor_A",
                             "optimizer/fisher/b/factor_A"]
    archive.close()
