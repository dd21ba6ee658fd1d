"""Worker processes that build batches into shared memory, handed over without a copy.

Protocol. Batch ``j`` of a pool's life goes to worker ``j mod n_workers``; each worker
handles its tasks in order. A worker builds each batch's pixels straight into a
shared-memory segment of its own and sends the segment's id and name, the batch shape, the
(small, pickled) targets and the skipped examples; only such small messages cross the
pipes. The main process returns a view of the segment, without copying it. The segment is
lent to the main process until the last array viewing it is gone (a ``weakref.finalize``
on the array that owns the view; every view derived from it keeps it alive); its id then
travels back to the worker with the next task, and the worker reuses it. A worker keeps at
most ``prefetch`` idle segments and unlinks the rest, so memory follows what is in flight
and what the caller still holds. The main process keeps at most ``prefetch`` tasks in
flight per worker.

Shutdown. ``close()`` sets a stop event, sends ``None``, joins, and terminates what does
not exit. A worker checks the event before each example, so it abandons a batch in progress
instead of finishing it. Workers are daemonic, ignore SIGINT (the main process owns
shutdown), and exit on their own when their parent disappears; a worker unlinks all its
segments when it exits (arrays the caller still holds stay valid: their mapping outlives the
name). A ``multiprocessing.util.Finalize`` with an exit priority runs ``close()`` at
interpreter exit before multiprocessing reaps daemonic children, so nothing hangs and no
shared memory leaks.
"""
import gc
import math
import multiprocessing
import os
import pickle
import signal
import traceback
import weakref
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.util import Finalize

import cv2
import numpy

from utils.data.batch_builder import BatchCancelled
from utils.data.error_notes import add_note

_POLL_SECONDS = 0.2
_JOIN_SECONDS = 10.0


class _SharedArrayBuffer:
    """A shared-memory segment owned by a worker, grown (recreated) when too small; the
    names of segments it unlinks are appended to ``released``."""

    def __init__(self, released):
        self._memory = None
        self._released = released

    def array(self, shape, dtype=numpy.float32):
        dtype = numpy.dtype(dtype)
        nbytes = max(1, math.prod(shape) * dtype.itemsize)
        if self._memory is None or self._memory.size < nbytes:
            self.release()
            self._memory = shared_memory.SharedMemory(create=True, size=nbytes)
        return numpy.ndarray(shape, dtype=dtype, buffer=self._memory.buf)

    @property
    def name(self):
        return self._memory.name

    def release(self):
        if self._memory is None:
            return
        self._released.append(self._memory.name)
        _close_quietly(self._memory)
        self._memory.unlink()
        self._memory = None


class _SegmentPool:
    """A worker's segments by id: lent to the main process or idle (at most ``keep``)."""

    def __init__(self, keep):
        self.keep = keep
        self.released = []
        self._buffers = {}
        self._idle = []
        self._next_id = 0

    def take(self):
        if self._idle:
            segment_id = self._idle.pop()
        else:
            segment_id, self._next_id = self._next_id, self._next_id + 1
            self._buffers[segment_id] = _SharedArrayBuffer(self.released)
        return segment_id, self._buffers[segment_id]

    def give_back(self, segment_ids):
        for segment_id in segment_ids:
            if len(self._idle) < self.keep:
                self._idle.append(segment_id)
            else:
                self._buffers.pop(segment_id).release()

    def take_released(self):
        names, self.released[:] = list(self.released), []
        return names

    def release_all(self):
        for buffer in self._buffers.values():
            buffer.release()
        self._buffers.clear()
        self._idle.clear()


def _close_quietly(memory):
    try:
        memory.close()
    except BufferError:  # a NumPy view is still alive; the mapping goes when it does
        pass


class _AttachedSegment(shared_memory.SharedMemory):
    """A worker's segment mapped in the main process. Batches handed out may outlive the
    pool; when this object goes first, closing is left to the views (no BufferError)."""

    def __del__(self):
        try:
            _close_quietly(self)
        except OSError:
            pass


