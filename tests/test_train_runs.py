"""train_imagenet.py end to end, started as a user starts it (python, or mpiexec -n 2).

A tiny MNIST run (192 examples, global batch 16: 12 iterations per epoch, 2 epochs, a log
record every iteration) is the reference; runs that are killed, signalled or resumed must
reproduce its per-iteration losses and final weights.  Faults and bad input must stop with a
clear message and leave every checkpoint intact.  Real JPEG folders with resnet18 run a few
iterations here and a whole epoch in the slow test, next to the slow 5-minute default run.
"""
import hashlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kfac_mn import backend
from kfac_mn.communicators.mpiexec import launched_rank
from kfac_mn.optimizers import MomentumSGD
from models import archs
from tests.test_communicators import mpi_command, mpi_library, run_mpi
from utils.data.sample_photos import write_photo_tree
from utils.training import checkpoint, snapshot_reader
from utils.training.log import read_log
from utils.training.step import MeteredClassifier

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train_imagenet.py"
ITERATIONS_PER_EPOCH = 12
TOTAL = 2 * ITERATIONS_PER_EPOCH


def latest(out):
    """The snapshot folder ``out/latest.json`` names."""
    return os.path.join(str(out), checkpoint.latest_name(str(out)))


def tiny(ranks, *extra):
    """The tiny run: the same global batch (16) on any number of ranks; stale statistics
    from step 4 on, so that the schedule's state crosses the checkpoints too."""
    return ["--train-size", "192", "--val-size", "64", "--val-batchsize", "32", "--epoch", "2",
            "--batchsize", str(16 // ranks), "--log-interval", "1", "--seed", "3",
            "--stale-warmup", "4", "--no-progress", "--no-plot", *extra]


def command(args, ranks):
    """``(command, env)`` of the run: plain python on one rank, else the launcher of mpi4py's
    MPI with its settings."""
    if ranks == 1:
        return [sys.executable, str(SCRIPT), *args], dict(os.environ)
    return mpi_command(ranks, [sys.executable, str(SCRIPT), *args])


def start(args, ranks=1, threads="1"):
    argv, env = command(args, ranks)
    if threads is not None:
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def rank_process(process, rank):
    """The psutil process of ``rank`` among the descendants of ``process`` (mpiexec)."""
    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if launched_rank(child.environ()) == rank and "python" in child.name():
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} under mpiexec")


def kill_tree(process, signum=signal.SIGKILL):
    """Send ``signum`` to the process and all its descendants (mpiexec, proxies, ranks)."""
    import psutil

    try:
        members = [psutil.Process(process.pid)]
        members += members[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for member in members:
        try:
            member.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def finish(process, timeout=240):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(process.args)} did not finish within {timeout} s:\n{output}")
    return process.returncode, output


def run_training(args, ranks=1, timeout=240, threads="1"):
    return finish(start(args, ranks, threads), timeout)


def wait_for_iteration(out, iteration, process, timeout=120):
    """Wait until rank 0 has logged ``iteration`` (the run must still be going)."""
    log = out / "log.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and any(record["iteration"] >= iteration
                                 for record in read_log(str(log))):
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before iteration {iteration}:\n{process.stdout.read()}")
        time.sleep(0.02)
    kill_tree(process)
    pytest.fail(f"no iteration {iteration} in {log} within {timeout} s")


def losses(out):
    return {record["iteration"]: record["main/loss"] for record in read_log(str(out / "log.jsonl"))}


def snapshot_arrays(out):
    """{rank file: {key: array}} of the latest snapshot of ``out``."""
    directory = latest(out)
    arrays = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".npz"):
            with np.load(os.path.join(directory, name)) as npz:
                arrays[name] = {key: npz[key] for key in npz.files}
    return directory, arrays


def assert_same_run(out, reference, total=TOTAL):
    """Per-iteration losses within 1e-6 and the same final model and optimizer state."""
    expected, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, total + 1))
    assert max(abs(got[i] - expected[i]) for i in expected) <= 1e-6
    reference_dir, reference_arrays = snapshot_arrays(reference)
    directory, arrays = snapshot_arrays(out)
    assert os.path.basename(directory) == os.path.basename(reference_dir)
    assert sorted(arrays) == sorted(reference_arrays)
    for name, stored in arrays.items():
        for key, value in reference_arrays[name].items():
            if key.startswith(("model/", "optimizer/")):
                np.testing.assert_allclose(stored[key], value, rtol=0, atol=1e-6,
                                           err_msg=f"{name}: {key}")


