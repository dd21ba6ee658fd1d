"""Distributed K-FAC: real MPI jobs (tests/mpi/check_distributed_*.py, the scripts) and the
pure parts (assignment, buffer layout, float16 scaling, step accounting, argument checks)."""
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from kfac_mn import Chain
from kfac_mn import links as L
from kfac_mn.communicators.communicator_base import CommunicatorBase
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.optimizers import DistributedKFAC
from kfac_mn.optimizers.step_report import format_report, stats_difference
from tests.test_communicators import REPO_ROOT, assert_job_passed, find_mpiexec, run_mpi
from tests.test_distributed_planning import Small


# -- real MPI jobs --------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_n_ranks_with_batch_b_equal_one_process_with_batch_n_b(ranks):
    output = assert_job_passed("check_distributed_invariance.py", ranks)
    assert f"invariance checks passed on {ranks} ranks" in output, output


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("collectives", ["two_phase", "allreduce"])
def test_world_size_invariance_holds_for_every_collective_algorithm(ranks, collectives):
    output = assert_job_passed("check_distributed_invariance.py", ranks, collectives)
    assert f"invariance checks passed on {ranks} ranks ({collectives} collectives)" in output


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_owners_hold_the_sums_of_the_local_statistics_after_stage_2(ranks):
    output = assert_job_passed("check_distributed_stage2.py", ranks)
    assert f"stage 2 checks passed on {ranks} ranks" in output, output


@pytest.mark.mpi
@pytest.mark.parametrize("case, message", [
    ("model", "rank 1's model differs from rank 0's: ('/fc1/W', (5, 4), 'float32') here, "
              "('/fc1/W', (4, 4), 'float32') on rank 0"),
    # gradients 4*4 + 4 + 3*4 + 3 = 35; triangles A 5x5, G 4x4, A 5x5, G 3x3: 15+10+15+6 = 46
    ("step", "the ranks disagree on the stage-2 buffer ((statistics due, length) per rank: "
             "[[4, 81], [0, 35]])"),
])
def test_ranks_that_disagree_abort_the_job_with_the_reason(case, message):
    status, output, seconds = run_mpi("check_distributed_errors.py", 2, case, timeout=30)
    assert status != 0 and seconds < 30, output
    assert message in output, output
    assert "no error was raised" not in output


@pytest.mark.mpi
def test_an_owner_that_cannot_invert_raises_after_stage_4_so_no_rank_waits():
    status, output, seconds = run_mpi("check_distributed_errors.py", 2, "inversion",
                                      timeout=30)
    assert status == 0 and seconds < 30, output
    for rank, layer in ((0, "/fc1"), (1, "/fc2")):
        assert (f"rank {rank} owns ['{layer}']: InversionError (K-FAC: cannot invert the "
                f"factor of {layer}/A even with damping") in output, output
        assert output.count("went on") == 2, output


def run_script(args, timeout=120):
    if find_mpiexec() is None:
        pytest.skip("no mpiexec for mpi4py's MPI library")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.mpi
def test_trace_dataflow_shows_figure_1_on_two_ranks_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "trace.png"
    result = run_script(["scripts/trace_dataflow.py", "--png", str(png), "--follow", "/fc"])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for stage in ("1 compute_local_statistics", "2 reduce_scatter_statistics",
                  "3 precondition_owned_layers", "4 allgather_preconditioned_gradients",
                  "5 apply_update"):
        assert f"=== Stage {stage}" in out, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["identical_weights"]
    assert summary["followed_identical_after_stage_4"] and summary["follow"] == "/fc"
    assert sorted(sum(summary["owners"], [])) == ["/bn1", "/conv1", "/conv2", "/fc"]
    # the followed gradient: different per rank, the mean at its owner, the same everywhere
    for line in ("local gradients differ between ranks: yes",
                 "the owner's gradient is the mean of the ranks' local gradients: yes",
                 "the owner's sum A is the sum of the ranks' local sums: yes",
                 "the preconditioned gradient is identical on every rank: yes; it equals the "
                 "owner's after stage 3: yes"):
        assert line in out, out
    stage4 = out.split("=== Stage 4")[1].split("=== Stage 5")[0]
    grads = re.findall(r"rank (\d) W.grad: (\|x\| \S+ \[[^]]*\])", stage4)
    assert len(grads) == 2 and grads[0][1] == grads[1][1], stage4
    stage1 = out.split("=== Stage 1")[1].split("=== Stage 2")[0]
    local = re.findall(r"rank \d W.grad: (\|x\| \S+)", stage1)
    assert len(local) == 2 and local[0] != local[1], stage1
    assert re.search(r"trailer of rank \d: 2 values, \(interval, steps to the next refresh\) "
                     r"of /fc: \[\d+, \d+\]", stage4), stage4
    # what each arrow carries is what the collective counted
    sent = summary["rank0_bytes_sent_per_stage"]
    arrows = re.findall(r"rank 0 -> rank 1: [^\n]*? = ([\d,]+) B", out)
    assert [int(a.replace(",", "")) for a in arrows] == [sent[1]["reduce_scatter_v"],
                                                         sent[3]["allgather_v"]], out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elsewhere = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "trace_dataflow.py")],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert (tmp_path / "result" / "trace_dataflow.png").is_file()  # by default under result/
    bad = run_script(["scripts/trace_dataflow.py", "--follow", "/nope"])
    assert bad.returncode == 2 and "--follow /nope: not a layer" in bad.stderr


