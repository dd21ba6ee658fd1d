"""World-size invariance of DistributedKFAC (run under mpiexec with any number of ranks).

N ranks with local batch b for 5 steps must give the weights of one process with batch N b and
the single-process KFAC (also with k micro-batches of b per rank against batch N k b).  The
model is conv -> relu -> linear plus a parameter no Fisher block covers (an output shift),
without batch norm.  Every rank starts from different weights (its
own seed) so that the broadcast of rank 0's is tested too; the reference uses rank 0's seed.
Each rank computes the reference itself and checks:

- its weights equal the reference's (float64: rtol 1e-9; float32: rtol 1e-4; the tiny
  batches make the factors rank-deficient and K-FAC then amplifies rounding by up to about
  1 / damping, so float32 uses damping 0.1: the tolerance then measures the distribution,
  partial sums added in another order, rather than that conditioning);
- its weights equal rank 0's bit for bit (every rank applies the same update);
- the schedule's intervals equal rank 0's and the reference's (adaptive schedule);
- the bytes of the step report: summed over ranks, a ring ReduceScatterV of B values sends
  (N - 1) B of them, and a ring AllGatherV of B' values (N - 1) B', whatever the owners are.

float16 communication is not exact; it must still keep all ranks bit-identical, schedule
included, and stay near the float64 reference.  Prints one line per configuration on rank 0.
"""
import sys

import numpy as np

from kfac_mn import Chain, Parameter
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.communicators import create_communicator
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.optimizer import MicroBatches
from kfac_mn.optimizers import KFAC, DistributedKFAC
from kfac_mn.optimizers.distributed_kfac import STAGES

LOCAL_BATCH = 3
STEPS = 5
N_CLASS = 5


class ShiftedConvNet(Chain):
    """conv (2 -> 3, 3x3, pad 1) -> relu -> linear (147 -> 5) -> + shift (no Fisher block)."""

    def __init__(self, seed, dtype):
        super().__init__()
        np.random.seed(seed)
        with self.init_scope():
            self.conv = L.Convolution2D(2, 3, 3, 1, 1)
            self.fc = L.Linear(3 * 7 * 7, N_CLASS)
            self.shift = Parameter(np.random.standard_normal(N_CLASS) * 0.1)
        for param in self.params():
            param.data = param.data.astype(dtype)

    def forward(self, x, t):
        return F.softmax_cross_entropy(self.fc(F.relu(self.conv(x))) + self.shift, t)


def global_batch(step, n_examples, dtype):
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((n_examples, 2, 7, 7)).astype(dtype)
    t = rng.integers(0, N_CLASS, n_examples).astype(np.int32)
    return x, t


def hyperparameters(config):
    schedule = (StatisticsSchedule("adaptive", warmup_steps=1, threshold=0.5, max_interval=4)
                if config["adaptive"] else StatisticsSchedule())
    return dict(lr=0.05, momentum=0.9, damping=config["damping"], cov_ema_decay=config["ema"],
                inv_dtype=config["inv_dtype"], schedule=schedule)


def train(optimizer, model, n_examples, dtype, rank=None, micro_batches=1):
    """STEPS updates on each step's global batch of ``n_examples``, or on ``rank``'s share.

    A rank's share is split into ``micro_batches`` equal micro-batches of LOCAL_BATCH.
    """
    share = LOCAL_BATCH * micro_batches
    for step in range(STEPS):
        x, t = global_batch(step, n_examples, dtype)
        if rank is None:
            optimizer.update(model, x, t)
            continue
        x, t = x[rank * share:(rank + 1) * share], t[rank * share:(rank + 1) * share]
        if micro_batches == 1:
            optimizer.update(model, x, t)
        else:
            optimizer.update(model, MicroBatches([(x[i:i + LOCAL_BATCH], t[i:i + LOCAL_BATCH])
                                                  for i in range(0, share, LOCAL_BATCH)]))


