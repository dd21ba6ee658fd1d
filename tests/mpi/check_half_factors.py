"""K-FAC factors reduced in float16 (scaled upper triangles) over ReduceScatterV.

Each of 4 ranks holds the same five symmetric factors with entries up to 1e6 (its own values),
packs their upper triangles into one buffer grouped by owner, agrees on each factor's float16
scale (the per-segment scaling of distributed K-FAC), and reduce-scatters; each owner unpacks
the summed factors it owns.  Unscaled, 1e6 is already
beyond float16 (max 65504).  Prints the largest relative error found.
"""
import numpy as np

from kfac_mn.communicators import create_communicator
from kfac_mn.distributed import segment_scaling
from kfac_mn.distributed.triangles import pack_upper_triangle, unpack_upper_triangle

DIMS = (6, 1, 9, 4, 3)
OWNERS = (2, 0, 2, 1, 0)  # for 4 ranks: uneven, and rank 3 owns nothing (an empty segment)
LARGEST_ENTRY = 1e6
RELATIVE_ERROR_BOUND = 4 * 2.0 ** -11  # P * u for P = 4 ranks (see segment_scaling's docstring)


def rank_factor(rank, index, dim):
    """A = X X^T (symmetric positive semi-definite) with largest entry rank-dependent <= 1e6."""
    rng = np.random.default_rng(100 * rank + index)
    x = rng.standard_normal((dim, 2 * dim + 1))
    factor = x @ x.T
    return factor * (LARGEST_ENTRY * (rank + 1) / 4 / np.abs(factor).max())


def main():
    comm = create_communicator()
    assert comm.size == 4, "check_half_factors.py is written for exactly 4 ranks"
    order = sorted(range(len(DIMS)), key=lambda index: (OWNERS[index], index))
    counts = [sum(DIMS[i] * (DIMS[i] + 1) // 2 for i in order if OWNERS[i] == r)
              for r in range(comm.size)]
    packed = np.concatenate([pack_upper_triangle(rank_factor(comm.rank, i, DIMS[i]))
                             for i in order])
    sizes = [DIMS[i] * (DIMS[i] + 1) // 2 for i in order]
    local = segment_scaling.segment_max_abs(packed, sizes)
    bounds = comm.allgather_v(local, [len(sizes)] * comm.size).reshape(comm.size, -1).max(0)
    exponents = segment_scaling.scale_exponents(bounds, comm.size, [str(i) for i in order])
    half = segment_scaling.encode(packed, sizes, exponents, np.float16)
    assert half.dtype == np.float16 and np.all(np.isfinite(half))
    mine = [position for position, i in enumerate(order) if OWNERS[i] == comm.rank]
    summed = segment_scaling.decode(comm.reduce_scatter_v(half, counts),
                                    [sizes[p] for p in mine], exponents[mine], np.float64)
    assert np.all(np.isfinite(summed)), f"rank {comm.rank}: float16 sum overflowed"

    worst = frobenius = 0.0
    offset = 0
    for index in (i for i in order if OWNERS[i] == comm.rank):
        dim = DIMS[index]
        length = dim * (dim + 1) // 2
        factor = unpack_upper_triangle(summed[offset:offset + length], dim)
        offset += length
        reference = sum(rank_factor(r, index, dim) for r in range(comm.size))
        error = np.abs(factor - reference).max() / np.abs(reference).max()
        assert error < RELATIVE_ERROR_BOUND, (
            f"rank {comm.rank} factor {index}: relative error {error:.3g} >= "
            f"{RELATIVE_ERROR_BOUND:.3g}")
        worst = max(worst, error)
        frobenius = max(frobenius, np.linalg.norm(factor - reference) / np.linalg.norm(reference))
    assert offset == summed.size
    errors = comm.gather_obj((worst, frobenius))
    if comm.rank == 0:
        print(f"half factors: {len(DIMS)} factors, entries up to {LARGEST_ENTRY:g}, "
              f"{comm.size} ranks, scales 2^{exponents.min()}..2^{exponents.max()}: relative error "
              f"max|error|/max|sum| {max(e[0] for e in errors):.3g}, "
              f"Frobenius {max(e[1] for e in errors):.3g}", flush=True)


if __name__ == "__main__":
    main()
