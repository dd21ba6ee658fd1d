"""Device memory one worker needs, for planning a run: any traced model, batch, world size.

An estimate from the shapes alone (:mod:`kfac_mn.cost_model.trace`), the largest of the step's
moments rather than a sum of everything ever allocated; a GPU run also holds CUDA's context and
CuPy's pool rounding, which the total leaves out.  In bytes, per worker:

- ``weights``: parameters, their gradients and the momentum (3 copies, ``dtype``);
- ``activations``: what the forward keeps for the backward, one input per function call,
  times the batch (a micro-batch with ``--acc-iters``);
- ``workspace``: the largest transient of one call: a convolution's im2col patches (forward,
  and for K-FAC's A on refresh steps) or two activation-sized gradients in the backward;
- ``kfac_state``: K-FAC's running factors and damped inverses of the layers this worker owns
  (the most loaded worker of the greedy assignment), plus the statistic sums of every due layer
  during a refresh step (every worker computes them for all layers before stage 2);
- ``buffers``: the packed communication buffer of stage 2 (gradients and upper triangles of
  all layers, in the communication dtype) and the received segment.
"""
import math

import numpy

from kfac_mn.cost_model.bytes_per_step import full_and_packed_sizes
from kfac_mn.distributed import assignment


def memory_per_worker(profile, batch, workers=1, optimizer="kfac", dtype="float32",
                      comm_dtype="float32"):
    """``{component: bytes, 'total': bytes}`` of one worker (see the module docstring)."""
    itemsize = numpy.dtype(dtype).itemsize
    comm_itemsize = numpy.dtype(comm_dtype).itemsize
    estimate = {
        "weights": 3 * profile.parameters * itemsize,
        "activations": batch * sum(call.elements for call in profile.calls) * itemsize,
        "workspace": batch * max(max(call.patch_values, 2 * call.elements)
                                 for call in profile.calls) * itemsize,
        "kfac_state": 0,
        "buffers": 0,
    }
    if optimizer == "kfac":
        items = profile.items
        owners = assignment.assign(items, workers, "balanced")
        owned = [0] * workers
        for item, owner in zip(items, owners):
            if item.block is not None:
                owned[owner] += sum(math.prod(shape)
                                    for shape in item.statistic_shapes().values())
        gradients, full, packed = full_and_packed_sizes(items)
        # factors + inverses of the owned layers (float32), the sums of all layers
        estimate["kfac_state"] = (2 * max(owned) + full) * 4
        estimate["buffers"] = (gradients + packed) * comm_itemsize * 2
    estimate["total"] = sum(estimate.values())
    return estimate
