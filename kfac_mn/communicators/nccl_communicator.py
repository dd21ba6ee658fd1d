"""Collectives over NCCL for CuPy arrays; MPI (the parent class) for everything else.

Each process drives the GPU ``intra_rank`` of its node.  Rank 0 creates the NCCL unique id
and MPI broadcasts it; every rank then joins one NCCL communicator.  CuPy arrays in the array
collectives and the model-level ones go over NCCL on CuPy's current stream, so they are
ordered after the kernels that produced them without any host synchronisation; NumPy arrays
and Python objects go over MPI, as in :class:`MpiCommunicator`, after the current stream is
synchronised (so no MPI call can race a kernel still writing what it sends).

NCCL has no variable-count reduce-scatter or all-gather: every rank contributes one count.
Two algorithms (``v_algorithms``; ``two_phase`` runs on MPI only): ``native`` pads every
segment to the largest (:mod:`~kfac_mn.communicators.padding`; a ring moves (P-1) * width
elements each way) and ``allreduce`` all-reduces the whole buffer (2 (P-1)/P * B); ``auto``
picks the cheaper under the alpha-beta model (:mod:`kfac_mn.communicators.v_collectives`).
The stats name the all-reduce's operation ``reduce_scatter_v_as_allreduce`` or
``allgather_v_as_allreduce`` and count each call's algorithm, so the traffic report says
plainly what ran.  Bytes follow the
ring model of :mod:`kfac_mn.communicators.traffic`, counting the padding that is really moved;
seconds are measured with the stream synchronised at both ends of the collective.

float16, float32 and float64 buffers are supported (NCCL sums float16 in float16, as MPI's
user-defined float16 sum does).  All ranks must call every collective in the same order
with the same counts, as with MPI.
"""
import time

import numpy

from kfac_mn import backend
from kfac_mn.communicators import parameter_buffer, require_nccl, traffic
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

    v_algorithms = ("native", "allreduce")

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

    def _run(self, operation, count, collective, bytes_moved, algorithm=None):
        """Run ``collective(stream pointer)`` (skipped for 0 elements) and record it (bytes
        by the ring model; NCCL's messages are its own and are not counted)."""
        backend.synchronize()
        start = time.perf_counter()
        if count:
            collective(backend.cupy.cuda.get_current_stream().ptr)
            backend.synchronize()
        self._traffic.record(operation, *bytes_moved, time.perf_counter() - start,
                             algorithm=algorithm)

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
        if self.v_algorithm(operation, counts, send.itemsize) == "allreduce":
            offset = sum(counts[:self.rank])
            summed = self._allreduce_device(send, operation + "_as_allreduce", "allreduce")
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
        if self.v_algorithm(operation, counts, send.itemsize) == "allreduce":
            offset = sum(counts[:self.rank])
            placed = cupy.zeros(sum(counts), dtype=send.dtype)
            placed[offset:offset + send.size] = send
            return self._allreduce_device(placed, operation + "_as_allreduce", "allreduce")
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
