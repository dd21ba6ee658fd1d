"""Collectives over NCCL for CuPy arrays; MPI (the parent class) for everything else.

Each process drives the GPU ``intra_rank`` of its node.  Rank 0 creates the NCCL unique id
and MPI broadcasts it; every rank then joins one NCCL communicator.  CuPy arrays in the array
collectives and the model-level ones go over NCCL on CuPy's current stream, so they are
ordered after the kernels that produced them without any host synchronisation; NumPy arrays
and Python objects go over MPI, as in :class:`MpiCommunicator`, after the current stream is
synchronised (so no MPI call can race a kernel still writing what it sends).

NCCL has no variable-count reduce-scatter or all-gather: every rank contributes one count.
Three algorithms (``v_algorithms``, :mod:`kfac_mn.communicators.v_collectives`): ``native``
pads every segment to the largest (:mod:`~kfac_mn.communicators.padding`; a ring moves
(P-1) * width elements each way), ``allreduce`` all-reduces the whole buffer (2 (P-1)/P * B)
and ``two_phase`` runs ncclReduceScatter / ncclAllGather over equal chunks and the
redistribution of ``v_collectives.exchange_plan`` as grouped ncclSend / ncclRecv (the same
plan MPI runs as one Alltoallv).  ``auto`` picks the cheaper of ``native`` and ``allreduce``
under the alpha-beta model; ``two_phase`` is opt-in (``collectives="two_phase"``) until it
has been measured on more than one GPU.

The stats count each call's algorithm under its operation, so the traffic report says plainly
what ran.  Bytes follow the ring model of :mod:`kfac_mn.communicators.traffic`, counting the
padding that is really moved (``two_phase``: ``v_collectives.traffic``); seconds are measured
with the stream synchronised at both ends of the collective.

float16, float32 and float64 buffers are supported (NCCL sums float16 in float16, as MPI's
user-defined float16 sum does).  All ranks must call every collective in the same order
with the same counts, as with MPI.
"""
import dataclasses
import time

import numpy

from kfac_mn import backend
from kfac_mn.communicators import parameter_buffer, require_nccl, traffic, v_collectives
from kfac_mn.communicators.mpi_communicator import MpiCommunicator, _checked_counts
from kfac_mn.communicators.padding import pad_segments, unpad_segments

_NCCL_TYPE_NAMES = {numpy.dtype(numpy.float16): "NCCL_FLOAT16",
                    numpy.dtype(numpy.float32): "NCCL_FLOAT32",
                    numpy.dtype(numpy.float64): "NCCL_FLOAT64"}


