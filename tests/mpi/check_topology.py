"""Node layout (intra/inter rank and size) under mpiexec.

Usage: check_topology.py single-node | odd-even
``odd-even`` is for MPICH's MPIR_CVAR_ODD_EVEN_CLIQUES=1, which makes even and odd ranks
behave as if they ran on two different nodes: node 0 = {0, 2, ...}, node 1 = {1, 3, ...}.
"""
import sys

from mpi4py import MPI

from kfac_mn.communicators import create_communicator


def expected_layout(layout, rank, size):
    """(intra_rank, intra_size, inter_rank, inter_size) that ``layout`` implies."""
    if layout == "single-node":
        return rank, size, 0, 1
    if layout == "odd-even":
        node = rank % 2
        return rank // 2, len(range(node, size, 2)), node, min(size, 2)
    raise SystemExit(f"check_topology.py: unknown layout {layout!r}; "
                     "use single-node or odd-even")


def main():
    layout = sys.argv[1]
    comm = create_communicator()
    assert (comm.rank, comm.size) == (MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size)
    found = (comm.intra_rank, comm.intra_size, comm.inter_rank, comm.inter_size)
    expected = expected_layout(layout, comm.rank, comm.size)
    assert found == expected, (f"rank {comm.rank}: (intra_rank, intra_size, inter_rank, "
                               f"inter_size) = {found}, expected {expected} for {layout}")
    comm.barrier()
    if comm.rank == 0:
        print(f"topology: {layout} layout correct on {comm.size} ranks", flush=True)


if __name__ == "__main__":
    main()