def _picklable(error):
    """The exception itself if it survives a pickle round trip, else a RuntimeError with its
    text; without its traceback, which would keep segment views alive."""
    error = error.with_traceback(None)
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _worker_main(connection, builder, prefetch, stop):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # one process per core already: no OpenCV thread pool on top
    gc.freeze()  # what the parent left is never scanned (nor its pages copied) by the GC
    parent = os.getppid()
    segments = _SegmentPool(keep=prefetch)
    try:
        while not stop.is_set():
            if not connection.poll(_POLL_SECONDS):
                if os.getppid() != parent:
                    return
                continue
            message = connection.recv()
            if message is None or stop.is_set():
                return
            task, returned = message
            segments.give_back(returned)
            segment_id, buffer = segments.take()
            try:
                x, targets, skipped = builder.build(*task, allocate=buffer.array,
                                                    cancelled=stop.is_set)
                reply = ("batch", segment_id, buffer.name, x.shape, targets, skipped)
                del x
            except BatchCancelled:  # close() was called: nobody reads this batch
                return
            except Exception as error:
                segments.give_back([segment_id])
                reply = ("error", _picklable(error), traceback.format_exc())
            connection.send(reply + (segments.take_released(),))
    except (EOFError, OSError):  # the main process went away
        return
    finally:
        segments.release_all()


def _return_segment(returned, worker, segment_id):
    returned[worker].append(segment_id)


class WorkerPool:
    """``n_workers`` processes running ``builder.build(*task)``, ``prefetch`` tasks each."""

    def __init__(self, builder, n_workers, prefetch, start_method=None):
        context = multiprocessing.get_context(start_method)
        resource_tracker.ensure_running()  # one tracker shared with the workers
        self.capacity = n_workers * prefetch
        self._stop = context.Event()
        self._connections, self._processes = [], []
        self._attached = {}
        self._returned = [[] for _ in range(n_workers)]  # segment ids to give back
        self._issued = self._received = 0
        # Registered first, so that workers started before a failing start are stopped too.
        self._finalizer = Finalize(self, _shutdown, exitpriority=10, args=(
            self._stop, self._connections, self._processes, self._attached))
        for worker in range(n_workers):
            main_end, worker_end = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(worker_end, builder, prefetch, self._stop),
                name=f"loader-worker-{worker}", daemon=True)
            process.start()
            worker_end.close()
            self._connections.append(main_end)
            self._processes.append(process)

    @property
    def in_flight(self):
        return self._issued - self._received

    def _died(self, worker):
        process = self._processes[worker]
        process.join(_POLL_SECONDS)
        return RuntimeError(f"loader worker {worker} (pid {process.pid}) died with exit code "
                            f"{process.exitcode}")

    def submit(self, task):
        if self.in_flight >= self.capacity:
            raise RuntimeError("loader worker pool is full; receive a batch first")
        worker = self._issued % len(self._connections)
        returned, self._returned[worker] = self._returned[worker], []
        try:
            self._connections[worker].send((task, returned))
        except OSError:
            raise self._died(worker) from None
        self._issued += 1

    def _receive_message(self):
        worker = self._received % len(self._connections)
        connection, process = self._connections[worker], self._processes[worker]
        while not connection.poll(_POLL_SECONDS):
            if not process.is_alive():
                raise self._died(worker)
        try:
            message = connection.recv()
        except (EOFError, OSError):
            raise self._died(worker) from None
        self._received += 1
        for name in message[-1]:
            memory = self._attached.pop(name, None)
            if memory is not None:
                _close_quietly(memory)
        return worker, process.pid, message[:-1]

    def receive(self):
        """Next result in submission order: ``(x, targets, skipped)``, ``x`` a view of the
        worker's segment (lent until no array views it). A worker's exception is re-raised
        here with the worker traceback as a note."""
        worker, pid, message = self._receive_message()
        if message[0] == "error":
            _, error, worker_traceback = message
            add_note(error, f"raised in loader worker {worker} (pid {pid}):\n{worker_traceback}")
            raise error
        _, segment_id, name, shape, targets, skipped = message
        owner = numpy.frombuffer(self._attach(name).buf, numpy.float32, count=math.prod(shape))
        weakref.finalize(owner, _return_segment, self._returned, worker, segment_id).atexit = False
        return owner.reshape(shape), targets, skipped

    def discard_in_flight(self):
        """Wait for every submitted task and drop its result (errors included)."""
        while self.in_flight:
            worker, _, message = self._receive_message()
            if message[0] == "batch":
                self._returned[worker].append(message[1])

    def _attach(self, name):
        if name not in self._attached:
            self._attached[name] = _AttachedSegment(name=name)
        return self._attached[name]

    def close(self):
        self._finalizer()


def _shutdown(stop, connections, processes, attached):
    stop.set()
    for connection in connections:
        try:
            connection.send(None)
        except OSError:
            pass
    for process in processes:
        process.join(_JOIN_SECONDS)
        if process.is_alive():
            process.terminate()
            process.join()
    for memory in attached.values():
        _close_quietly(memory)
        try:  # left behind by a worker that was terminated
            memory.unlink()
        except FileNotFoundError:
            pass
    attached.clear()
    for connection in connections:
        connection.close()
