"""A run that loses nothing: train_imagenet.py under real mpiexec, faced with what goes wrong
on a cluster.  Each test asserts the message (naming the flag, file or rank) and that the files
that were good stay as they were.

- divergence (NaN and finite, SGD and K-FAC, at the last update before a snapshot too): exit 1,
  the last good snapshot named and untouched, and a resume from it repeats the run exactly;
- a hung rank (SIGSTOP) ends the job through the watchdog, naming the collective and the rank;
  a killed rank ends it at once;
- a run of P ranks resumes on Q with the same global batch and continues the same run;
- damaged checkpoints are named and passed over; a full disk keeps the previous snapshot;
- bad data is found before any work.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_communicators import mpi_command
from tests.test_train_runs import (
    REPO,
    file_digests,
    finish,
    kill_tree,
    latest,
    losses,
    rank_process,
    run_training,
    start,
    tiny,
    wait_for_iteration,
)
from utils.data.sample_photos import write_photo_tree

pytestmark = pytest.mark.mpi


# -- divergence ---------------------------------------------------------------------------
DIVERGING = {
    # lr x 1e40 (inf in float32) for the last update of epoch 2: NaN weights just before the
    # snapshot at iteration 24
    "nan": ["--lr-schedule", "step", "--lr-milestones", "1.9", "--lr-decay-rate", "1e40"],
    # lr x 1000 from iteration 16 on: a finite loss far above its lowest
    "finite": ["--lr-schedule", "step", "--lr-milestones", "1.25", "--lr-decay-rate", "1000",
               "--divergence-patience", "2"],
}
SAYS = {"nan": r"the weights are not finite \(/predictor/\S+, .*\) at iteration 24 \(epoch 2.00\)",
        "finite": r"the training loss \S+ has stayed above 10 x its lowest \(\S+\) for 2 log "
                  r"intervals \(--divergence-factor, --divergence-patience\) at iteration "
                  r"(\d+)"}


@pytest.mark.parametrize("optimizer", ["sgd", "kfac"])
@pytest.mark.parametrize("kind", ["nan", "finite"])
def test_divergence_stops_keeps_the_good_snapshot_and_repeats_exactly_from_it(tmp_path,
                                                                             optimizer, kind):
    out = tmp_path / "run"
    args = tiny(2, "--optimizer", optimizer, *DIVERGING[kind])
    status, output = run_training(args + ["--out", str(out)], 2)
    good = out / "snapshot_iter_000012"
    assert status == 1, output
    found = re.search(SAYS[kind] + rf"[^;]*; stopping without writing a checkpoint: the last "
                                   rf"good checkpoint is {re.escape(str(good))}", output)
    assert found, output
    assert latest(out) == str(good)
    assert sorted(os.listdir(out)) == ["latest.json", "log.jsonl", "options.json", good.name]
    digests = file_digests(good)

    # the same options from the good snapshot: the same losses, the same stop
    again = tmp_path / "again"
    status, output = run_training(args + ["--out", str(again), "--resume", str(good)], 2)
    assert status == 1, output
    assert re.search(SAYS[kind], output) and str(good) in output, output
    first, second = losses(out), losses(again)
    assert sorted(second) == sorted(first)
    assert max(abs(first[i] - second[i]) for i in first) <= 1e-6
    assert file_digests(good) == digests


def test_a_changed_option_on_resume_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    status, output = run_training(tiny(2, "--out", str(out), "--epoch", "1"), 2)
    assert status == 0, output
    before = file_digests(out)
    status, output = run_training(tiny(2, "--out", str(out), "--epoch", "1", "--resume",
                                       str(out), "--bn-fisher", "full", "--lr", "1e6"), 2)
    assert status == 2, output
    assert (f"train_imagenet.py: error: --resume {out / 'snapshot_iter_000012'}: the checkpoint "
            "was written with --bn-fisher diag (this run: full); --lr 0.05 (this run: "
            "1000000.0). These change what is computed") in output, output
    assert file_digests(out) == before


# -- hung and killed ranks ----------------------------------------------------------------
@pytest.mark.parametrize("signum, limit", [(signal.SIGSTOP, 30), (signal.SIGKILL, 10)])
def test_a_stopped_or_killed_rank_ends_the_job_in_time(tmp_path, signum, limit):
    out = tmp_path / "run"
    process = start(["--train-size", "2560", "--val-size", "64", "--epoch", "20", "--batchsize",
                     "8", "--log-interval", "1", "--no-progress", "--no-plot", "--timeout",
                     "20", "--out", str(out)], 2)
    try:
        wait_for_iteration(out, 3, process)
        rank_process(process, 1).send_signal(signum)
        stopped = time.monotonic()
        status, output = finish(process, timeout=limit + 30)
        seconds = time.monotonic() - stopped
    finally:
        kill_tree(process)
    assert status != 0 and seconds < limit, (status, seconds, output)
    if signum == signal.SIGSTOP:
        assert status == 4, output
        assert re.search(r"watchdog on rank 0 of 2: no collective completed for 2\d s "
                         r"\(--timeout 20\): this rank is waiting in (allreduce_obj|gather_obj|"
                         r"allgather_v|reduce_scatter_v|barrier|bcast_obj) \(call \d+\)",
                         output), output
        assert ("ranks that did not arrive (no answer within 2.5 s: stopped, hung or dead): 1"
                in output), output
        assert (f"aborting the MPI job (exit status 4) without writing anything; restart the "
                f"job with --resume {out}") in output, output
    assert not any(name.startswith(".snapshot") for name in os.listdir(out))


# -- another world size -------------------------------------------------------------------
def run_test_arch(args, ranks):
    argv, env = mpi_command(ranks, [sys.executable,
                                    str(REPO / "tests" / "mpi" / "train_with_test_arch.py"),
                                    *args])
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    return done.returncode, done.stdout + done.stderr


NO_BN = ["--arch", "no_bn_float64", "--train-size", "96", "--val-size", "32", "--epoch", "2",
         "--batchsize", "6", "--log-interval", "1", "--stale-warmup", "1", "--comm-dtype",
         "float64", "--inv-dtype", "float64", "--no-progress", "--no-plot", "--seed", "1"]


def model_arrays(snapshot):
    with np.load(os.path.join(snapshot, "rank_0.npz")) as npz:
        return {key: npz[key] for key in npz.files if key.startswith("model/")}


@pytest.mark.parametrize("before, after", [(4, 2), (2, 4)])
def test_a_run_resumed_on_another_number_of_ranks_continues_the_same_run(tmp_path, before,
                                                                         after):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    status, output = run_test_arch(NO_BN + ["--global-batch", "24", "--out", str(reference)],
                                   before)
    assert status == 0, output
    # 4 iterations per epoch: the snapshot of epoch 1, then the next 4 updates on `after` ranks
    status, output = run_test_arch(NO_BN + ["--out", str(resumed), "--resume",
                                            str(reference / "snapshot_iter_000004")], after)
    assert status == 0, output
    acc_iters = 24 // (after * 6)
    assert (f"resuming a run of {before} workers on {after}, with the same global batch 24 "
            f"({after} x 6 x {acc_iters}); K-FAC's layers are re-assigned to the "
            "workers\n") in output, output
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for iteration in range(5, 9):  # the losses after each resumed update
        assert got[iteration] == pytest.approx(expected[iteration], rel=1e-6, abs=0)
    want, have = (model_arrays(out / "snapshot_iter_000008") for out in (reference, resumed))
    assert sorted(have) == sorted(want)
    for key, value in want.items():
        np.testing.assert_allclose(have[key], value, rtol=1e-6, atol=1e-12, err_msg=key)


def test_a_model_with_batch_norm_resumes_on_other_ranks_and_says_it_differs(tmp_path):
    out = tmp_path / "run"
    status, output = run_training(tiny(4, "--out", str(out), "--epoch", "1",
                                       "--snapshot-interval", "1"), 4)
    assert status == 0, output
    status, output = run_training(["--train-size", "192", "--val-size", "64",
                                   "--val-batchsize", "32", "--epoch", "1", "--batchsize", "4",
                                   "--log-interval", "1", "--seed", "3", "--stale-warmup", "4",
                                   "--no-progress", "--no-plot", "--out", str(tmp_path / "on2"),
                                   "--resume", str(out), "--lr-decay-end", "1", "--epoch",
                                   "1.5"], 2)
    assert status == 0, output
    assert ("resuming a run of 4 workers on 2, with the same global batch 16 (2 x 4 x 2); "
            "K-FAC's layers are re-assigned to the workers; batch normalization computes its "
            "statistics over other micro-batches now, so the run differs from an "
            "uninterrupted one") in output, output


# -- damaged checkpoints --------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_snapshots(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_snapshots") / "run"
    status, output = run_training(tiny(2, "--out", str(out)), 2)
    assert status == 0, output
    return out


def spoil(path, how):
    if how == "empty":
        open(path, "wb").close()
    elif how == "bit flip":
        data = bytearray(open(path, "rb").read())
        data[len(data) // 3] ^= 0x01
        open(path, "wb").write(bytes(data))
    else:
        open(path, "w").write("{not json")


@pytest.mark.parametrize("name, how, says", [
    ("snapshot_iter_000024/rank_1.npz", "empty", "rank_1.npz has 0 bytes, "),
    ("snapshot_iter_000024/rank_1.npz", "bit flip", "rank_1.npz: its SHA-256 differs"),
    ("snapshot_iter_000024/meta.json", "garbage", "meta.json: not valid JSON"),
    ("latest.json", "garbage", None),
])
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumed(
        tmp_path, two_snapshots, name, how, says):
    out = tmp_path / "run"
    shutil.copytree(two_snapshots, out)
    spoil(out / name, how)
    damaged = out / "snapshot_iter_000024"
    if says is not None:  # named explicitly: an error naming the file and what to use
        before = file_digests(out)
        status, output = run_training(tiny(2, "--out", str(out), "--resume", str(damaged),
                                           "--epoch", "2"), 2)
        assert status == 2, output
        assert f"--resume {damaged}: {out / name}{says.split(os.path.basename(name))[1]}" \
            in output, output
        assert (f"; use --resume {out / 'snapshot_iter_000012'} (the newest intact snapshot) "
                "instead") in output, output
        assert file_digests(out) == before
    status, output = run_training(tiny(2, "--out", str(out), "--resume", str(out)), 2)
    assert status == 0, output
    if says is None:  # latest.json is only a pointer: the snapshot folders are still there
        assert "resumed at iteration 24" in output, output
    else:
        assert (f"--resume {out}: passed over damaged snapshots ({out / name}"
                in output), output
        assert (f"resuming from {out / 'snapshot_iter_000012'}, the newest intact one" in
                output), output
        assert "resumed at iteration 12" in output, output
        assert losses(out) == pytest.approx(losses(two_snapshots), abs=1e-6)


TMPFS_SCRIPT = """
set -e
mount -t tmpfs -o size={size} tmpfs {mount}
{command} > {mount}.log 2>&1 || echo "exit status $?" >> {mount}.log
ls -A {mount}/run > {mount}.listing
cat {mount}/run/latest.json > {mount}.latest
"""


def test_a_full_disk_during_a_snapshot_keeps_the_previous_one(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a small tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
    mount = tmp_path / "disk"
    mount.mkdir()
    from tests.test_train_runs import command

    # one snapshot of resnet_mnist on 2 ranks is about 1.7 MB: room for the first only
    args = tiny(2, "--out", str(mount / "run"), "--keep-snapshots", "2")
    argv, env = command(args, 2)
    script = TMPFS_SCRIPT.format(size="2600k", mount=mount, command=" ".join(argv))
    env["OPENBLAS_NUM_THREADS"] = "1"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    output = (tmp_path / "disk.log").read_text() if (tmp_path / "disk.log").exists() else ""
    assert done.returncode == 0, done.stderr + output
    assert "exit status 3" in output, output
    assert re.search(rf"train_imagenet.py: could not write the snapshot at iteration 24: "
                     rf"({re.escape(str(mount / 'run' / 'snapshot_iter_000024'))}/"
                     r"(rank_\d.npz|meta.json): No space left on device; )+nothing of it was "
                     rf"kept, and the previous snapshot "
                     rf"{re.escape(str(mount / 'run' / 'snapshot_iter_000012'))} stays the "
                     r"latest; free some space", output), output
    listing = (tmp_path / "disk.listing").read_text().split()
    assert sorted(listing) == ["latest.json", "log.jsonl", "options.json",
                               "snapshot_iter_000012"], listing
    assert json.loads((tmp_path / "disk.latest").read_text()) == {
        "snapshot": "snapshot_iter_000012"}


# -- data checked before any work ---------------------------------------------------------
@pytest.fixture
def photos(tmp_path):
    entries = write_photo_tree(str(tmp_path / "images"), 3, 6, seed=1, long_side=(40, 48))
    return tmp_path, entries


def list_file(path, entries):
    path.write_text("".join(f"{relative} {label}\n" for relative, label in entries))
    return str(path)


def image_args(tmp_path, train, val, *extra):
    return ["--train", train, "--val", val, "--root", str(tmp_path / "images"), "--arch",
            "resnet8", "--insize", "32", "--val-resize", "36", "--batchsize", "3",
            "--val-batchsize", "4", "--epoch", "1", "--no-progress", "--no-plot", "--out",
            str(tmp_path / "out"), *extra]


def test_missing_and_corrupt_images_are_all_named_before_any_work(photos):
    tmp_path, entries = photos
    root = tmp_path / "images"
    train_entries = [entry for i, entry in enumerate(entries) if i % 3 != 2]  # 3 classes
    val_entries = entries[2::3]
    missing, corrupt, empty = (root / train_entries[i][0] for i in (1, 4, 7))
    os.remove(missing)
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    empty.write_bytes(b"")
    train = list_file(tmp_path / "train.txt", train_entries)
    val = list_file(tmp_path / "val.txt", val_entries)
    status, output = run_training(image_args(tmp_path, train, val), 2)
    assert status == 2, output
    assert (f"train_imagenet.py: error: 1 image file cannot be read: --train: image file not "
            f"found: {missing}; fix or remove it") in output, output
    assert not (tmp_path / "out").exists()
    status, output = run_training(image_args(tmp_path, train, val, "--verify-images"), 2)
    assert status == 2, output
    assert "train_imagenet.py: error: 3 image files cannot be read: " in output, output
    for path in (missing, corrupt, empty):
        assert str(path) in output, output
    assert not (tmp_path / "out").exists()

    # --skip-corrupt: the run goes past them, in training and validation alike
    os.remove(root / val_entries[0][0])
    status, output = run_training(image_args(tmp_path, train, val, "--skip-corrupt",
                                             "--verify-images"), 2)
    assert status == 0, output
    assert "--skip-corrupt: 4 unreadable image file(s) will be gone past" in output, output
    assert "train_imagenet.py: finished" in output, output


def test_a_label_outside_the_declared_classes_is_named(photos):
    tmp_path, entries = photos
    train = tmp_path / "train.txt"
    list_file(train, entries[:6] + [(entries[6][0], 4000)])
    val = list_file(tmp_path / "val.txt", entries[2::3])
    status, output = run_training(image_args(tmp_path, str(train), val), 2)
    assert status == 2, output
    assert (f"--train {train}: the largest label is 4000, so the model would have 4001 classes, "
            "but 3999 of them have no example") in output, output
    status, output = run_training(image_args(tmp_path, str(train), val, "--n-class", "3"), 2)
    assert status == 2, output
    assert (f"{train}:7: label 4000 is outside the class range [0, 3)") in output, output


def test_an_unreadable_validation_image_stops_after_the_epochs_checkpoint(photos):
    tmp_path, entries = photos
    train = list_file(tmp_path / "train.txt", [e for i, e in enumerate(entries) if i % 3 != 2])
    val_entries = entries[2::3]
    val = list_file(tmp_path / "val.txt", val_entries)
    corrupt = tmp_path / "images" / val_entries[3][0]
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")  # it exists: only decoding finds it
    out = tmp_path / "out"
    args = image_args(tmp_path, train, val, "--epoch", "2")
    status, output = run_training(args, 2)
    assert status == 2, output
    snapshot = out / "snapshot_iter_000002"
    assert re.search(rf"train_imagenet.py: validation: corrupt image {re.escape(str(corrupt))}: "
                     rf".*; the training state is in {re.escape(str(snapshot))}: fix the file "
                     rf"\(or pass --skip-corrupt\) and continue with --resume "
                     rf"{re.escape(str(out))}", output), output
    assert latest(out) == str(snapshot)
    status, output = run_training(args + ["--resume", str(out), "--skip-corrupt"], 2)
    assert status == 0, output
    assert "resumed at iteration 2" in output and "train_imagenet.py: finished" in output


def test_a_factor_kfac_cannot_invert_stops_the_run_on_every_rank(tmp_path):
    out = tmp_path / "run"
    # lr x 1e40 from iteration 19: NaN weights, then NaN factors at the next refresh; with a
    # log interval of 6 the weights are not checked before the inversion fails
    status, output = run_training(tiny(2, "--out", str(out), "--log-interval", "6",
                                       "--stale-warmup", "40", "--lr-schedule", "step",
                                       "--lr-milestones", "1.5", "--lr-decay-rate", "1e40"), 2)
    assert status == 1, output
    assert re.search(r"train_imagenet.py: (rank \d: )?K-FAC could not invert a factor \(K-FAC: "
                     r"cannot invert the factor of /predictor/\S+ even with damping .*\) at "
                     r"iteration \d+ .*; stopping without writing a checkpoint: the last good "
                     rf"checkpoint is {re.escape(str(out / 'snapshot_iter_000012'))}", output), \
        output
    assert latest(out) == str(out / "snapshot_iter_000012")
