"""Collectives over MPI (mpi4py) on host buffers.

Arrays are staged through host memory: NumPy arrays are used as they are, CuPy arrays are
copied to the host and the result is copied back to the device, so callers can stay in the
xp idiom.  float64 and float32 use MPI's predefined sum; float16 uses the user-defined sum of
:mod:`kfac_mn.communicators.float16_sum`.  Every rank must call every collective in the same
order with matching arguments, as MPI requires.

The variable-count collectives run one of :data:`~kfac_mn.communicators.v_collectives.
ALGORITHMS` (``collectives``; ``auto`` picks the cheapest for each call by the alpha-beta
model with ``alpha`` and ``bandwidth``): ``native`` (MPI_Reduce_scatter, MPI_Allgatherv; the
ring model's bytes), ``allreduce`` (the authors' stand-in; the ring model's bytes) or
``two_phase`` (MPI_Reduce_scatter_block / MPI_Allgather over equal chunks and one
MPI_Alltoallv for the redistribution; the equal chunks counted as a ring moves them, every
piece of the redistribution as posted).
"""
import itertools
import pickle
import time

import numpy
from mpi4py import MPI

from kfac_mn import backend
from kfac_mn.communicators import parameter_buffer, traffic, v_collectives
from kfac_mn.communicators.communicator_base import CommunicatorBase
from kfac_mn.communicators.float16_sum import float16_type_and_sum


def _mpi_type_and_sum(dtype, operation):
    dtype = numpy.dtype(dtype)
    if dtype == numpy.float64:
        return MPI.DOUBLE, MPI.SUM
    if dtype == numpy.float32:
        return MPI.FLOAT, MPI.SUM
    if dtype == numpy.float16:
        return float16_type_and_sum()
    raise TypeError(f"{operation}: dtype {dtype} is not supported; "
                    "use float64, float32 or float16")


def _checked_counts(counts, size, operation):
    counts = list(counts)
    if len(counts) != size:
        raise ValueError(f"{operation}: counts has {len(counts)} entries but the communicator "
                         f"has {size} ranks")
    for i, count in enumerate(counts):
        if (not isinstance(count, (int, numpy.integer)) or isinstance(count, bool)
                or count < 0):
            raise ValueError(f"{operation}: counts[{i}] = {count!r} is not a non-negative "
                             "integer")
    return [int(count) for count in counts]


def _host_contiguous(array):
    """A C-contiguous host copy of ``array`` (the array itself if it is one already)."""
    return numpy.require(backend.to_cpu(array), requirements="C")


def _host_vector(array, operation):
    host = _host_contiguous(array)
    if host.ndim != 1:
        raise ValueError(f"{operation}: sendbuf must be 1-D, got shape {host.shape}")
    return host


def _offsets(lengths):
    return [0, *itertools.accumulate(lengths[:-1])]


def _pickled(obj):
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def node_layout(node_keys, rank):
    """(inter_rank, inter_size) from every rank's node key (the lowest rank on its node).

    Nodes are numbered in the order of their lowest rank, so the numbering is the same on
    every rank and does not depend on host names.
    """
    nodes = sorted(set(node_keys))
    return nodes.index(node_keys[rank]), len(nodes)


