"""Ranks that disagree end the whole job with a clear error, not a hang or garbage (2 ranks).

``model``: rank 1 builds a wider layer than rank 0; setup must name the parameter.
``step``: rank 1 is one step ahead (as after resuming from another checkpoint), so with
factors refreshed every other step the ranks disagree on the due layers; the step must say so.
``inversion``: rank 1's input is NaN, so the summed factors are; the owners cannot invert them
even after the fallbacks.  They raise InversionError only after stage 4, so no rank is left
waiting: both reach the barrier after the update.
"""
import sys

import numpy as np

from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L
from kfac_mn.communicators import create_communicator
from kfac_mn.fisher.inverse import InversionError
from kfac_mn.fisher.refresh_schedule import StatisticsSchedule
from kfac_mn.optimizers import DistributedKFAC


class Net(Chain):
    def __init__(self, hidden):
        super().__init__()
        with self.init_scope():
            self.fc1 = L.Linear(4, hidden)
            self.fc2 = L.Linear(hidden, 3)

    def forward(self, x, t):
        return F.softmax_cross_entropy(self.fc2(F.relu(self.fc1(x))), t)


def main(case):
    comm = create_communicator()
    model = Net(5 if case == "model" and comm.rank == 1 else 4)
    schedule = StatisticsSchedule("fixed", factor_interval=2, inverse_interval=2)
    optimizer = DistributedKFAC(comm, schedule=schedule).setup(model)
    if case == "step" and comm.rank == 1:
        optimizer.t = 1
    x = np.ones((2, 4), dtype=np.float32)
    if case == "inversion":
        x[:] = np.nan if comm.rank == 1 else 1.0
        try:
            optimizer.update(model, x, np.zeros(2, dtype=np.int32))
            outcome = "completed"
        except InversionError as error:
            outcome = f"InversionError ({error})"
        comm.barrier()
        print(f"rank {comm.rank} owns {optimizer.owned_layers()}: {outcome}; went on",
              flush=True)
        return
    optimizer.update(model, x, np.zeros(2, dtype=np.int32))
    print("no error was raised", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
