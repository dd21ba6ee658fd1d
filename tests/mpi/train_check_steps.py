"""The harness's update and validation steps under mpiexec (any number of ranks).

1. ``--acc-iters 2`` with batch b is the update of batch 2b in one step, for a model without
   batch normalization: the harness's loaders hand each rank the same examples, and after 3
   updates (K-FAC and SGD, float64) the weights agree to rtol 1e-10 on every rank.
2. Validation across ranks (each rank its shard, sums added) equals one process evaluating
   the whole validation set (the same hits; the loss up to float32 rounding).

Prints one line on rank 0 when every check passed.
"""
import numpy as np

from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.communicators import create_communicator
from utils.training.datasets import build_datasets, build_loaders
from utils.training.optimizer import build_optimizer
from utils.training.options import check_world, parse_options
from utils.training.step import MeteredClassifier, UpdateStep, evaluate

BATCH = 6
UPDATES = 3


class NoBatchNormNet(Chain):
    """conv (1 -> 4, 3x3, stride 2) -> relu -> 2x2 average pooling -> linear (196 -> 10)."""

    def __init__(self, dtype=np.float64):
        super().__init__()
        np.random.seed(7)
        with self.init_scope():
            self.conv = L.Convolution2D(1, 4, 3, 2, 1)
            self.fc = L.Linear(4 * 7 * 7, 10)
        for param in self.params():
            param.data = param.data.astype(dtype)

    def forward(self, x):
        return self.fc(F.relu(F.average_pooling_2d(self.conv(x), 2)))


def options_for(optimizer, batchsize, acc_iters, size):
    argv = ["--optimizer", optimizer, "--batchsize", str(batchsize), "--acc-iters",
            str(acc_iters), "--train-size", "120", "--val-size", "50", "--val-batchsize", "7",
            "--lr", "0.05", "--damping", "0.01", "--stat-schedule", "fixed"]
    return check_world(parse_options(argv), size)


def train(comm, optimizer, batchsize, acc_iters):
    """Weights and the rank's batches after UPDATES updates of the harness's step."""
    options = options_for(optimizer, batchsize, acc_iters, comm.size)
    train_set, val_set = build_datasets(options)
    train_loader, _ = build_loaders(options, train_set, val_set, comm.rank, comm.size)
    classifier = MeteredClassifier(NoBatchNormNet())
    step = UpdateStep(build_optimizer(options, comm, classifier), classifier, acc_iters)
    batches = []
    for _ in range(UPDATES):
        x, t = next(train_loader)
        batches.append((x.copy(), t.copy()))
        step(x.astype(np.float64), t)
    train_loader.close()
    return [param.data.copy() for _, param in classifier.namedparams()], batches


class OneProcess:
    """The sums of a single process: nothing to add."""

    @staticmethod
    def allreduce_obj(obj):
        return obj


def main():
    comm = create_communicator("mpi")
    for optimizer in ("kfac", "sgd"):
        whole, whole_batches = train(comm, optimizer, 2 * BATCH, 1)
        split, split_batches = train(comm, optimizer, BATCH, 2)
        for (x_whole, t_whole), (x_split, t_split) in zip(whole_batches, split_batches):
            assert len(x_split) == 2 * BATCH
            assert np.array_equal(x_whole, x_split) and np.array_equal(t_whole, t_split)
        for a, b in zip(whole, split):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
        root = comm.bcast_obj(split)
        assert all(np.array_equal(a, b) for a, b in zip(split, root)), "ranks differ"

    options = options_for("sgd", BATCH, 1, comm.size)
    train_set, val_set = build_datasets(options)
    model = NoBatchNormNet(np.float32)
    _, val_loader = build_loaders(options, train_set, val_set, comm.rank, comm.size)
    across_ranks = evaluate(model, val_loader, comm)
    _, whole_loader = build_loaders(options, train_set, val_set, 0, 1)
    one_process = evaluate(model, whole_loader, OneProcess())
    assert across_ranks["examples"] == one_process["examples"] == 50
    for key in ("accuracy", "accuracy_top5"):
        assert across_ranks[key] == one_process[key], (key, across_ranks, one_process)
    assert abs(across_ranks["loss"] - one_process["loss"]) < 1e-6 * one_process["loss"]
    if comm.rank == 0:
        print(f"harness step checks passed on {comm.size} ranks", flush=True)


if __name__ == "__main__":
    main()