def file_digests(directory):
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(pathlib.Path(directory).rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """``references(ranks)``: the output directory of the uninterrupted tiny run."""
    done = {}

    def reference(ranks):
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"reference_{ranks}_ranks")
            status, output = run_training(tiny(ranks, "--out", str(out)), ranks)
            assert status == 0, output
            done[ranks] = out
        return done[ranks]

    return reference


# -- exact resume --------------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.mpi)])
def test_killed_after_epoch_1_and_resumed_it_equals_the_uninterrupted_run(tmp_path, references,
                                                                           ranks):
    reference = references(ranks)
    out = tmp_path / "run"
    process = start(tiny(ranks, "--out", str(out)), ranks)
    wait_for_iteration(out, ITERATIONS_PER_EPOCH + 2, process)
    assert process.poll() is None, "the run ended before it could be killed"
    kill_tree(process, signal.SIGKILL)
    process.communicate()
    assert latest(out) == str(out / "snapshot_iter_000012")

    status, output = run_training(tiny(ranks, "--out", str(out), "--resume", str(out)), ranks)
    assert status == 0, output
    assert f"resumed at iteration {ITERATIONS_PER_EPOCH}" in output
    assert_same_run(out, reference)
    assert output.count("train_imagenet.py: finished") == 1  # rank 0 only


@pytest.mark.parametrize("ranks, signum", [
    (1, signal.SIGINT), pytest.param(2, signal.SIGTERM, marks=pytest.mark.mpi)])
def test_a_stop_signal_writes_a_checkpoint_then_exits_and_the_run_resumes_exactly(
        tmp_path, references, ranks, signum):
    reference = references(ranks)
    out = tmp_path / "run"
    process = start(tiny(ranks, "--out", str(out)), ranks)
    wait_for_iteration(out, 5, process)
    # one rank only, as a node's signal might reach it: the ranks agree at the next update
    # (Open MPI's mpiexec would forward a signal to it about a second late, after this run)
    os.kill(process.pid if ranks == 1 else rank_process(process, 1).pid, signum)
    status, output = finish(process)
    found = re.search(r"received (SIG\w+)( \(on rank 1\))?: wrote the checkpoint (\S+) at "
                      r"iteration (\d+); continue with --resume (\S+)", output)
    assert found, output
    assert found.group(1) == signum.name and found.group(5) == str(out)
    assert bool(found.group(2)) == (ranks > 1)  # the signal reached rank 1 only
    iteration = int(found.group(4))
    assert 5 <= iteration < TOTAL
    assert status == 128 + signum, output  # on every rank, as the launcher reports it
    assert latest(out) == found.group(3) == str(
        out / checkpoint.snapshot_name(iteration))

    status, output = run_training(tiny(ranks, "--out", str(out), "--resume", str(out)), ranks)
    assert status == 0, output
    assert_same_run(out, reference)


@pytest.mark.mpi
def test_sigterm_to_mpiexec_of_two_ranks_checkpoints_and_the_run_resumes_exactly(tmp_path):
    """SIGTERM to the launcher itself, as a user or a scheduler sends it, under whichever MPI
    runs the tests (Open MPI's mpiexec forwards it about a second late: the run is longer)."""
    args = tiny(2, "--train-size", "6400", "--epoch", "1")
    total = 400  # 6,400 examples / global batch 16: seconds, longer than Open MPI's delay
    reference = tmp_path / "reference"
    status, output = run_training(args + ["--out", str(reference)], 2)
    assert status == 0, output
    out = tmp_path / "run"
    process = start(args + ["--out", str(out)], 2)
    wait_for_iteration(out, 10, process)
    os.kill(process.pid, signal.SIGTERM)
    status, output = finish(process)
    found = re.search(r"received SIGTERM: wrote the checkpoint (\S+) at iteration (\d+)", output)
    assert found, output
    # every rank exits with 143; MPICH's mpiexec reports that, Open MPI's a plain 1
    assert status == (128 + signal.SIGTERM if mpi_library() == "mpich" else status) != 0
    assert "should the launcher end the job before it is complete" in output
    assert latest(out) == found.group(1)
    status, output = run_training(args + ["--out", str(out), "--resume", str(out)], 2)
    assert status == 0, output
    assert f"resumed at iteration {found.group(2)}" in output
    assert_same_run(out, reference, total)


