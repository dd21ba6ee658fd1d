"""Byte accounting of MpiCommunicator against hand-computed ring-model figures (3 ranks).

Hand computation (bytes; s_i is rank i's segment, B their sum; see kfac_mn.communicators.traffic):
- reduce_scatter_v, float32, counts [2, 0, 5]: s = [8, 0, 20], B = 28.
  sent = B - s_r: [20, 28, 8]; received = B - s_(r-1): [28 - 20, 28 - 8, 28 - 0] = [8, 20, 28].
- allgather_v, float32, counts [2, 0, 5]: sent = B - s_(r+1): [28, 8, 20];
  received = B - s_r: [20, 28, 8].
- allreduce, 10 float64 = 80 bytes, split 4/3/3 elements: s = [32, 24, 24].
  sent = (B - s_r) + (B - s_(r+1)): [48 + 56, 56 + 56, 56 + 48] = [104, 112, 104];
  received = (B - s_(r-1)) + (B - s_r): [56 + 48, 48 + 56, 56 + 56] = [104, 104, 112].
- bcast_data, 6 float32 = 24 bytes from rank 0 along the chain 0 -> 1 -> 2:
  sent [24, 24, 0], received [0, 24, 24].
- multi_node_mean_grad, the same 24 bytes all-reduced, split 2/2/2 elements: s = [8, 8, 8],
  sent = received = 2 * (24 - 8) = 32 on every rank.
- barrier: nothing.
"""
import numpy as np

from kfac_mn import Parameter
from kfac_mn.communicators import create_communicator

EXPECTED = {  # operation: ([sent by rank 0, 1, 2], [received by rank 0, 1, 2])
    "allgather_v": ([28, 8, 20], [20, 28, 8]),
    "allreduce": ([104, 112, 104], [104, 104, 112]),
    "barrier": ([0, 0, 0], [0, 0, 0]),
    "bcast_data": ([24, 24, 0], [0, 24, 24]),
    "multi_node_mean_grad": ([32, 32, 32], [32, 32, 32]),
    "reduce_scatter_v": ([20, 28, 8], [8, 20, 28]),
}


class OneParameterModel:
    def __init__(self):
        self.W = Parameter(np.ones((2, 3), dtype=np.float32))
        self.W.grad = np.ones((2, 3), dtype=np.float32)

    def namedparams(self):
        yield "/W", self.W


def main():
    comm = create_communicator(collectives="native")  # the library's own V collectives
    assert comm.size == 3, "check_traffic.py is written for exactly 3 ranks"
    counts = [2, 0, 5]
    comm.reduce_scatter_v(np.ones(7, dtype=np.float32), counts)
    comm.allgather_v(np.ones(counts[comm.rank], dtype=np.float32), counts)
    comm.allreduce(np.ones(10, dtype=np.float64))
    model = OneParameterModel()
    comm.bcast_data(model)
    comm.multi_node_mean_grad(model)
    comm.barrier()
    stats = comm.stats
    assert sorted(stats) == sorted(EXPECTED), sorted(stats)
    for operation, (sent, received) in EXPECTED.items():
        found = stats[operation]
        assert found["calls"] == 1, (operation, found)
        assert (found["bytes_sent"], found["bytes_received"]) == (sent[comm.rank],
                                                                  received[comm.rank]), (
            f"rank {comm.rank} {operation}: (sent, received) = "
            f"({found['bytes_sent']}, {found['bytes_received']}), expected "
            f"({sent[comm.rank]}, {received[comm.rank]})")
    comm.reset_stats()
    assert comm.stats == {}, comm.stats
    if comm.rank == 0:
        print("traffic: byte accounting matches the hand-computed ring model", flush=True)


if __name__ == "__main__":
    main()
