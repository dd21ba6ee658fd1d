"""Rank 1 raises while the others wait in a barrier: the whole job must end, non-zero."""
from kfac_mn.communicators import create_communicator


def main():
    comm = create_communicator()
    if comm.rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    comm.barrier()


if __name__ == "__main__":
    main()