class NcclCommunicator(MpiCommunicator):
    """The collectives of :class:`CommunicatorBase` on NCCL for CuPy arrays, MPI otherwise.

    ``mpi_comm`` defaults to ``MPI.COMM_WORLD``.  The process's device becomes the current
    CUDA device; CuPy arrays given to the collectives must live on it.
    """

    v_algorithms = ("native", "two_phase", "allreduce")
    auto_algorithms = ("native", "allreduce")

    def __init__(self, mpi_comm=None, **collective_options):
        nccl = require_nccl()
        super().__init__(mpi_comm, **collective_options)
        cupy = backend.cupy
        # every rank learns of a rank without a GPU, so that none waits for it in NCCL
        layout = self._comm.allgather((self.intra_rank, cupy.cuda.runtime.getDeviceCount()))
        short = [f"rank {rank} (process {index} of a node with {devices} GPU(s))"
                 for rank, (index, devices) in enumerate(layout) if index >= devices]
        if short:
            raise RuntimeError(f"NcclCommunicator: no CUDA device left for {', '.join(short)}; "
                               "start at most one process per visible GPU")
        self.device = cupy.cuda.Device(self.intra_rank)
        self.device.use()
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self._comm.bcast(unique_id, root=0)
        self._nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self._nccl_types = {dtype: getattr(nccl, name) for dtype, name in
                            _NCCL_TYPE_NAMES.items()}
        self._nccl_sum = nccl.NCCL_SUM
        self._nccl_group = (nccl.groupStart, nccl.groupEnd)

    # -- helpers ------------------------------------------------------------------
    def _nccl_type(self, dtype, operation):
        dtype = numpy.dtype(dtype)
        if dtype not in self._nccl_types:
            raise TypeError(f"{operation}: dtype {dtype} is not supported; "
                            "use float64, float32 or float16")
        return self._nccl_types[dtype]

    def _device_vector(self, array, operation):
        if array.device.id != self.device.id:
            raise ValueError(f"{operation}: the buffer is on GPU {array.device.id}, this rank's "
                             f"NCCL communicator on GPU {self.device.id}")
        vector = backend.cupy.ascontiguousarray(array)
        if vector.ndim != 1:
            raise ValueError(f"{operation}: sendbuf must be 1-D, got shape {vector.shape}")
        return vector

    def _run(self, operation, count, collective, moved, algorithm=None):
        """Run ``collective(stream pointer)`` (skipped for 0 elements) and record it:
        ``moved`` is (bytes sent, bytes received) by the ring model, NCCL's own messages not
        counted, or for ``two_phase`` also (messages sent, messages received): the ring
        model's and the redistribution's own."""
        backend.synchronize()
        start = time.perf_counter()
        if count:
            collective(backend.cupy.cuda.get_current_stream().ptr)
            backend.synchronize()
        self._traffic.record(operation, *moved[:2], time.perf_counter() - start, *moved[2:],
                             algorithm=algorithm)

    def _exchange(self, source, target, counts, to_owners, nccl_type, stream):
        """``v_collectives.exchange_plan`` as one group of ncclSend / ncclRecv: ``source``
        is this rank's chunk or segment, ``target`` its segment or chunk."""
        sends, receives, local = v_collectives.exchange_plan(counts, self.rank, to_owners)
        for _, start, at, length in local:
            target[at:at + length] = source[start:start + length]
        itemsize = source.itemsize
        group_start, group_end = self._nccl_group
        group_start()
        try:
            for peer, start, _, length in sends:
                self._nccl.send(source.data.ptr + start * itemsize, length, nccl_type, peer,
                                stream)
            for peer, _, at, length in receives:
                self._nccl.recv(target.data.ptr + at * itemsize, length, nccl_type, peer,
                                stream)
        finally:
            group_end()

    def _two_phase_reduce_scatter(self, send, counts, nccl_type):
        """ncclReduceScatter of equal chunks (rank r sums chunk r), then the chunk holders
        send every owner its pieces."""
        cupy = backend.cupy
        k = v_collectives.chunk_length(send.size, self.size)
        padded = cupy.zeros(self.size * k, dtype=send.dtype)
        padded[:send.size] = send
        chunk = cupy.empty(k, dtype=send.dtype)
        mine = cupy.empty(counts[self.rank], dtype=send.dtype)

        def collective(stream):
            self._nccl.reduceScatter(padded.data.ptr, chunk.data.ptr, k, nccl_type,
                                     self._nccl_sum, stream)
            self._exchange(chunk, mine, counts, True, nccl_type, stream)

        self._run("reduce_scatter_v", k, collective, dataclasses.astuple(v_collectives.traffic(
            "two_phase", "reduce_scatter_v", counts, send.itemsize, self.rank)), "two_phase")
        return mine

    def _two_phase_allgather(self, send, counts, nccl_type):
        """Every owner sends each chunk holder its piece of that chunk, then an in-place
        ncclAllGather of the equal chunks."""
        cupy = backend.cupy
        k = v_collectives.chunk_length(sum(counts), self.size)
        chunks = cupy.zeros(self.size * k, dtype=send.dtype)
        mine = chunks[self.rank * k:(self.rank + 1) * k]

        def collective(stream):
            self._exchange(send, mine, counts, False, nccl_type, stream)
            self._nccl.allGather(mine.data.ptr, chunks.data.ptr, k, nccl_type, stream)

        self._run("allgather_v", k, collective, dataclasses.astuple(v_collectives.traffic(
            "two_phase", "allgather_v", counts, send.itemsize, self.rank)), "two_phase")
        return chunks if chunks.size == sum(counts) else chunks[:sum(counts)].copy()

    def _allreduce_device(self, vector, operation, algorithm=None):
        result = backend.cupy.empty_like(vector)
        nccl_type = self._nccl_type(vector.dtype, operation)
        self._run(operation, vector.size,
                  lambda stream: self._nccl.allReduce(vector.data.ptr, result.data.ptr,
                                                      vector.size, nccl_type, self._nccl_sum,
                                                      stream),
                  traffic.ring_allreduce_bytes(vector.size, vector.itemsize, self.size,
                                               self.rank), algorithm)
        return result

    # -- model-level collectives ----------------------------------------------
    def bcast_data(self, model):
        params = parameter_buffer.ordered_named_params(model, "bcast_data")
        if not params or not backend.is_gpu_array(params[0][1].data):
            backend.synchronize()
            return super().bcast_data(model)
        buffer = parameter_buffer.pack_data(params)
        nccl_type = self._nccl_type(buffer.dtype, "bcast_data")
        self._run("bcast_data", buffer.size,
                  lambda stream: self._nccl.bcast(buffer.data.ptr, buffer.size, nccl_type, 0,
                                                  stream),
                  traffic.chain_bcast_bytes(buffer.nbytes, self.size, self.rank, 0))
        parameter_buffer.unpack_data(buffer, params)

    def multi_node_mean_grad(self, model):
        params = parameter_buffer.ordered_named_params(model, "multi_node_mean_grad")
        if not params or not backend.is_gpu_array(params[0][1].data):
            backend.synchronize()
            return super().multi_node_mean_grad(model)
        summed = self._allreduce_device(parameter_buffer.pack_grads(params),
                                        "multi_node_mean_grad")
        summed /= summed.dtype.type(self.size)
        parameter_buffer.unpack_grads(summed, params)

    # -- array collectives ----------------------------------------------------
    def reduce_scatter_v(self, sendbuf, counts):
        if not backend.is_gpu_array(sendbuf):
            backend.synchronize()
            return super().reduce_scatter_v(sendbuf, counts)
        operation = "reduce_scatter_v"
        counts = _checked_counts(counts, self.size, operation)
        send = self._device_vector(sendbuf, operation)
        if send.size != sum(counts):
            raise ValueError(f"{operation}: sendbuf has {send.size} elements but sum(counts) "
                             f"is {sum(counts)}")
        nccl_type = self._nccl_type(send.dtype, operation)
        mine = counts[self.rank]
        width = max(counts)
        algorithm = self.v_algorithm(operation, counts, send.itemsize)
        if algorithm == "two_phase":
            return self._two_phase_reduce_scatter(send, counts, nccl_type)
        if algorithm == "allreduce":
            offset = sum(counts[:self.rank])
            summed = self._allreduce_device(send, operation, "allreduce")
            return summed[offset:offset + mine].copy()
        cupy = backend.cupy
        equal = all(count == width for count in counts)
        padded = send if equal else pad_segments(cupy, send, counts, width)
        received = cupy.empty(width, dtype=send.dtype)
        self._run(operation, width,
                  lambda stream: self._nccl.reduceScatter(padded.data.ptr, received.data.ptr,
                                                          width, nccl_type,
                                                          self._nccl_sum, stream),
                  traffic.ring_reduce_scatter_bytes([width * send.itemsize] * self.size,
                                                    self.rank), "native")
        return received if mine == width else received[:mine].copy()

    def allgather_v(self, sendbuf, counts):
        if not backend.is_gpu_array(sendbuf):
            backend.synchronize()
            return super().allgather_v(sendbuf, counts)
        operation = "allgather_v"
        counts = _checked_counts(counts, self.size, operation)
        send = self._device_vector(sendbuf, operation)
        if send.size != counts[self.rank]:
            raise ValueError(f"{operation}: rank {self.rank} sends {send.size} elements but "
                             f"counts[{self.rank}] is {counts[self.rank]}")
        nccl_type = self._nccl_type(send.dtype, operation)
        cupy = backend.cupy
        width = max(counts)
        algorithm = self.v_algorithm(operation, counts, send.itemsize)
        if algorithm == "two_phase":
            return self._two_phase_allgather(send, counts, nccl_type)
        if algorithm == "allreduce":
            offset = sum(counts[:self.rank])
            placed = cupy.zeros(sum(counts), dtype=send.dtype)
            placed[offset:offset + send.size] = send
            return self._allreduce_device(placed, operation, "allreduce")
        padded = send if send.size == width else pad_segments(cupy, send, [send.size], width)
        gathered = cupy.empty(width * self.size, dtype=send.dtype)
        self._run(operation, width,
                  lambda stream: self._nccl.allGather(padded.data.ptr, gathered.data.ptr,
                                                      width, nccl_type, stream),
                  traffic.ring_allgather_bytes([width * send.itemsize] * self.size,
                                               self.rank), "native")
        if all(count == width for count in counts):
            return gathered
        return unpad_segments(cupy, gathered, counts, width)

    def allreduce(self, array):
        if not backend.is_gpu_array(array):
            backend.synchronize()
            return super().allreduce(array)
        flat = self._device_vector(array.reshape(-1), "allreduce")
        return self._allreduce_device(flat, "allreduce").reshape(array.shape)

    # -- object collectives (MPI) ---------------------------------------------
    def bcast_obj(self, obj, root=0):
        backend.synchronize()
        return super().bcast_obj(obj, root)

    def allreduce_obj(self, obj):
        backend.synchronize()
        return super().allreduce_obj(obj)

    def gather_obj(self, obj, root=0):
        backend.synchronize()
        return super().gather_obj(obj, root)

    def barrier(self):
        backend.synchronize()
        super().barrier()
