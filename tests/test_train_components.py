"""The pieces of train_imagenet.py that need no MPI job: checkpoints, logs, progress bar,
plots, stop signals, micro-batches, data subsets and BLAS threads."""
import io
import json
import os
import signal

import numpy as np
import pytest

from utils.training import checkpoint
from utils.training.blas_threads import share_cores_between_ranks, usable_cores
from utils.training.datasets import FirstExamples
from utils.training.log import IntervalMeter, LogWriter, interval_summary, read_log
from utils.training.progress import ProgressBar
from utils.training.step import micro_batches
from utils.training.stop_signals import StopSignals


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


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_on_a_terminal_only_and_messages_are_whole_lines():
    terminal = Terminal()
    bar = ProgressBar(10, enabled=True, stream=terminal, min_interval=0.0)
    bar.update(5, 0.5, 0.25, 0.01, 1234.0)
    bar.message("epoch 1 done")
    bar.close()
    text = terminal.getvalue()
    assert " 5/10 " in text and "epoch 0.50 loss 0.2500 lr 0.01 1234 img/s" in text, text
    assert "epoch 1 done\n" in text
    redirected = io.StringIO()  # a log file: no bar, no carriage returns, just the messages
    bar = ProgressBar(10, enabled=True, stream=redirected, min_interval=0.0)
    for iteration in range(1, 11):
        bar.update(iteration, iteration / 10, 0.1, 0.01, 1.0)
    bar.message("epoch 1 done")
    bar.close()
    assert redirected.getvalue() == "epoch 1 done\n"
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


def test_every_process_gets_one_blas_thread_unless_the_user_chose():
    environ = {"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "7"}
    assert share_cores_between_ranks(environ, cores=8) == 1
    assert environ["OPENBLAS_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1"
    assert environ["OMP_NUM_THREADS"] == "7"
    one = {}  # one process, no launcher: the same policy
    assert share_cores_between_ranks(one, cores=6) == 1 and one["OPENBLAS_NUM_THREADS"] == "1"
    # more threads only where asked for, and never more than the process's share
    assert share_cores_between_ranks({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, cores=8,
                                     per_process=4) == 2
    assert share_cores_between_ranks({"MPI_LOCALNRANKS": "4"}, cores=2, per_process=4) == 1


def test_usable_cores_follow_the_affinity_and_a_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")
    assert usable_cores(str(limit)) == affinity
    limit.write_text("150000 100000\n")  # 1.5 CPUs of quota: 2 threads
    assert usable_cores(str(limit)) == min(affinity, 2)
    assert usable_cores(str(tmp_path / "none")) == affinity


def test_the_time_report_weights_each_interval_by_its_updates(tmp_path):
    from utils.training.time_report import format_table, plot_stages, stage_rows

    records = [  # 4 updates, then 1: the means per update weight them 4:1
        {"iteration": 4, "seconds/1_compute": 0.010, "seconds/2_reduce": 0.030,
         "bytes_sent": 400, "bytes_received": 800},
        {"iteration": 5, "seconds/1_compute": 0.060, "seconds/2_reduce": 0.030,
         "bytes_sent": 100, "bytes_received": 200},
        {"iteration": 5, "validation/main/loss": 0.5}]  # a validation record adds nothing
    rows, totals = stage_rows(records)
    assert [row["stage"] for row in rows] == ["1_compute", "2_reduce"]
    assert rows[0]["seconds"] == pytest.approx(0.020) and rows[1]["seconds"] == pytest.approx(0.030)
    assert rows[0]["share"] == pytest.approx(0.4)
    assert totals == pytest.approx({"updates": 5, "seconds": 0.050, "bytes_sent": 100.0,
                                    "bytes_received": 200.0})
    table = format_table(records)
    assert "mean of 5 updates" in table and "1_compute" in table and "40.0%" in table
    assert "sent 100, received 200" in table
    assert format_table([{"iteration": 3}]) == ""
    pytest.importorskip("matplotlib")
    assert os.path.isfile(plot_stages([("run", records)], str(tmp_path), "a title"))


def test_a_plot_title_names_optimizer_workers_batch_model_and_data():
    from utils.training.plots import run_title

    options = {"optimizer": "kfac", "batchsize": 32, "acc_iters": 2, "arch": "resnet50",
               "train": "/data/imagenet/train/"}
    assert run_title(options, 4) == "kfac on 4 worker(s), global batch 256, resnet50, train"
    assert run_title({**options, "train": None}, 1).endswith("resnet50, embedded MNIST")
