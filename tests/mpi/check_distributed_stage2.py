"""After stage 2 each owner holds the sums of the ranks' local statistics (ResNet with BN).

With batch normalization the statistics depend on how the batch is split, so world-size
invariance cannot hold; what must hold is that the ReduceScatterV hands each owner exactly the
sums of what every rank computed locally.  Each rank recomputes every rank's local statistics
itself, on its own copy of the model with a single-process KFAC, and checks for each layer it
owns, for each BN Fisher kind:

- float64 communication: statistic sums equal the per-rank sums added (rtol 1e-12), counts are
  the added counts exactly, gradients are the mean of the ranks' gradients;
- float16 communication: the same within the rounding bound of a float16 sum of N scaled terms,
  |error| <= 2 N u sum_r |x_r| + N^2 2^-38 max|x| (u = 2^-11; the second term covers
  float16 subnormals); the largest relative error is printed;
- the due layers it does not own hold no sums any more.
"""
import numpy as np

from kfac_mn import functions as F
from kfac_mn.communicators import create_communicator
from kfac_mn.optimizers import KFAC, DistributedKFAC
from models import resnet_mnist
from tests.kfac_models import to_float64

LOCAL_BATCH = 4
UNIT_ROUNDOFF = 2.0 ** -11


def make_model(seed):
    np.random.seed(seed)
    return to_float64(resnet_mnist())


def local_batch(rank):
    rng = np.random.default_rng(500 + rank)
    return (rng.standard_normal((LOCAL_BATCH, 1, 28, 28)),
            rng.integers(0, 10, LOCAL_BATCH).astype(np.int32))


def local_statistics(model, kind, rank, due):
    """One rank's stage-1 result on a copy of ``model``: sums, counts, gradients."""
    copy = make_model(0)
    for param, source in zip(copy.params(), model.params()):
        param.data = source.data.copy()
    kfac = KFAC(bn_fisher=kind).setup(copy)
    x, t = local_batch(rank)
    kfac.compute_local_statistics(due, lambda x, t: F.softmax_cross_entropy(copy(x), t), x, t)
    return ({path: dict(block.sums) for path, block in kfac.fisher_blocks.items()},
            {path: dict(block.counts) for path, block in kfac.fisher_blocks.items()},
            {path: param.grad.copy() for path, param in copy.namedparams()})


def check(received, terms, tolerance, where):
    """``received`` against the sum of ``terms``; returns the relative error."""
    exact = sum(terms)
    error = np.abs(received - exact)
    if tolerance == "float64":
        bound = 1e-12 * sum(np.abs(term) for term in terms) + 1e-300
    else:
        n = len(terms)
        magnitude = max(float(np.abs(term).max()) for term in terms)
        bound = (2 * n * UNIT_ROUNDOFF * sum(np.abs(term) for term in terms)
                 + n * n * 2.0 ** -38 * magnitude)
    assert np.all(error <= bound), f"{where}: error {error.max():.3g} above its bound"
    return float(error.max() / max(np.abs(exact).max(), 1e-300))


def run(comm, kind, comm_dtype):
    model = make_model(comm.rank)  # rank 0's weights arrive by the broadcast in setup
    optimizer = DistributedKFAC(comm, bn_fisher=kind, comm_dtype=comm_dtype,
                                inv_dtype=np.float64).setup(model)
    due = optimizer.due_layers()
    x, t = local_batch(comm.rank)
    optimizer.compute_local_statistics(due, lambda x, t: F.softmax_cross_entropy(model(x), t),
                                       x, t)
    optimizer.reduce_scatter_statistics(due)

    ranks = [local_statistics(model, kind, rank, due) for rank in range(comm.size)]
    tolerance = "float64" if comm_dtype == np.float64 else "float16"
    worst = 0.0
    owned = set(optimizer.owned_layers())
    for path, block in optimizer.fisher_blocks.items():
        if path not in owned:
            assert block.sums == {}, f"{path} is not owned by rank {comm.rank} but holds sums"
            continue
        for name in block.statistic_names:
            where = f"{kind} {np.dtype(comm_dtype)} {path} {name} on rank {comm.rank}"
            assert block.counts[name] == sum(r[1][path][name] for r in ranks), where
            worst = max(worst, check(block.sums[name], [r[0][path][name] for r in ranks],
                                     tolerance, where))
        for param_path, param in optimizer.work_items[
                [item.name for item in optimizer.work_items].index(path)].params:
            where = f"{kind} {np.dtype(comm_dtype)} {param_path} grad on rank {comm.rank}"
            worst = max(worst, check(param.grad * comm.size, [r[2][param_path] for r in ranks],
                                     tolerance, where))
    errors = comm.gather_obj(worst)
    counts = comm.gather_obj(len(owned))
    if comm.rank == 0:
        print(f"stage 2, bn_fisher={kind}, {np.dtype(comm_dtype)}: owners hold the sums of "
              f"{comm.size} ranks' statistics and gradients (layers per rank {counts}, largest "
              f"relative error {max(errors):.2g})", flush=True)


def main():
    comm = create_communicator()
    for kind in ("diag", "unit", "full"):
        for comm_dtype in (np.float64, np.float16):
            run(comm, kind, comm_dtype)
    if comm.rank == 0:
        print(f"stage 2 checks passed on {comm.size} ranks", flush=True)


if __name__ == "__main__":
    main()
