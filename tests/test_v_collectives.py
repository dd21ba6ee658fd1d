"""The variable-count algorithms' plans, traffic and alpha-beta times by hand
(kfac_mn.communicators.v_collectives); their MPI runs are checked in check_v_collectives.py."""
import pytest

from kfac_mn.communicators import v_collectives as v

COUNTS = [3, 0, 10, 1]  # 14 values on 4 ranks: chunks of k = 4, [0,4) [4,8) [8,12) [12,16)


def test_pieces_cut_every_segment_at_the_chunk_borders():
    assert v.chunk_length(14, 4) == 4 and v.chunk_length(0, 4) == 0
    # (chunk, segment, length, offset in chunk, offset in segment)
    assert v.pieces(COUNTS) == [(0, 0, 3, 0, 0), (0, 2, 1, 3, 0), (1, 2, 4, 0, 1),
                                (2, 2, 4, 0, 5), (3, 2, 1, 0, 9), (3, 3, 1, 1, 0)]
    assert v.pieces([0, 0]) == []


def test_exchange_plan_by_hand_and_against_the_traffic_of_every_rank():
    # ReduceScatterV: rank 2 keeps chunk 2 (values 8..11 = its segment's 5..8) and receives
    # its other pieces; rank 3 sends values 12 of chunk 3 to rank 2 and keeps value 13
    assert v.exchange_plan(COUNTS, 2, True) == (
        [], [(0, 3, 0, 1), (1, 0, 1, 4), (3, 0, 9, 1)], [(2, 0, 5, 4)])
    assert v.exchange_plan(COUNTS, 3, True) == ([(2, 0, 9, 1)], [], [(3, 1, 0, 1)])
    # AllGatherV is the mirror: rank 3 receives value 9 of segment 2 from its owner into
    # chunk 3 and copies its own value to the chunk's second place
    assert v.exchange_plan(COUNTS, 3, False) == ([], [(2, 9, 0, 1)], [(3, 0, 1, 1)])
    for counts in (COUNTS, [0, 0, 0], [1, 2, 3, 40, 0, 5], [9, 0]):
        for to_owners in (True, False):
            by_rank = v.exchange_traffic(counts, 2, to_owners)
            for rank in range(len(counts)):
                sends, receives, _ = v.exchange_plan(counts, rank, to_owners)
                assert by_rank[rank] == v.Traffic(
                    2 * sum(p[3] for p in sends), 2 * sum(p[3] for p in receives),
                    len(sends), len(receives))


def test_two_phase_traffic_by_hand():
    # rank 2 owns segment 2 (10 values) and holds chunk 2 = values 8..11, all its own: the
    # ring moves 3 messages of 4 float32 each way; it receives its pieces from chunks 0, 1, 3
    assert v.traffic("two_phase", "reduce_scatter_v", COUNTS, 4, 2) == v.Traffic(
        48, 48 + 24, 3, 3 + 3)
    # rank 1 owns nothing and sends chunk 1 (4 values of segment 2) to rank 2
    assert v.traffic("two_phase", "reduce_scatter_v", COUNTS, 4, 1) == v.Traffic(
        48 + 16, 48, 3 + 1, 3)
    # the all-gather is the mirror: rank 2 sends its pieces to chunks 0, 1 and 3
    assert v.traffic("two_phase", "allgather_v", COUNTS, 4, 2) == v.Traffic(
        48 + 24, 48, 3 + 3, 3)
    assert v.traffic("two_phase", "reduce_scatter_v", [5], 8, 0) == v.Traffic()


def test_native_and_allreduce_follow_the_ring_model():
    # ring reduce-scatter: sent B - s_r, received B - s_(r-1), bytes of float32
    assert v.traffic("native", "reduce_scatter_v", COUNTS, 4, 2) == v.Traffic(16, 56, 3, 3)
    # all-reduce of 14 values split 4/4/3/3: (B - s_r) + (B - s_(r+1)) each way
    assert v.traffic("allreduce", "allgather_v", COUNTS, 4, 0) == v.Traffic(
        (56 - 16) + (56 - 16), (56 - 12) + (56 - 16), 6, 6)


def test_seconds_by_hand_and_auto_picks_the_cheapest():
    # alpha 1 s, 4 bytes/s, float32 (one value per second)
    assert v.seconds("native", "reduce_scatter_v", COUNTS, 4, 1.0, 4.0) == 3 * (1 + 10)
    assert v.seconds("allreduce", "reduce_scatter_v", COUNTS, 4, 1.0, 4.0) == 6 * (1 + 3.5)
    # ring 3 (1 + 4); the slowest exchange is rank 2's: 3 messages and 6 values in
    assert v.seconds("two_phase", "reduce_scatter_v", COUNTS, 4, 1.0, 4.0) == 15 + 3 + 6
    # two library calls (the equal chunks, the redistribution), each with its overhead
    assert v.seconds("two_phase", "reduce_scatter_v", COUNTS, 4, 1.0, 4.0,
                     call_overhead=0.5) == 25.0
    assert v.seconds("native", "reduce_scatter_v", COUNTS, 4, 1.0, 4.0,
                     call_overhead=0.5) == 33.5
    assert v.choose("reduce_scatter_v", COUNTS, 4, 1.0, 4.0) == "two_phase"
    # two equal segments: native is one step, two_phase one step and nothing to send; tie
    # goes to native
    assert v.choose("allgather_v", [4, 4], 4, 1.0, 4.0) == "native"
    assert v.choose("allgather_v", COUNTS, 4, 1.0, 4.0, allowed=("native", "allreduce")) == \
        "allreduce"
    assert v.seconds("native", "allgather_v", [7], 4, 1.0, 1.0) == 0.0


def test_unknown_algorithms_are_refused():
    with pytest.raises(ValueError, match="unknown variable-count algorithm 'ring'"):
        v.traffic("ring", "allgather_v", COUNTS, 4, 0)
    with pytest.raises(ValueError, match="unknown variable-count algorithm 'ring'"):
        v.seconds("ring", "allgather_v", COUNTS, 4, 1.0, 1.0)


def test_communicators_check_their_collective_options():
    from tests.test_distributed_kfac import NoCollectives

    assert NoCollectives().collectives == "auto"
    assert NoCollectives(collectives="two_phase").v_algorithm("allgather_v", [1, 2], 4) == \
        "two_phase"
    assert NoCollectives(alpha=1.0, bandwidth=4.0).v_algorithm(
        "reduce_scatter_v", [3, 0, 10, 1], 4) == "two_phase"
    with pytest.raises(ValueError, match="collectives must be one of native, two_phase, "
                                         "allreduce, auto, not 'ring'"):
        NoCollectives(collectives="ring")
    with pytest.raises(ValueError, match="bandwidth must be a positive number, got 0"):
        NoCollectives(bandwidth=0)
