"""The pieces of train_imagenet.py that need no MPI job: checkpoints, logs, progress bar,
plots, stop signals, micro-batches, data subsets and BLAS threads."""
import io
import json
import os
import random
import signal

import numpy as np
import pytest

from kfac_mn.optimizers import MomentumSGD
from models import archs
from utils.training import checkpoint
from utils.training.blas_threads import share_cores_between_ranks
from utils.training.datasets import FirstExamples
from utils.training.log import IntervalMeter, LogWriter, interval_summary, read_log
from utils.training.progress import ProgressBar
from utils.training.step import MeteredClassifier, micro_batches
from utils.training.stop_signals import StopSignals


class OneRank:
    """What write_snapshot needs of a communicator, for a single process."""

    rank, size = 0, 1

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


def test_snapshot_round_trip_restores_model_optimizer_state_and_rngs(tmp_path):
    classifier, optimizer = model_and_optimizer(0)
    train_one_step(classifier, optimizer, 1)
    np.random.seed(5)
    random.seed(6)
    state = {"iteration": 1, "rng": checkpoint.rng_states(), "loader": {"epoch": 0}}
    expected_draws = (np.random.random(3).tolist(), random.random())
    directory = checkpoint.write_snapshot(str(tmp_path), OneRank(),
                                          checkpoint.RankSnapshot(classifier, optimizer, state),
                                          meta(1))
    assert directory == str(tmp_path / "snapshot_iter_000001")

    restored, restored_optimizer = model_and_optimizer(1)  # other weights
    snapshot = checkpoint.RankSnapshot(restored, restored_optimizer)
    loaded = checkpoint.load_snapshot(checkpoint.find_snapshot(str(tmp_path)), 0, snapshot)
    assert loaded == json.loads(json.dumps(state))
    for (path, a), (_, b) in zip(classifier.namedparams(), restored.namedparams()):
        assert np.array_equal(a.data, b.data), path
        assert np.array_equal(a.update_rule.state["v"], b.update_rule.state["v"]), path
    assert restored_optimizer.t == 1
    np.random.seed(0)
    random.seed(0)
    checkpoint.set_rng_states(loaded["rng"])
    assert (np.random.random(3).tolist(), random.random()) == expected_draws


def test_a_new_snapshot_replaces_the_old_one_only_once_it_is_complete(tmp_path):
    classifier, optimizer = model_and_optimizer(0)
    out = str(tmp_path)
    first = checkpoint.write_snapshot(out, OneRank(),
                                      checkpoint.RankSnapshot(classifier, optimizer, {}), meta(4))
    # a snapshot that a crash left without meta.json is never the latest, and is cleaned up
    os.makedirs(tmp_path / "snapshot_iter_000006")
    assert checkpoint.find_snapshot(out) == first
    second = checkpoint.write_snapshot(out, OneRank(),
                                       checkpoint.RankSnapshot(classifier, optimizer, {}),
                                       meta(8))
    assert checkpoint.find_snapshot(out) == second == checkpoint.latest_snapshot(out)
    assert sorted(os.listdir(out)) == ["latest.json", "snapshot_iter_000008"]
    assert sorted(os.listdir(second)) == ["meta.json", "rank_0.npz"]
    assert checkpoint.find_snapshot(second) == second