@pytest.mark.mpi
def test_bench_comm_float16_is_under_0_3_of_full_allreduce_and_bytes_match():
    result = run_script(["scripts/bench_comm.py", "--steps", "1", "--warmup", "1",
                         "--batch", "8"])
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = summary["computed"]["rows"]
    assert [row["ranks"] for row in rows] == [2, 4, 8, 64, 1024]
    for row in rows:
        assert row["ours_fp16_over_a"] <= 0.3, row
        assert row["c_ours_fp16"] < row["b_authors_fp16"] < row["b_authors_fp32"], row
        assert row["c_two_phase_fp16"] <= row["b_authors_fp16"], row
    assert summary["bytes_match_model"] == {
        f"{name} {dtype}": True for name in ("native", "two_phase", "allreduce")
        for dtype in ("float32", "float16")}
    for run in summary["measured"]["runs"]:
        stages = run["per_rank"][0]["stages"]
        rs = stages["2_reduce_scatter_statistics"]["collectives"]
        ag = stages["4_allgather_preconditioned_gradients"]["collectives"]
        assert rs["reduce_scatter_v"]["algorithms"] == {run["collectives"]: 1}, rs
        assert ag["allgather_v"]["algorithms"] == {run["collectives"]: 1}, ag


# -- accounting ---------------------------------------------------------------------
def test_stats_difference_keeps_the_operations_called_in_between():
    before = {"allgather_v": {"calls": 1, "bytes_sent": 10, "bytes_received": 20,
                              "seconds": 0.5}}
    after = {"allgather_v": {"calls": 1, "bytes_sent": 10, "bytes_received": 20,
                             "seconds": 0.5},
             "reduce_scatter_v": {"calls": 2, "bytes_sent": 64, "bytes_received": 48,
                                  "messages_sent": 3, "messages_received": 4,
                                  "seconds": 0.25, "algorithms": {"two_phase": 2}}}
    assert stats_difference(after, before) == {
        "reduce_scatter_v": {"calls": 2, "bytes_sent": 64, "bytes_received": 48,
                             "messages_sent": 3, "messages_received": 4, "seconds": 0.25,
                             "algorithms": {"two_phase": 2}}}


def test_format_report_gives_one_log_line_with_seconds_and_bytes_per_stage():
    report = {"step": 3, "stages": {
        "1_compute_local_statistics": {"seconds": 0.0125, "collectives": {}},
        "2_reduce_scatter_statistics": {"seconds": 0.002, "collectives": {
            "allgather_v": {"calls": 1, "bytes_sent": 500, "bytes_received": 500,
                            "seconds": 0.001},
            "reduce_scatter_v": {"calls": 1, "bytes_sent": 1_500_000,
                                 "bytes_received": 1_000_000, "seconds": 0.001}}}}}
    assert format_report(report) == ("step 3: 1_compute_local_statistics 12.5 ms | "
                                     "2_reduce_scatter_statistics 2.0 ms 1.500 MB sent")


# -- argument checks ------------------------------------------------------------------
class NoCollectives(CommunicatorBase):
    """A one-rank communicator for argument checks: any collective fails the test."""

    rank, size, intra_rank, intra_size, inter_rank, inter_size = 0, 1, 0, 1, 0, 1

    def _collective(self, *args, **kwargs):
        raise AssertionError("this check must fail before any communication")

    bcast_data = multi_node_mean_grad = reduce_scatter_v = allgather_v = allreduce = \
        bcast_obj = allreduce_obj = gather_obj = barrier = _collective


def test_distributed_kfac_refuses_bad_arguments_with_clear_errors():
    with pytest.raises(TypeError, match="comm must be a communicator .* got str"):
        DistributedKFAC("mpi")
    with pytest.raises(ValueError, match="comm_dtype must be float16, float32 or float64, "
                                         "not int8"):
        DistributedKFAC(NoCollectives(), comm_dtype=np.int8)
    with pytest.raises(ValueError, match="assignment must be one of balanced, equal_count, "
                                         "not 'by_name'"):
        DistributedKFAC(NoCollectives(), assignment="by_name")
    schedule = StatisticsSchedule("adaptive", max_interval=4096)
    with pytest.raises(ValueError, match="max_interval=4096 is not exact in float16"):
        DistributedKFAC(NoCollectives(), comm_dtype=np.float16, schedule=schedule)


def test_setup_names_the_uninitialised_parameter_and_mixed_dtypes():
    class Lazy(Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.fc = L.Linear(None, 3)

    with pytest.raises(ValueError, match="parameter /fc/W is not initialised"):
        DistributedKFAC(NoCollectives()).setup(Lazy())
    model = Small()
    model.shift.data = model.shift.data.astype(np.float64)
    with pytest.raises(TypeError, match="share one dtype, found float32, float64"):
        DistributedKFAC(NoCollectives()).setup(model)


def test_optimizers_package_exports_distributed_kfac():
    import kfac_mn.optimizers

    assert kfac_mn.optimizers.DistributedKFAC is DistributedKFAC
    assert pathlib.Path(kfac_mn.optimizers.__file__).parent.name == "optimizers"
