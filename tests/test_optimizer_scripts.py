"""scripts/bench_kfac.py, compare_optimizers.py and small_scale_table.py: small runs end to end,
and the accumulation helper against a whole-batch update."""
import json
import os
import subprocess
import sys

import pytest

from kfac_mn import links as L
from models import archs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, timeout=300):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout, json.loads(done.stdout.strip().splitlines()[-1])


def test_bench_kfac_measures_one_stale_cycle():
    out, figures = run_script("scripts/bench_kfac.py", "--arch", "resnet8", "--size", "16",
                              "--n-class", "10", "--batchsize", "2", "--interval", "3",
                              "--steps", "1")
    assert "fixed schedule at interval 3: one refresh + 2 reuse" in out
    stages = figures["stages"]
    # every step refreshes in (a); one step in three in the stale cycle
    assert stages["kfac_every_step"]["inversion"] > 0
    assert 0 < stages["kfac_stale"]["inversion"] < stages["kfac_every_step"]["inversion"]
    assert stages["sgd"]["inversion"] == 0.0 and stages["sgd"]["factors"] == 0.0
    # the seconds are rounded to 4 decimals and the ratio to 3: the ratio of the rounded
    # seconds brackets it (a fast SGD step of 2 ms is only known to 2.5%)
    stale, sgd, half = figures["kfac_stale_s"], figures["sgd_s"], 5e-5
    assert (stale - half) / (sgd + half) - 5e-4 <= figures["stale_ratio"] <= \
        (stale + half) / (sgd - half) + 5e-4
    assert figures["device"] == "CPU" and figures["adaptive"] is False
    # the floor: 2 (O^2 K + O K^2) per weight matrix (bias as one more input column)
    flop = 0
    for _, link in archs["resnet8"](n_class=10).namedlinks():
        if isinstance(link, (L.Convolution2D, L.Linear)):
            out_size = link.W.shape[0]
            in_size = link.W.size // out_size + (getattr(link, "b", None) is not None)
            flop += 2 * (out_size ** 2 * in_size + out_size * in_size ** 2)
    assert figures["precondition_gflop"] == pytest.approx(flop / 1e9, rel=1e-3)
    precondition = stages["kfac_stale"]["precondition"]
    assert 1 + (precondition - half) / (sgd + half) - 5e-4 <= \
        figures["precondition_floor_ratio"] <= 1 + (precondition + half) / (sgd - half) + 5e-4


def test_small_scale_table_runs_every_batch_and_optimizer(tmp_path):
    pytest.importorskip("zarr")
    out, figures = run_script(
        "scripts/small_scale_table.py", "--batchsizes", "256", "512", "--epochs", "2",
        "--train-examples", "512", "--test-examples", "200", "--bn-examples", "256",
        "--evals", "2", "--sgd-lrs", "0.5", "--kfac-lrs", "0.02", "--micro-batch", "300",
        "--out", str(tmp_path))
    rows = figures["rows"]
    assert [(row["batchsize"], row["optimizer"]) for row in rows] == [
        (256, "sgd"), (256, "kfac"), (512, "sgd"), (512, "kfac")]
    assert all(0.0 <= row["final_accuracy"] <= 1.0 and row["train_seconds"] > 0
               for row in rows)
    assert rows[0]["lr"] == pytest.approx(0.5 * (256 / 4096) ** 0.5)  # sqrt scaling
    assert figures["device"].startswith("CPU")
    assert (tmp_path / "small_scale.png").stat().st_size > 0
    saved = json.loads((tmp_path / "small_scale.json").read_text())
    assert saved["rows"] == rows
    assert "one process on CPU" in out


def test_compare_optimizers_preset_sets_defaults_that_flags_override():
    def options(*flags):
        done = subprocess.run([sys.executable, "scripts/compare_optimizers.py", *flags,
                               "--show-options"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    plain = options()
    assert (plain["batchsize"], plain["epochs"], plain["preset"]) == (4096, 20, None)
    cpu = options("--preset", "cpu")
    assert (cpu["batchsize"], cpu["epochs"], cpu["out"]) == (1024, 3, "result/compare_cpu")
    assert cpu["sgd_lrs"] == [0.5, 1.0, 2.0] and cpu["tune_epochs"] == pytest.approx(1 / 3)
    assert options("--preset", "cpu", "--epochs", "5")["epochs"] == 5