def test_resume_errors_name_the_checkpoint_and_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume .*: no checkpoint there"):
        checkpoint.find_snapshot(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        checkpoint.find_snapshot(str(tmp_path / "missing"))
    classifier, optimizer = model_and_optimizer(0)
    directory = checkpoint.write_snapshot(str(tmp_path), OneRank(),
                                          checkpoint.RankSnapshot(classifier, optimizer, {}),
                                          meta(2, size=2))
    saved = checkpoint.read_meta(directory)

    class Options:
        arch, optimizer = "resnet8", "sgd"

    checkpoint.check_resumable(directory, saved, Options, 2, 0)
    with pytest.raises(FileNotFoundError, match="rank_1.npz is missing"):
        checkpoint.check_resumable(directory, saved, Options, 2, 1)
    with pytest.raises(ValueError, match="written by 2 workers, this run has 1 .*mpiexec -n 2"):
        checkpoint.check_resumable(directory, saved, Options, 1, 0)
    Options.arch = "resnet20"
    with pytest.raises(ValueError) as error:
        checkpoint.check_resumable(directory, saved, Options, 2, 0)
    assert str(error.value) == (f"--resume {directory}: the checkpoint was written with --arch "
                                "resnet8, this run has --arch resnet20")
    Options.arch, Options.optimizer = "resnet8", "kfac"
    with pytest.raises(ValueError, match="--optimizer sgd, this run has --optimizer kfac"):
        checkpoint.check_resumable(directory, saved, Options, 2, 0)


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "latest.json"
    checkpoint.atomic_write_text(str(path), "one")
    checkpoint.atomic_write_text(str(path), "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["latest.json"]


def test_interval_meter_summarises_and_survives_a_checkpoint():
    meter = IntervalMeter()
    report = {"stages": {"a": {"seconds": 0.2, "collectives": {
        "allgather_v": {"calls": 2, "algorithms": {"native": 1, "two_phase": 1}}}},
        "b": {"seconds": 0.1, "collectives": {"reduce_scatter_v": {
            "calls": 1, "algorithms": {"two_phase": 1}}, "barrier": {"calls": 1}}}},
        "bytes_sent": 10, "bytes_received": 20, "due_layers": 3}
    meter.add((2.0, 3.0, 4.0), report, 0.5)
    copy = IntervalMeter()
    copy.load(json.loads(json.dumps(meter.state())))
    copy.add((6.0, 1.0, 4.0), report, 0.5)
    summary = copy.summary()
    assert summary["main/loss"] == 1.0 and summary["main/accuracy"] == 0.5
    assert summary["images_per_second"] == 8.0
    assert summary["seconds/a"] == pytest.approx(0.2) and summary["bytes_received"] == 40
    assert copy.due_layers == 6 and copy.updates == 2
    # the log names the variable-count algorithms that ran, calls per operation
    assert summary["collectives"] == {"allgather_v": {"native": 2, "two_phase": 2},
                                      "reduce_scatter_v": {"two_phase": 2}}
    copy.reset()
    assert copy.updates == 0 and copy.stage_seconds == {} and copy.algorithms == {}


def test_log_writer_and_reader(tmp_path):
    path = str(tmp_path / "log.jsonl")
    writer = LogWriter(path)
    writer.start([{"iteration": 1, "epoch": 0.5}])
    writer.write({"iteration": 2, "epoch": 1.0, "main/loss": float("nan"),
                  "kfac/intervals": interval_summary({"/a": 4, "/b": 1, "/c": 2})})
    records = read_log(path)
    assert records[1]["main/loss"] == "nan"
    assert records[1]["kfac/intervals"] == {"min": 1, "median": 2.0, "max": 4}
    with open(path, "a") as stream:
        stream.write('{"iteration": 3, "epoch":\n')
    with pytest.raises(ValueError, match=r"log.jsonl:3: not a JSON record"):
        read_log(path)
    with pytest.raises(FileNotFoundError, match="log file not found"):
        read_log(str(tmp_path / "none.jsonl"))


def test_progress_bar_shows_iteration_epoch_loss_lr_and_speed():
    stream = io.StringIO()
    bar = ProgressBar(10, enabled=True, stream=stream, min_interval=0.0)
    bar.update(5, 0.5, 0.25, 0.01, 1234.0)
    bar.message("epoch 1 done")
    text = stream.getvalue()
    assert text.startswith("\r[##########..........]  50.0% iter 5/10 epoch 0.50 loss 0.2500 "
                           "lr 0.01 1234 img/s ETA ")
    assert text.endswith("\nepoch 1 done\n")
    quiet = io.StringIO()
    silent = ProgressBar(10, quiet=True, stream=quiet)
    silent.update(10, 1.0, 0.1, 0.01, 1.0)
    silent.message("nothing")
    assert quiet.getvalue() == ""


def test_plots_are_written_for_one_run_and_for_an_overlay(tmp_path):
    pytest.importorskip("matplotlib")
    from utils.training.plots import plot_runs

    records = [{"iteration": i, "epoch": i / 2, "elapsed_time": i * 3.0,
                "main/loss": 1.0 / i, "main/accuracy": 1 - 0.5 / i} for i in range(1, 5)]
    records[-1].update({"validation/main/loss": 0.3, "validation/main/accuracy": 0.9})
    paths = plot_runs([("kfac", records), ("sgd", records[:2])], str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["loss.png", "accuracy.png"]
    for path in paths:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_stop_signal_is_recorded_and_a_second_sigint_interrupts():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # the first signal stays the reason
        assert stop.signum == signal.SIGTERM
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_micro_batches_split_a_batch_in_order():
    x, t = np.arange(10), np.arange(10) * 2
    parts = micro_batches(x, t, 3)
    assert [len(p[0]) for p in parts] == [3, 4, 3]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), t)


def test_first_examples_is_a_prefix_of_the_dataset():
    class Numbers:
        n_class, channels = 5, 1

        def __len__(self):
            return 10

        def get_image(self, i):
            return f"image {i}"

        def get_label(self, i):
            return i % 5

    prefix = FirstExamples(Numbers(), 4)
    assert len(prefix) == 4 and prefix.get_image(3) == "image 3" and prefix.get_label(3) == 3
    with pytest.raises(IndexError):
        prefix.get_image(4)
    assert prefix.get_image(-1) == "image 3"  # a sequence's negative index, not the wrapped one's
    with pytest.raises(AttributeError):
        prefix.path  # noqa: B018 - MNIST-like data sets have no file paths
    with pytest.raises(ValueError, match="first 11 examples of a dataset of 10"):
        FirstExamples(Numbers(), 11)


def test_ranks_share_the_cores_unless_the_user_chose_thread_counts():
    cores = os.cpu_count()
    environ = {"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "7"}
    assert share_cores_between_ranks(environ) == max(1, cores // 2)
    assert environ["OPENBLAS_NUM_THREADS"] == str(max(1, cores // 2))
    assert environ["OMP_NUM_THREADS"] == "7"
    assert share_cores_between_ranks({"PMI_SIZE": "1"}) is None
    assert share_cores_between_ranks({"OMPI_COMM_WORLD_LOCAL_SIZE": "1"}) is None
