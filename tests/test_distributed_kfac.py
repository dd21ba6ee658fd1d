"""Distributed K-FAC: real MPI jobs (tests/mpi/check_distributed_*.py, the scripts) and the
pure parts (assignment, buffer layout, float16 scaling, step accounting, argument checks)."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import models
from kfac_mn import Chain, Parameter
from kfac_mn import links as L
from kfac_mn.communicators.communicator_base import CommunicatorBase
from kfac_mn.communicators.packing import FLOAT16_SUM_LIMIT
from kfac_mn.fisher import assignment, packed_layout, segment_scaling
from kfac_mn.fisher.schedule import StatisticsSchedule
from kfac_mn.fisher.work_items import build_work_items
from kfac_mn.optimizers import DistributedKFAC
from kfac_mn.optimizers.kfac import build_fisher_blocks
from kfac_mn.optimizers.step_report import format_report, stats_difference
from tests.test_communicators import REPO_ROOT, assert_job_passed, find_mpiexec, run_mpi


# -- real MPI jobs --------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_n_ranks_with_batch_b_equal_one_process_with_batch_n_b(ranks):
    output = assert_job_passed("check_distributed_invariance.py", ranks)
    assert f"invariance checks passed on {ranks} ranks" in output, output


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


def run_script(args, timeout=120):
    if find_mpiexec() is None:
        pytest.skip("no mpiexec (pip install mpich)")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.mpi
def test_trace_dataflow_shows_figure_1_on_two_ranks_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "trace.png"
    result = run_script(["scripts/trace_dataflow.py", "--png", str(png)])
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("1 compute_local_statistics", "2 reduce_scatter_statistics",
                  "3 precondition_owned_layers", "4 allgather_preconditioned_gradients",
                  "5 apply_update"):
        assert f"=== Stage {stage}" in result.stdout, result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ranks"] == 2 and summary["identical_weights"]
    assert sorted(sum(summary["owners"], [])) == ["/conv1", "/conv2", "/fc"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
def test_bench_comm_float16_is_under_0_3_of_full_allreduce_and_bytes_match(capsys):
    result = run_script(["scripts/bench_comm.py", "--steps", "1", "--warmup", "1",
                         "--batch", "8"])
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = summary["computed"]["rows"]
    assert [row["ranks"] for row in rows] == [2, 4, 8, 64, 1024]
    for row in rows:
        assert row["ours_fp16_over_a"] <= 0.3, row
        assert row["c_ours_fp16"] < row["b_authors_fp16"] < row["b_authors_fp32"], row
    assert summary["bytes_match_model"] == {"float32": True, "float16": True}
    stages = summary["measured"]["results"]["float16"][0]["stages"]
    assert "reduce_scatter_v" in stages["2_reduce_scatter_statistics"]["collectives"]
    assert "allgather_v" in stages["4_allgather_preconditioned_gradients"]["collectives"]
    with capsys.disabled():
        print("\n" + "\n".join(result.stdout.splitlines()[:8]))


# -- assignment -------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50_costs():
    np.random.seed(0)
    model = models.archs["resnet50"]()
    items = build_work_items(model, build_fisher_blocks(model))
    return [assignment.estimated_cost(item) for item in items]


def test_greedy_balances_resnet50_on_4_ranks_and_is_optimal_on_8(resnet50_costs):
    costs = resnet50_costs
    assert len(costs) == 107
    owners4 = assignment.assign_balanced(costs, 4)
    assert assignment.imbalance(assignment.loads(costs, owners4, 4)) <= 1.10
    # On 8 ranks the three res5 3x3 convolutions (A: 4608 x 4608, 9.8e10 each) are each
    # larger than the mean load (5.7e10): no per-layer assignment gets below their cost.
    owners8 = assignment.assign_balanced(costs, 8)
    assert max(assignment.loads(costs, owners8, 8)) == assignment.lower_bound(costs, 8)
    assert assignment.lower_bound(costs, 8) / (sum(costs) / 8) > 1.7
    for size, owners in ((4, owners4), (8, owners8)):
        equal = assignment.assign_equal_count(len(costs), size)
        assert (assignment.imbalance(assignment.loads(costs, equal, size))
                > assignment.imbalance(assignment.loads(costs, owners, size)))
    assert assignment.assign_balanced(costs, 8) == owners8  # deterministic


def test_greedy_by_hand_and_with_more_ranks_than_items():
    # 7 -> r0; 5 -> r1; 4 -> r1 (5 < 7); 3 -> r0 (7 < 9); 1 -> r1 (9 < 10): loads 10 / 10
    assert assignment.assign_balanced([7, 5, 4, 3, 1], 2) == [0, 1, 1, 0, 1]
    # ties go to the earlier item and the lowest rank
    assert assignment.assign_balanced([2, 2, 2], 2) == [0, 1, 0]
    owners = assignment.assign_balanced([5, 3, 1], 5)
    assert owners == [0, 1, 2]
    assert assignment.loads([5, 3, 1], owners, 5) == [5, 3, 1, 0, 0]


def test_equal_count_split_is_numpy_array_split():
    assert assignment.assign_equal_count(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    assert assignment.assign_equal_count(2, 4) == [0, 1]


def test_assignment_refuses_bad_sizes_and_methods():
    with pytest.raises(ValueError, match="positive int, got 0"):
        assignment.assign_balanced([1], 0)
    with pytest.raises(ValueError, match="balanced, equal_count, not 'random'"):
        assignment.assign([], 2, "random")


class Small(Chain):
    def __init__(self, bn_fisher_kind_channels=3):
        super().__init__()
        with self.init_scope():
            self.fc = L.Linear(3, 2)
            self.bn = L.BatchNormalization(bn_fisher_kind_channels)
            self.shift = Parameter(np.zeros(2, dtype=np.float32))


@pytest.mark.parametrize("kind, expected", [("diag", 6 + 6 + 6), ("unit", 6 + 24 + 12),
                                            ("full", 6 + 216 + 21)])
def test_estimated_cost_by_hand(kind, expected):
    model = Small()
    items = build_work_items(model, build_fisher_blocks(model, kind))
    by_name = {item.name: item for item in items}
    # Linear 3 -> 2 with bias: gradients 6 + 2; A 4x4: 4^3 + 10; G 2x2: 2^3 + 3
    assert assignment.estimated_cost(by_name["/fc"]) == 8 + 64 + 10 + 8 + 3
    # BN over 3 channels: gradients 6; F (6,): 6 + 6, (3, 2, 2): 8*3 + 12, (6, 6): 216 + 21
    assert assignment.estimated_cost(by_name["/bn"]) == expected
    assert assignment.estimated_cost(by_name["/shift"]) == 2
    assert [item.name for item in items] == ["/bn", "/fc", "/shift"]


# -- packed layout ----------------------------------------------------------------
def test_layout_groups_by_owner_and_round_trips_triangles():
    model = Small()
    items = build_work_items(model, build_fisher_blocks(model, "diag"))  # /bn, /fc, /shift
    bn, fc, shift = items
    owners = [1, 0, 1]
    segments = packed_layout.reduce_scatter_segments(items, owners, ["/fc", "/bn"])
    assert [s.label for s in segments] == [
        "/fc/W grad", "/fc/b grad", "/fc A", "/fc G",            # rank 0
        "/bn/gamma grad", "/bn/beta grad", "/bn F", "/shift grad"]  # rank 1
    assert [s.size for s in segments] == [6, 2, 10, 3, 3, 3, 6, 2]
    assert packed_layout.counts_by_owner(segments, 2) == [21, 14]
    not_due = packed_layout.reduce_scatter_segments(items, owners, [])
    assert packed_layout.counts_by_owner(not_due, 2) == [8, 8]
    gathered = packed_layout.allgather_segments(items, owners)
    assert packed_layout.counts_by_owner(gathered, 2) == [8, 8]

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    fc.block.sums = {"A": x @ x.T, "G": np.eye(2, dtype=np.float32)}
    fc.block.counts = {"A": 4, "G": 4}
    model.fc.W.grad = rng.standard_normal((2, 3)).astype(np.float32)
    model.fc.b.grad = None  # packs as zeros
    buffer = packed_layout.pack(segments[:4], np, np.float32)
    A = x @ x.T
    np.testing.assert_array_equal(buffer, np.concatenate(
        [model.fc.W.grad.ravel(), [0, 0], A[np.triu_indices(4)], [1, 0, 1]]))
    unpacked = dict((s.label, v) for s, v in packed_layout.unpack(buffer, segments[:4]))
    np.testing.assert_array_equal(unpacked["/fc A"], A)  # symmetric again
    np.testing.assert_array_equal(unpacked["/fc/W grad"], model.fc.W.grad)
    bn.block.sums = {"F": np.ones(5, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"/bn: statistic F has shape \(5,\), the layout "
                                         r"expects \(6,\)"):
        packed_layout.pack(segments[6:7], np, np.float32)
    assert packed_layout.pack([], np, np.float16).shape == (0,)
    assert shift.block is None


# -- float16 scaling --------------------------------------------------------------
def test_float16_scales_let_1024_ranks_sum_entries_of_1e6_without_overflow():
    bounds = np.array([1e6, 3e-3, 0.0, 65504.0])
    sizes = [3, 2, 1, 2]
    exponents = segment_scaling.scale_exponents(bounds, 1024, ["a", "b", "c", "d"])
    assert np.all(1024 * bounds * 2.0 ** exponents <= FLOAT16_SUM_LIMIT)
    assert np.all(1024 * bounds[bounds > 0] * 2.0 ** (exponents[bounds > 0] + 1)
                  > FLOAT16_SUM_LIMIT)  # the largest such power of two
    buffer = np.array([1e6, -5e5, 123.0, 3e-3, -1e-3, 0.0, 65504.0, 1.0], dtype=np.float32)
    half = segment_scaling.to_float16(buffer, sizes, exponents)
    assert half.dtype == np.float16 and np.all(np.isfinite(half))
    back = segment_scaling.from_float16(half, sizes, exponents, np.float32)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, buffer, rtol=2.0 ** -11)
    # the worst case: every rank holds the bound; the float16 sum stays finite
    worst = (half[:1].astype(np.float32) * 1024).astype(np.float16)
    assert np.isfinite(worst).all()


def test_float16_scaling_refuses_nan_and_magnitudes_beyond_reach():
    with pytest.raises(FloatingPointError, match="/fc A holds inf or nan"):
        segment_scaling.scale_exponents(np.array([1.0, np.nan]), 2, ["/fc/W grad", "/fc A"])
    with pytest.raises(OverflowError, match="/fc A has magnitude 1e\\+50"):
        segment_scaling.scale_exponents(np.array([1e50]), 2, ["/fc A"])
    tiny = segment_scaling.scale_exponents(np.array([1e-200]), 2, ["x"])
    assert tiny[0] == segment_scaling.MAX_EXPONENT  # clamped: 2^k stays a float32 number


def test_segment_max_abs_per_segment():
    buffer = np.array([1.0, -4.0, 2.0, -0.5, 3.0])
    np.testing.assert_array_equal(segment_scaling.segment_max_abs(buffer, [2, 0, 3]),
                                  [4.0, 0.0, 3.0])


# -- accounting ---------------------------------------------------------------------
def test_stats_difference_keeps_the_operations_called_in_between():
    before = {"allgather_v": {"calls": 1, "bytes_sent": 10, "bytes_received": 20,
                              "seconds": 0.5}}
    after = {"allgather_v": {"calls": 1, "bytes_sent": 10, "bytes_received": 20,
                             "seconds": 0.5},
             "reduce_scatter_v": {"calls": 2, "bytes_sent": 64, "bytes_received": 48,
                                  "seconds": 0.25}}
    assert stats_difference(after, before) == {
        "reduce_scatter_v": {"calls": 2, "bytes_sent": 64, "bytes_received": 48,
                             "seconds": 0.25}}


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