# -- the update and validation steps ----------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_acc_iters_2_with_batch_b_is_batch_2b_and_validation_adds_up_over_ranks(ranks):
    status, output, _ = run_mpi("train_check_steps.py", ranks, timeout=180)
    assert status == 0, output
    assert f"harness step checks passed on {ranks} ranks" in output, output


# -- faults ---------------------------------------------------------------------------------
def test_a_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # from epoch 1 on the lr is 1e39: inf in float32, so update 13 makes the weights NaN,
    # which the check after each logged update finds (before the next loss is NaN)
    args = tiny(1, "--out", str(out), "--optimizer", "sgd", "--lr-schedule", "step",
                "--lr-milestones", "1", "--lr-decay-rate", "1e40")
    status, output = run_training(args)
    assert status == 1, output
    good = out / "snapshot_iter_000012"
    assert re.search(r"train_imagenet.py: the weights are not finite \(/predictor/\S+, .*\) at "
                     r"iteration 13 \(epoch 1.08\); stopping without writing a checkpoint: "
                     rf"the last good checkpoint is {re.escape(str(good))}", output), output
    assert latest(out) == str(good)
    assert sorted(os.listdir(out)) == ["latest.json", "log.jsonl", "options.json", good.name]
    classifier = MeteredClassifier(archs["resnet_mnist"]())
    optimizer = MomentumSGD().setup(classifier)
    state = snapshot_reader.load_snapshot(str(good), snapshot_reader.read_meta(str(good)), 0,
                                          checkpoint.RankSnapshot(classifier, optimizer))
    assert state["iteration"] == 12 and optimizer.t == 12
    assert all(np.isfinite(param.data).all() for param in classifier.params())


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ["--config", str(tmp / "run.json")],
     "{tmp}/run.json: unknown key 'bachsize'; valid keys: acc_iters, arch, assignment, "),
    (lambda tmp: ["--train", "/nonexistent/train", "--val", "/nonexistent/val"],
     "--train /nonexistent/train: no such file or directory"),
    (lambda tmp: ["--train", str(tmp / "train.txt"), "--val", str(tmp / "train.txt"),
                  "--root", str(tmp)],
     "{tmp}/train.txt:2: label 'cat' is not an integer"),
    (lambda tmp: ["--arch", "resnet99"], "argument --arch: invalid choice: 'resnet99'"),
    (lambda tmp: ["--batchsize", "32", "--global-batch", "100"],
     "--global-batch 100 is not a multiple of workers x batchsize = 1 x 32 = 32"),
    (lambda tmp: ["--communicator", "nccl"],
     "--communicator nccl needs --gpu (NCCL moves CuPy arrays)"),
    pytest.param(lambda tmp: ["--gpu"], "--gpu needs CuPy and a visible CUDA device",
                 marks=pytest.mark.skipif(backend.gpu_available(), reason="a GPU is here")),
    pytest.param(lambda tmp: ["--communicator", "nccl", "--gpu"],
                 "--communicator nccl needs CuPy with NCCL, and CuPy is not installed (pip "
                 "install 'kfac_mn[gpu]' or cupy-cudaXXx); leave out --communicator nccl (and "
                 "--gpu) to run on the CPU over MPI",
                 marks=pytest.mark.skipif(backend.cupy_available, reason="CuPy is here")),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, make_args, message):
    (tmp_path / "run.json").write_text('{"batchsize": 8, "bachsize": 8}')
    (tmp_path / "train.txt").write_text("a.jpg 0\nb.jpg cat\n")
    out = tmp_path / "out"
    status, output = run_training(make_args(tmp_path) + ["--out", str(out)])
    assert status == 2, output
    assert f"train_imagenet.py: error: {message.format(tmp=tmp_path)}" in output
    assert not out.exists()