def expected_packed_sizes(model, size):
    """Values in the stage-2 and stage-4 buffers of a step where every layer is due."""
    gradients = sum(param.data.size for param in model.params())
    triangle = sum(d * (d + 1) // 2 for d in (2 * 9 + 1, 3, 3 * 7 * 7 + 1, N_CLASS))
    return gradients + triangle, gradients


def check_bytes(comm, optimizer, model, itemsize):
    report = optimizer.last_step_report
    assert list(report["stages"]) == list(STAGES), list(report["stages"])
    assert set(report["compute_seconds"]) >= {"forward", "backward", "factors",
                                              "precondition", "update"}, report
    # only an owner inverts (every layer is due at every step here)
    assert ("inversion" in report["compute_seconds"]) == bool(optimizer.owned_layers()), report
    stages = report["stages"]
    reduce_scatter = stages["2_reduce_scatter_statistics"]["collectives"]["reduce_scatter_v"]
    allgather = stages["4_allgather_preconditioned_gradients"]["collectives"]["allgather_v"]
    sent = comm.allreduce_obj(np.array([reduce_scatter["bytes_sent"], allgather["bytes_sent"]]))
    stage2, stage4 = expected_packed_sizes(model, comm.size)
    expected = np.array([(comm.size - 1) * stage2, (comm.size - 1) * stage4]) * itemsize
    assert np.array_equal(sent, expected), f"bytes sent over all ranks {sent}, expected {expected}"


def run(comm, name, config):
    dtype = config["dtype"]
    reference_model = ShiftedConvNet(0, dtype)
    reference = KFAC(**hyperparameters(config)).setup(reference_model)
    n_examples = comm.size * LOCAL_BATCH * config["micro_batches"]
    train(reference, reference_model, n_examples, dtype)

    model = ShiftedConvNet(comm.rank, dtype)
    optimizer = DistributedKFAC(comm, comm_dtype=config["comm_dtype"], **hyperparameters(config))
    optimizer.setup(model)
    train(optimizer, model, n_examples, dtype, comm.rank, config["micro_batches"])

    root, root_intervals = comm.bcast_obj(
        ({path: param.data for path, param in model.namedparams()}, optimizer.intervals()))
    assert optimizer.intervals() == root_intervals, f"{name}: intervals differ from rank 0's"
    worst = 0.0
    for (path, param), (_, expected) in zip(model.namedparams(), reference_model.namedparams()):
        assert param.dtype == dtype, (path, param.dtype)
        assert np.array_equal(param.data, root[path]), f"{name}: {path} differs from rank 0's"
        error = np.abs(param.data - expected.data).max() / np.abs(expected.data).max()
        worst = max(worst, float(error))
        if config["rtol"] is not None:
            np.testing.assert_allclose(param.data, expected.data, rtol=config["rtol"],
                                       atol=config["rtol"] * np.abs(expected.data).max(),
                                       err_msg=f"{name}: {path} on rank {comm.rank}")
    assert worst <= config["max_error"], f"{name}: relative weight error {worst:.3g}"
    if config["rtol"] is not None:
        assert optimizer.intervals() == reference.intervals(), (optimizer.intervals(),
                                                                reference.intervals())
    if config["check_bytes"]:
        check_bytes(comm, optimizer, model, np.dtype(config["comm_dtype"]).itemsize)
    errors = comm.gather_obj(worst)
    owned = comm.gather_obj(optimizer.owned_layers())
    if comm.rank == 0:
        print(f"{name}: {comm.size} ranks x {config['micro_batches']} x batch {LOCAL_BATCH} "
              f"== 1 process x batch {n_examples} after {STEPS} steps (max relative weight error "
              f"{max(errors):.2g}); owners {owned}; intervals {optimizer.intervals()}",
              flush=True)


CONFIGS = {
    "float64": dict(dtype=np.float64, comm_dtype=np.float64, inv_dtype=np.float64, ema=1.0,
                    damping=1e-2, adaptive=False, rtol=1e-9, max_error=1e-9, check_bytes=True,
                    micro_batches=1),
    "float64, 2 micro-batches per rank": dict(
        dtype=np.float64, comm_dtype=np.float64, inv_dtype=np.float64, ema=1.0, damping=1e-2,
        adaptive=False, rtol=1e-9, max_error=1e-9, check_bytes=False, micro_batches=2),
    "float32": dict(dtype=np.float32, comm_dtype=np.float32, inv_dtype=np.float32, ema=1.0,
                    damping=0.1, adaptive=False, rtol=1e-4, max_error=1e-4, check_bytes=True,
                    micro_batches=1),
    "float64 adaptive schedule, ema 0.5": dict(
        dtype=np.float64, comm_dtype=np.float64, inv_dtype=np.float64, ema=0.5, damping=1e-2,
        adaptive=True,
        rtol=1e-9, max_error=1e-9, check_bytes=False, micro_batches=1),
    "float16 communication": dict(dtype=np.float64, comm_dtype=np.float16, inv_dtype=np.float64,
                                  ema=1.0, damping=0.3, adaptive=True, rtol=None,
                                  max_error=0.2, check_bytes=False, micro_batches=1),
}


def main():
    collectives = sys.argv[1] if len(sys.argv) > 1 else "native"
    comm = create_communicator(collectives=collectives)
    for name, config in CONFIGS.items():
        # the ring formula of the bytes holds for the library's own algorithm; the others'
        # bytes are checked against their own formulas in check_v_collectives.py
        run(comm, name, {**config, "check_bytes": config["check_bytes"] and
                         collectives == "native"})
    if comm.rank == 0:
        print(f"invariance checks passed on {comm.size} ranks ({collectives} collectives)",
              flush=True)


if __name__ == "__main__":
    main()