class MpiCommunicator(CommunicatorBase):
    """The collectives of :class:`CommunicatorBase` on an mpi4py communicator.

    ``mpi_comm`` defaults to ``MPI.COMM_WORLD``.  The node layout is found once at
    construction: ``MPI_Comm_split_type(COMM_TYPE_SHARED)`` groups the ranks that share
    memory (one node), each node is keyed by its lowest rank.
    """

    def __init__(self, mpi_comm=None, **collective_options):
        super().__init__(**collective_options)
        self._comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._comm.rank)
        self._intra_rank, self._intra_size = node.rank, node.size
        node_key = node.allreduce(self._comm.rank, op=MPI.MIN)
        node.Free()
        self._inter_rank, self._inter_size = node_layout(self._comm.allgather(node_key),
                                                         self._comm.rank)

    @property
    def mpi_comm(self):
        """The mpi4py communicator the collectives run on."""
        return self._comm

    @property
    def rank(self):
        return self._comm.rank

    @property
    def size(self):
        return self._comm.size

    @property
    def intra_rank(self):
        return self._intra_rank

    @property
    def intra_size(self):
        return self._intra_size

    @property
    def inter_rank(self):
        return self._inter_rank

    @property
    def inter_size(self):
        return self._inter_size

    # -- model-level collectives ----------------------------------------------
    def bcast_data(self, model):
        params = parameter_buffer.ordered_named_params(model, "bcast_data")
        if not params:
            return
        xp = backend.get_array_module(params[0][1].data)
        host = _host_contiguous(parameter_buffer.pack_data(params))
        mpi_type, _ = _mpi_type_and_sum(host.dtype, "bcast_data")
        start = time.perf_counter()
        self._comm.Bcast([host, mpi_type], root=0)
        seconds = time.perf_counter() - start
        self._traffic.record("bcast_data",
                             *traffic.chain_bcast_bytes(host.nbytes, self.size, self.rank, 0),
                             seconds)
        parameter_buffer.unpack_data(xp.asarray(host), params)

    def multi_node_mean_grad(self, model):
        params = parameter_buffer.ordered_named_params(model, "multi_node_mean_grad")
        if not params:
            return
        xp = backend.get_array_module(params[0][1].data)
        host = _host_contiguous(parameter_buffer.pack_grads(params))
        summed = self._allreduce_host(host, "multi_node_mean_grad")
        parameter_buffer.unpack_grads(xp.asarray(summed / self.size), params)

    # -- array collectives ----------------------------------------------------
    def reduce_scatter_v(self, sendbuf, counts):
        operation = "reduce_scatter_v"
        counts = _checked_counts(counts, self.size, operation)
        xp = backend.get_array_module(sendbuf)
        host = _host_vector(sendbuf, operation)
        if host.size != sum(counts):
            raise ValueError(f"{operation}: sendbuf has {host.size} elements but sum(counts) "
                             f"is {sum(counts)}")
        mpi_type, mpi_sum = _mpi_type_and_sum(host.dtype, operation)
        algorithm = self.v_algorithm(operation, counts, host.itemsize)
        start = time.perf_counter()
        if algorithm == "two_phase":
            received, moved = self._two_phase_reduce_scatter(host, counts, mpi_type, mpi_sum)
        else:
            if algorithm == "allreduce":
                offset = sum(counts[:self.rank])
                received = self._allreduce_raw(host, mpi_type, mpi_sum)[
                    offset:offset + counts[self.rank]].copy()
            else:
                received = numpy.empty(counts[self.rank], dtype=host.dtype)
                self._comm.Reduce_scatter([host, host.size, mpi_type],
                                          [received, received.size, mpi_type], counts, mpi_sum)
            moved = v_collectives.traffic(algorithm, operation, counts, host.itemsize,
                                          self.rank)
        self._record_v(operation, algorithm, moved, time.perf_counter() - start)
        return xp.asarray(received)

    def allgather_v(self, sendbuf, counts):
        operation = "allgather_v"
        counts = _checked_counts(counts, self.size, operation)
        xp = backend.get_array_module(sendbuf)
        host = _host_vector(sendbuf, operation)
        if host.size != counts[self.rank]:
            raise ValueError(f"{operation}: rank {self.rank} sends {host.size} elements but "
                             f"counts[{self.rank}] is {counts[self.rank]}")
        mpi_type, mpi_sum = _mpi_type_and_sum(host.dtype, operation)
        algorithm = self.v_algorithm(operation, counts, host.itemsize)
        start = time.perf_counter()
        if algorithm == "two_phase":
            received, moved = self._two_phase_allgather(host, counts, mpi_type)
        else:
            if algorithm == "allreduce":
                placed = numpy.zeros(sum(counts), dtype=host.dtype)
                offset = sum(counts[:self.rank])
                placed[offset:offset + host.size] = host
                received = self._allreduce_raw(placed, mpi_type, mpi_sum)
            else:
                received = numpy.empty(sum(counts), dtype=host.dtype)
                self._comm.Allgatherv([host, host.size, mpi_type],
                                      [received, (counts, _offsets(counts)), mpi_type])
            moved = v_collectives.traffic(algorithm, operation, counts, host.itemsize,
                                          self.rank)
        self._record_v(operation, algorithm, moved, time.perf_counter() - start)
        return xp.asarray(received)

    def _record_v(self, operation, algorithm, moved, seconds):
        self._traffic.record(operation, moved.bytes_sent, moved.bytes_received, seconds,
                             moved.messages_sent, moved.messages_received, algorithm)

    # -- two_phase: equal chunks, then a redistribution ---------------------------------
    def _redistribute(self, sendbuf, receive, counts, to_owners, mpi_type, moved):
        """One MPI_Alltoallv of :func:`~kfac_mn.communicators.v_collectives.exchange_plan`:
        chunk holders to owners (``to_owners``) or owners to chunk holders; ``sendbuf`` is
        this rank's chunk or segment, ``receive`` its segment or chunk."""
        size = self.size
        sendcounts, sdispls = [0] * size, [0] * size
        recvcounts, rdispls = [0] * size, [0] * size
        sends, receives, local = v_collectives.exchange_plan(counts, self.rank, to_owners)
        for _, source, target, length in local:
            receive[target:target + length] = sendbuf[source:source + length]
        for peer, source, _, length in sends:
            sendcounts[peer], sdispls[peer] = length, source
        for peer, _, target, length in receives:
            recvcounts[peer], rdispls[peer] = length, target
        self._comm.Alltoallv([sendbuf, (sendcounts, sdispls), mpi_type],
                             [receive, (recvcounts, rdispls), mpi_type])
        itemsize = sendbuf.itemsize
        return moved + v_collectives.Traffic(
            sum(sendcounts) * itemsize, sum(recvcounts) * itemsize, len(sends), len(receives))

    def _two_phase_reduce_scatter(self, host, counts, mpi_type, mpi_sum):
        """MPI_Reduce_scatter_block of equal chunks (rank r sums chunk r), then each chunk
        holder sends every owner its piece of the owner's segment; returns (segment,
        traffic)."""
        size, rank = self.size, self.rank
        k = v_collectives.chunk_length(host.size, size)
        mine = numpy.empty(counts[rank], dtype=host.dtype)
        if k == 0:
            return mine, v_collectives.Traffic()
        padded = numpy.zeros(size * k, dtype=host.dtype)
        padded[:host.size] = host
        chunk = numpy.empty(k, dtype=host.dtype)
        self._comm.Reduce_scatter_block([padded, k, mpi_type], [chunk, k, mpi_type], mpi_sum)
        moved = v_collectives.equal_chunks_traffic(host.size, size, host.itemsize)
        moved = self._redistribute(chunk, mine, counts, True, mpi_type, moved)
        return mine, moved

    def _two_phase_allgather(self, host, counts, mpi_type):
        """Each owner sends every chunk holder its piece of that chunk, then an in-place
        MPI_Allgather of the equal chunks; returns (whole buffer, traffic)."""
        size, rank = self.size, self.rank
        k = v_collectives.chunk_length(sum(counts), size)
        if k == 0:
            return numpy.empty(0, dtype=host.dtype), v_collectives.Traffic()
        chunks = numpy.zeros((size, k), dtype=host.dtype)
        moved = self._redistribute(host, chunks[rank], counts, False, mpi_type,
                                   v_collectives.Traffic())
        self._comm.Allgather(MPI.IN_PLACE, [chunks, k, mpi_type])
        moved = moved + v_collectives.equal_chunks_traffic(sum(counts), size, host.itemsize)
        gathered = chunks.reshape(-1)
        return (gathered if gathered.size == sum(counts) else gathered[:sum(counts)].copy(),
                moved)

    def allreduce(self, array):
        xp = backend.get_array_module(array)
        host = _host_contiguous(array)
        return xp.asarray(self._allreduce_host(host, "allreduce"))

    def _allreduce_raw(self, host, mpi_type, mpi_sum):
        result = numpy.empty_like(host)
        self._comm.Allreduce([host, host.size, mpi_type], [result, result.size, mpi_type],
                             mpi_sum)
        return result

    def _allreduce_host(self, host, operation):
        mpi_type, mpi_sum = _mpi_type_and_sum(host.dtype, operation)
        start = time.perf_counter()
        result = self._allreduce_raw(host, mpi_type, mpi_sum)
        seconds = time.perf_counter() - start
        self._traffic.record(operation, *traffic.ring_allreduce_bytes(
            host.size, host.itemsize, self.size, self.rank), seconds)
        return result

    # -- object collectives ---------------------------------------------------
    def _check_root(self, root, operation):
        if not isinstance(root, (int, numpy.integer)) or not 0 <= root < self.size:
            raise ValueError(f"{operation}: root={root!r} is not a rank of this "
                             f"{self.size}-rank communicator")

    def bcast_obj(self, obj, root=0):
        """Pickle on ``root``, broadcast the length, then the bytes (chain model)."""
        self._check_root(root, "bcast_obj")
        start = time.perf_counter()
        payload = _pickled(obj) if self.rank == root else b""
        length = numpy.array([len(payload)], dtype=numpy.int64)
        self._comm.Bcast(length, root=root)
        buffer = bytearray(payload) if self.rank == root else bytearray(int(length[0]))
        self._comm.Bcast([buffer, MPI.BYTE], root=root)
        result = obj if self.rank == root else pickle.loads(buffer)
        seconds = time.perf_counter() - start
        self._traffic.record("bcast_obj", *traffic.chain_bcast_bytes(
            len(buffer), self.size, self.rank, root), seconds)
        return result

    def allreduce_obj(self, obj):
        """All-gather the pickled objects (ring model), then add them in rank order.

        Adding in rank order on every rank gives bit-identical results everywhere, which an
        MPI reduction of Python objects does not promise.
        """
        start = time.perf_counter()
        objects, lengths = self._allgather_pickled(obj)
        total = objects[0]
        for other in objects[1:]:
            total = total + other
        seconds = time.perf_counter() - start
        self._traffic.record("allreduce_obj",
                             *traffic.ring_allgather_bytes(lengths, self.rank), seconds)
        return total

    def _allgather_pickled(self, obj):
        payload = _pickled(obj)
        lengths = numpy.empty(self.size, dtype=numpy.int64)
        self._comm.Allgather(numpy.array([len(payload)], dtype=numpy.int64), lengths)
        lengths = lengths.tolist()
        buffer = bytearray(sum(lengths))
        offsets = _offsets(lengths)
        self._comm.Allgatherv([payload, MPI.BYTE], [buffer, (lengths, offsets), MPI.BYTE])
        objects = [pickle.loads(buffer[offset:offset + length])
                   for offset, length in zip(offsets, lengths)]
        return objects, lengths

    def gather_obj(self, obj, root=0):
        """Gather the pickled objects to ``root`` (direct model); None on the other ranks."""
        self._check_root(root, "gather_obj")
        start = time.perf_counter()
        payload = _pickled(obj)
        lengths = numpy.empty(self.size, dtype=numpy.int64) if self.rank == root else None
        self._comm.Gather(numpy.array([len(payload)], dtype=numpy.int64), lengths, root=root)
        if self.rank == root:
            lengths = lengths.tolist()
            offsets = _offsets(lengths)
            buffer = bytearray(sum(lengths))
            self._comm.Gatherv([payload, MPI.BYTE], [buffer, (lengths, offsets), MPI.BYTE],
                               root=root)
            result = [pickle.loads(buffer[offset:offset + length])
                      for offset, length in zip(offsets, lengths)]
            sent, received = 0, sum(lengths) - lengths[root]
        else:
            self._comm.Gatherv([payload, MPI.BYTE], None, root=root)
            result = None
            sent, received = len(payload), 0
        seconds = time.perf_counter() - start
        self._traffic.record("gather_obj", sent, received, seconds)
        return result

    def barrier(self):
        start = time.perf_counter()
        self._comm.Barrier()
        self._traffic.record("barrier", 0, 0, time.perf_counter() - start)
