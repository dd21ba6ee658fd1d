"""Stage 4's trailer: the values each rank appends to its segment of the all-gather.

After its preconditioned gradients, a rank sends

* for float16 communication, the scale exponent of each of its segments (it scaled them by
  their own largest magnitude, which the other ranks cannot know), and
* with the adaptive refresh schedule, the schedule state of each layer it owns: its interval
  and the steps to its next refresh (the owner decides them from the relative change of the
  factors, and every rank needs them to agree on the next step's due layers).

All are small integers, exact in the communication dtype (``EXACT_INTEGER_LIMIT``).
"""
import numpy

from kfac_mn import backend

#: the largest integer magnitude each communication dtype holds exactly
EXACT_INTEGER_LIMIT = {numpy.dtype(numpy.float16): 2 ** 11, numpy.dtype(numpy.float32): 2 ** 24,
                       numpy.dtype(numpy.float64): 2 ** 53}


def trailer_length(n_segments, scheduled_layers, half):
    """Values in a rank's trailer: ``n_segments`` exponents (float16) and 2 per layer whose
    schedule state it sends."""
    return (n_segments if half else 0) + 2 * len(scheduled_layers)


def build_trailer(exponents, schedule, scheduled_layers, step):
    """The trailer as a list: the exponents (or none), then each layer's
    :meth:`~kfac_mn.fisher.refresh_schedule.StatisticsSchedule.layer_state`."""
    values = [] if exponents is None else list(exponents)
    for path in scheduled_layers:
        values.extend(schedule.layer_state(path, step))
    return values


def read_trailer(values, rank, n_segments, half, schedule, scheduled_layers, step):
    """Apply a gathered trailer of ``rank`` to ``schedule``; returns its exponents (None
    without float16).  Every value must be a whole number, or the buffers are misaligned."""
    host = backend.to_cpu(values).astype(numpy.float64)
    if not numpy.array_equal(host, numpy.round(host)):
        raise ValueError(f"DistributedKFAC: the all-gather trailer of rank {rank} is not "
                         f"integral ({host.tolist()}); the buffers are misaligned")
    host = host.astype(numpy.int64)
    exponents = host[:n_segments] if half else None
    state = host[n_segments:] if half else host
    for index, path in enumerate(scheduled_layers):
        schedule.set_layer_state(path, step, state[2 * index], state[2 * index + 1])
    return exponents