@pytest.mark.mpi
def test_a_batch_that_does_not_divide_is_reported_once_under_mpiexec(tmp_path):
    status, output = run_training(["--batchsize", "64", "--global-batch", "96", "--out",
                                   str(tmp_path / "out")], ranks=2)
    assert status != 0
    assert output.count("train_imagenet.py: error: --global-batch 96 is not a multiple of "
                        "workers x batchsize = 2 x 64 = 128") == 1, output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, saved", [("--arch", "resnet8", "resnet_mnist"),
                                                ("--optimizer", "sgd", "kfac")])
def test_resuming_another_arch_or_optimizer_is_an_error_that_changes_nothing(
        tmp_path, references, flag, value, saved):
    reference = references(1)
    before = file_digests(reference)
    status, output = run_training(tiny(1, "--out", str(tmp_path / "out"), "--resume",
                                       str(reference), flag, value))
    assert status == 2, output
    assert (f"train_imagenet.py: error: --resume {latest(reference)}: the checkpoint was "
            f"written with {flag} {saved} (this run: {value})") in output
    assert file_digests(reference) == before
    assert not (tmp_path / "out").exists()


# -- logs and plots ---------------------------------------------------------------------------
def test_the_log_has_every_field_and_plot_log_redraws_and_overlays_runs(tmp_path, references):
    reference = references(1)
    records = read_log(str(reference / "log.jsonl"))
    assert [record["iteration"] for record in records] == list(range(1, TOTAL + 1))
    last = records[-1]
    for key in ("epoch", "elapsed_time", "main/loss", "main/accuracy", "validation/main/loss",
                "validation/main/accuracy", "validation/main/accuracy_top5", "lr", "momentum",
                "damping", "kfac/intervals", "kfac/due_layers", "images_per_second",
                "bytes_sent", "bytes_received", "seconds/1_compute_local_statistics",
                "seconds/3_precondition_owned_layers"):
        assert key in last, key
    assert last["epoch"] == 2.0 and last["lr"] < records[0]["lr"]
    validated = [r["iteration"] for r in records if "validation/main/accuracy" in r]
    assert validated == [ITERATIONS_PER_EPOCH, TOTAL]

    plots = tmp_path / "plots"
    done = subprocess.run([sys.executable, "scripts/plot_log.py", str(reference / "log.jsonl"),
                           str(reference / "log.jsonl"), "--labels", "kfac", "again", "--out",
                           str(plots)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(plots / "loss.png"), str(plots / "accuracy.png"),
                                   str(plots / "stages.png")]
    for name in ("loss.png", "accuracy.png", "stages.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run([sys.executable, "scripts/plot_log.py", str(reference / "log.jsonl"),
                           "--labels", "a", "b"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--labels has 2 names for 1 logs" in done.stderr


# -- real JPEGs with resnet18 -------------------------------------------------------------------
def jpeg_run(tmp_path, classes, per_class, insize, extra):
    write_photo_tree(str(tmp_path / "train"), classes, per_class, seed=1, long_side=(48, 80))
    write_photo_tree(str(tmp_path / "val"), classes, max(2, per_class // 4), seed=2,
                     long_side=(48, 80))
    out = tmp_path / "out"
    args = ["--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--arch",
            "resnet18", "--insize", str(insize), "--epoch", "1", "--val-batchsize", "8",
            "--mixup-alpha", "0.4", "--erasing-prob", "0.5", "--comm-dtype", "float16",
            "--skip-corrupt", "--out", str(out), *extra]
    return out, run_training(args, ranks=2, timeout=900)


def assert_finished_jpeg_run(out, status, output, iterations):
    assert status == 0, output
    records = read_log(str(out / "log.jsonl"))
    assert records[-1]["iteration"] == iterations and records[-1]["epoch"] == 1.0
    assert 0 <= records[-1]["validation/main/accuracy"] <= 1
    assert np.isfinite(records[-1]["main/loss"])
    assert f"  log:        {out / 'log.jsonl'}" in output
    assert (f"  plots:      {out / 'loss.png'}, {out / 'accuracy.png'}, {out / 'stages.png'}"
            in output)
    assert "where an update's time went (rank 0, mean of" in output
    assert f"  checkpoint: {out / checkpoint.snapshot_name(iterations)}" in output
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()


@pytest.mark.mpi
def test_resnet18_on_a_folder_of_jpegs_under_two_ranks_a_few_iterations(tmp_path):
    # 4 classes x 6 photos, global batch 8: 3 iterations.  SGD: the K-FAC inverses of
    # resnet18 (three 4609 x 4609 factors) take about a minute on two cores, which the slow
    # test below spends
    out, (status, output) = jpeg_run(tmp_path, 4, 6, 32, ["--batchsize", "4", "--optimizer",
                                                          "sgd"])
    assert_finished_jpeg_run(out, status, output, 3)


@pytest.mark.slow
@pytest.mark.mpi
def test_resnet18_on_a_folder_of_jpegs_under_two_ranks_one_epoch(tmp_path):
    # 10 classes x 16 photos at 64 x 64, global batch 16 (10 iterations) with 2 loader workers
    # per rank; K-FAC inverts its factors at the first step only
    out, (status, output) = jpeg_run(tmp_path, 10, 16, 64, [
        "--batchsize", "8", "--loaderjob", "2", "--stat-schedule", "fixed",
        "--factor-interval", "10", "--inverse-interval", "10"])
    assert_finished_jpeg_run(out, status, output, 10)


# -- the default run (the README's first command) -----------------------------------------------
@pytest.mark.slow
@pytest.mark.mpi
def test_the_default_run_reaches_98_5_percent_within_5_minutes(tmp_path):
    started = time.monotonic()
    status, output = run_training(["--out", str(tmp_path / "result")], ranks=2, timeout=900,
                                  threads=None)
    seconds = time.monotonic() - started
    assert status == 0, output
    accuracy = float(re.search(r"validation top-1 ([0-9.]+)", output).group(1))
    print(f"\ndefault run: {seconds:.0f} s, validation top-1 {accuracy:.4f}, load average "
          f"{os.getloadavg()[0]:.1f}")
    assert accuracy >= 0.985
    assert seconds <= 300


def test_the_epoch_summary_averages_the_whole_epoch_and_names_a_partial_one(tmp_path):
    out = tmp_path / "run"
    # log records after iterations 5, 10 and 12: the summary is their mean by examples
    status, output = run_training(tiny(1, "--out", str(out), "--epoch", "1",
                                       "--log-interval", "5"))
    assert status == 0, output
    records = read_log(str(out / "log.jsonl"))
    assert [r["iteration"] for r in records] == [5, 10, 12]
    mean = (5 * records[0]["main/loss"] + 5 * records[1]["main/loss"]
            + 2 * records[2]["main/loss"]) / 12
    found = re.search(r"epoch 1 \(iteration 12\): loss (\S+) accuracy", output)
    assert found and float(found.group(1)) == pytest.approx(mean, abs=1e-4), output
    status, output = run_training(tiny(1, "--out", str(tmp_path / "short"), "--epoch", "0.3"))
    assert status == 0, output
    assert re.search(r"\nepoch 0.33 \(iteration 4\): loss ", output), output


@pytest.mark.mpi
def test_batched_inversion_trains_as_one_factor_at_a_time(tmp_path):
    """--batched-inversion reaches DistributedKFAC on every rank and changes no step beyond
    rounding: the tiny run on two ranks (float64 inverses, so that float32 rounding of the
    two ways does not grow over 24 steps), logged losses compared step by step."""
    losses = {}
    for flag in ("--no-batched-inversion", "--batched-inversion"):
        out = tmp_path / flag
        status, output = run_training(tiny(2, "--out", str(out), "--inv-dtype", "float64",
                                           flag), ranks=2)
        assert status == 0, output
        losses[flag] = [r["main/loss"] for r in read_log(str(out / "log.jsonl"))]
    np.testing.assert_allclose(losses["--batched-inversion"], losses["--no-batched-inversion"],
                               rtol=1e-5)
    assert len(losses["--batched-inversion"]) == 24
