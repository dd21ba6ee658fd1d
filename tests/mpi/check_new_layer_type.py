"""A layer type registered from outside the library (tests.new_layer_type) under
DistributedKFAC on every rank of the job: after one step the owner of the layer holds the
factors of the global batch, equal to the brute-force ones; after three steps every rank's
weights equal one process's KFAC on the whole batch."""
import numpy as np

from kfac_mn import functions as F
from kfac_mn.communicators import create_communicator
from kfac_mn.optimizers import KFAC, DistributedKFAC
from tests.kfac_models import MixNet, mixnet_factors, to_float64

LOCAL_BATCH = 3


def make_model():
    np.random.seed(0)
    return to_float64(MixNet())


def batch(size):
    rng = np.random.default_rng(7)
    return rng.standard_normal((size, 3, 5)), rng.integers(0, 3, size).astype(np.int32)


def main():
    comm = create_communicator()
    x, t = batch(LOCAL_BATCH * comm.size)
    mine = slice(comm.rank * LOCAL_BATCH, (comm.rank + 1) * LOCAL_BATCH)
    model = make_model()
    A, G = mixnet_factors(model, x, t)
    optimizer = DistributedKFAC(comm, lr=0.05, damping=1e-2, comm_dtype=np.float64)
    optimizer.setup(model)

    def lossfun(a, b):
        return F.softmax_cross_entropy(model(a), b)

    optimizer.update(lossfun, x[mine], t[mine])
    if "/mix" in optimizer.owned_layers():
        block = optimizer.fisher_blocks["/mix"]
        np.testing.assert_allclose(block.factors["A"], A, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(block.factors["G"], G, rtol=1e-12, atol=1e-14)
        print(f"rank {comm.rank} owns /mix: A and G equal the brute-force factors of the "
              f"global batch of {len(x)}", flush=True)
    for _ in range(2):
        optimizer.update(lossfun, x[mine], t[mine])

    reference = make_model()
    single = KFAC(lr=0.05, damping=1e-2).setup(reference)
    for _ in range(3):
        single.update(lambda a, b: F.softmax_cross_entropy(reference(a), b), x, t)
    for (path, param), other in zip(model.namedparams(), reference.params()):
        np.testing.assert_allclose(param.data, other.data, rtol=1e-10, atol=1e-12,
                                   err_msg=path)
    comm.barrier()
    if comm.rank == 0:
        print(f"new layer type: {comm.size} ranks match one process after 3 steps", flush=True)


if __name__ == "__main__":
    main()
