"""The interface every communicator implements (MPI now, NCCL on GPUs later).

Distributed K-FAC (the paper's Figure 1) needs three kinds of traffic per step:

1. ReduceScatterV of the local gradients and Kronecker factors: the buffer is laid out layer
   by layer, grouped by owner; rank i receives the sum over all ranks of the segment of the
   layers it owns (``reduce_scatter_v``).
2. AllGatherV of the preconditioned gradients: each rank contributes the segment of its own
   layers and every rank receives the whole buffer (``allgather_v``).
3. Plain data parallelism around it: the initial weights from rank 0 (``bcast_data``), the
   mean gradient of layers without a K-FAC block (``multi_node_mean_grad``), and small Python
   objects such as losses, accuracies and timings (``bcast_obj``, ``allreduce_obj``,
   ``gather_obj``).

Array collectives take 1-D buffers of float64, float32 or float16.  Every collective adds its
bytes, messages (see :mod:`kfac_mn.communicators.traffic`) and wall time to :attr:`stats`.
The variable-count ones run the algorithm ``collectives`` names
(:mod:`kfac_mn.communicators.v_collectives`; ``auto``: the cheapest for each call under the
alpha-beta model with ``alpha`` seconds per message and ``bandwidth`` bytes per second, by
default InfiniBand EDR's 2 us and 12.5 GB/s; give a calibrated machine's for another network).
"""
import abc
import math
import numbers

from kfac_mn.communicators import v_collectives
from kfac_mn.communicators.traffic import TrafficLog

#: the alpha-beta parameters ``auto`` assumes unless told otherwise (InfiniBand EDR)
DEFAULT_ALPHA, DEFAULT_BANDWIDTH = 2e-6, 12.5e9


class CommunicatorBase(abc.ABC):
    """Collectives over a fixed group of ranks, with per-operation traffic accounting."""

    #: the variable-count algorithms this communicator can run
    v_algorithms = v_collectives.ALGORITHMS
    #: those ``auto`` chooses among
    auto_algorithms = v_collectives.ALGORITHMS

    def __init__(self, collectives="auto", alpha=DEFAULT_ALPHA, bandwidth=DEFAULT_BANDWIDTH):
        self._traffic = TrafficLog()
        allowed = self.v_algorithms + ("auto",)
        if collectives not in allowed:
            raise ValueError(f"{type(self).__name__}: collectives must be one of "
                             f"{', '.join(allowed)}, not {collectives!r}")
        for name, value in (("alpha", alpha), ("bandwidth", bandwidth)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{type(self).__name__}: {name} must be a positive number, "
                                 f"got {value!r}")
        self.collectives = collectives
        self.alpha = float(alpha)
        self.bandwidth = float(bandwidth)

    def v_algorithm(self, operation, counts, itemsize):
        """The algorithm a variable-count collective runs with these counts."""
        if self.collectives != "auto":
            return self.collectives
        return v_collectives.choose(operation, counts, itemsize, self.alpha, self.bandwidth,
                                    self.auto_algorithms)

    # -- topology -----------------------------------------------------------
    @property
    @abc.abstractmethod
    def rank(self):
        """Index of this process in the group, 0 .. size-1."""

    @property
    @abc.abstractmethod
    def size(self):
        """Number of processes in the group."""

    @property
    @abc.abstractmethod
    def intra_rank(self):
        """Index of this process among the processes on its node."""

    @property
    @abc.abstractmethod
    def intra_size(self):
        """Number of processes on this process's node."""

    @property
    @abc.abstractmethod
    def inter_rank(self):
        """Index of this process's node; nodes are numbered by their lowest rank."""

    @property
    @abc.abstractmethod
    def inter_size(self):
        """Number of nodes."""

    # -- model-level collectives ----------------------------------------------
    @abc.abstractmethod
    def bcast_data(self, model):
        """Overwrite every parameter's data with rank 0's, in the model's ``namedparams`` order.

        Moves one packed buffer of all parameters (a chain broadcast of B bytes).
        """

    @abc.abstractmethod
    def multi_node_mean_grad(self, model):
        """Set every parameter's grad to the mean of the grads over all ranks.

        The grads are packed into one buffer in the model's ``namedparams`` order and all-reduced
        (ring model: 2 (P-1)/P * B bytes each way).  A parameter whose grad is None counts as
        zeros, so the buffer layout depends only on the parameters' shapes and is the same on
        every rank; afterwards every parameter has a grad.
        """

    # -- array collectives ----------------------------------------------------
    @abc.abstractmethod
    def reduce_scatter_v(self, sendbuf, counts):
        """Sum ``sendbuf`` over ranks and return this rank's segment of the sum.

        ``sendbuf`` is 1-D with ``sum(counts)`` elements; segment i is the ``counts[i]``
        elements after the first ``sum(counts[:i])``, and rank i receives it.  Counts may be
        uneven and zero.  Ring model: sent = B - s_rank, received = B - s_(rank-1).
        """

    @abc.abstractmethod
    def allgather_v(self, sendbuf, counts):
        """Concatenate every rank's ``sendbuf`` (rank i gives ``counts[i]`` elements).

        Returns the 1-D concatenation in rank order, ``sum(counts)`` elements, on every rank.
        Ring model: sent = B - s_(rank+1), received = B - s_rank.
        """

    @abc.abstractmethod
    def allreduce(self, array):
        """Return the element-wise sum of ``array`` over ranks (same shape), on every rank."""

    # -- object collectives ---------------------------------------------------
    @abc.abstractmethod
    def bcast_obj(self, obj, root=0):
        """Return ``root``'s picklable ``obj`` on every rank."""

    @abc.abstractmethod
    def allreduce_obj(self, obj):
        """Return the sum of every rank's ``obj`` (numbers or arrays), added in rank order."""

    @abc.abstractmethod
    def gather_obj(self, obj, root=0):
        """Return the list of every rank's ``obj`` in rank order on ``root``, None elsewhere."""

    @abc.abstractmethod
    def barrier(self):
        """Block until every rank has called it."""

    # -- accounting -------------------------------------------------------------
    @property
    def stats(self):
        """{operation: {calls, bytes_sent, bytes_received, seconds}} since the last reset.

        Bytes are this rank's, under the ring model of :mod:`kfac_mn.communicators.traffic`;
        seconds are wall time spent inside the collective on this rank.
        """
        return self._traffic.snapshot()

    def reset_stats(self):
        """Start the per-operation totals from zero (e.g. at the start of each step)."""
        self._traffic.reset()
