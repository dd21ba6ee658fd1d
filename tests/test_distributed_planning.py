"""Distribution planning (kfac_mn.distributed): owners, packed layout, triangles, float16
scaling, the stage-2 agreement and the stage-4 trailer; no communication involved."""
import math

import numpy as np
import pytest

import models
from kfac_mn import Chain, Parameter
from kfac_mn import links as L
from kfac_mn.distributed import (
    agreement,
    assignment,
    packed_layout,
    segment_scaling,
    trailer,
    triangles,
)
from kfac_mn.distributed.segment_scaling import FLOAT16_SUM_LIMIT
from kfac_mn.distributed.work_items import build_work_items
from kfac_mn.fisher import build_fisher_blocks
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule


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


def test_upper_triangle_is_row_major_and_round_trips_exactly():
    matrix = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    np.testing.assert_array_equal(triangles.pack_upper_triangle(matrix), [1, 2, 3, 4, 5, 6])
    rng = np.random.default_rng(0)
    for d in (0, 1, 2, 7, 33):
        x = rng.standard_normal((d, d + 3))
        factor = x @ x.T / 3.0
        packed = triangles.pack_upper_triangle(factor)
        assert packed.shape == (d * (d + 1) // 2,)
        unpacked = triangles.unpack_upper_triangle(packed, d)
        assert unpacked.dtype == np.float64
        np.testing.assert_array_equal(unpacked, factor)


def test_triangle_helpers_refuse_bad_shapes():
    with pytest.raises(ValueError, match=r"expected a square matrix, got shape \(2, 3\)"):
        triangles.pack_upper_triangle(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"a 3x3 triangle has 6 values, got .* \(5,\)"):
        triangles.unpack_upper_triangle(np.zeros(5), 3)


def test_half_scale_is_the_largest_safe_power_of_two():
    for max_abs in (1e-9, 0.3, 1.0, 65504.0, 1e6, 3.7e12):
        for world_size in (1, 3, 4, 1024):
            scale = segment_scaling.half_scale(max_abs, world_size)
            assert math.log2(scale) == int(math.log2(scale))
            assert world_size * max_abs * scale <= segment_scaling.FLOAT16_SUM_LIMIT
            assert world_size * max_abs * scale * 2 > segment_scaling.FLOAT16_SUM_LIMIT
    assert segment_scaling.half_scale(0.0, 8) == 1.0
    with pytest.raises(ValueError, match="inf or nan"):
        segment_scaling.half_scale(float("inf"), 2)


def test_half_round_trip_on_one_rank_is_within_float16_rounding():
    buffer = np.random.default_rng(1).standard_normal(1000) * 1e6
    sizes = [600, 400]
    bounds = segment_scaling.segment_max_abs(buffer, sizes)
    exponents = segment_scaling.scale_exponents(bounds, 1, ["a", "b"])
    half = segment_scaling.encode(buffer, sizes, exponents, np.float16)
    assert half.dtype == np.float16 and np.all(np.isfinite(half))
    restored = segment_scaling.decode(half, sizes, exponents, np.float32)
    assert restored.dtype == np.float32
    assert np.max(np.abs(restored - buffer) / np.abs(buffer)) <= 2.0 ** -11
    # without exponents, encode and decode are plain casts
    assert segment_scaling.encode(buffer, sizes, None, np.float32).dtype == np.float32
    assert segment_scaling.decode(half, sizes, None, np.float64).dtype == np.float64


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


# -- stage-2 agreement and stage-4 trailer ----------------------------------------------
def test_agreement_adds_counts_takes_maxima_and_refuses_disagreeing_headers():
    model = Small()
    items = build_work_items(model, build_fisher_blocks(model, "diag"))  # /bn, /fc, /shift
    owners = [1, 0, 1]
    slots = agreement.agreement_slots(items, owners, np.float16)
    assert sorted(slots["count"]) == [("/bn", "F"), ("/fc", "A"), ("/fc", "G")]
    segments = packed_layout.reduce_scatter_segments(items, owners, ["/fc"])
    fc = items[1]
    fc.block.sums = {"A": np.eye(4, dtype=np.float32), "G": 2 * np.eye(2, dtype=np.float32)}
    fc.block.counts = {"A": 3, "G": 12}
    sendbuf = packed_layout.pack(segments, np, np.float32)
    local = agreement.local_agreement(slots, segments, sendbuf, half=True)
    other = local.copy()
    other[2:] *= 2  # a second rank: twice the counts and bounds
    counts, bounds = agreement.read_agreement(np.stack([local, other]), slots, segments,
                                              True, step=7)
    assert counts == {("/bn", "F"): 0, ("/fc", "A"): 9, ("/fc", "G"): 36}
    by_label = dict(zip([s.label for s in segments], bounds))
    assert by_label["/fc A"] == 2.0 and by_label["/fc G"] == 4.0
    other[1] += 1  # another buffer length
    with pytest.raises(RuntimeError, match=r"step 7: the ranks disagree on the stage-2 buffer"):
        agreement.read_agreement(np.stack([local, other]), slots, segments, True, step=7)


def test_trailer_carries_exponents_and_schedule_state_to_every_rank():
    owner = StatisticsSchedule("adaptive", warmup_steps=0, threshold=0.5, max_interval=8)
    owner.report_change("/fc", 10, 0.1)  # interval 2, next refresh at 12
    values = trailer.build_trailer(np.array([3, -2]), owner, ["/fc", "/bn"], step=11)
    assert values == [3, -2, 2, 1, 0, 0]
    assert trailer.trailer_length(2, ["/fc", "/bn"], half=True) == len(values)
    other = StatisticsSchedule("adaptive", warmup_steps=0, threshold=0.5, max_interval=8)
    exponents = trailer.read_trailer(np.array(values, dtype=np.float16), 1, 2, True, other,
                                     ["/fc", "/bn"], step=11)
    np.testing.assert_array_equal(exponents, [3, -2])
    assert other.layer_state("/fc", 11) == (2, 1) and other.layer_state("/bn", 11) == (0, 0)
    assert other.factors_due("/fc", 12) and not other.factors_due("/fc", 11)
    with pytest.raises(ValueError, match="trailer of rank 1 is not integral"):
        trailer.read_trailer(np.array([0.5]), 1, 1, True, other, [], step=11)
