"""What the cost model knows of a model: its function calls per example and its work items.

One forward pass at batch 1 under :class:`ShapeTrace` records each call's activation size,
GEMM flops, im2col patch values and output positions; the work items (and through them the
Fisher blocks' statistic shapes and inversion costs, :mod:`kfac_mn.fisher.registry`) come
from the same model.
"""
import dataclasses

import numpy

from kfac_mn.configuration import no_backprop_mode, using_config
from kfac_mn.distributed.work_items import build_work_items
from kfac_mn.fisher import build_fisher_blocks
from kfac_mn.fisher.registry import registered_function_types
from kfac_mn.function_hook import FunctionHook
from kfac_mn.functions.batch_normalization import BatchNormalization as BatchNormFunction
from kfac_mn.functions.convolution_2d import Convolution2DFunction
from kfac_mn.functions.linear import LinearFunction
from kfac_mn.functions.patches import output_hw


@dataclasses.dataclass
class Call:
    """One function call of the forward pass, per example (traced at batch 1)."""

    label: str
    elements: int          # input activation values
    gemm_flops: int = 0    # forward GEMM flops (conv, linear)
    patch_values: int = 0  # im2col patch values S K (a convolution that is not pointwise)
    positions: int = 1     # output positions S (conv) or spatial size H W (BN)
    weight: int = 0        # id of the weight / gamma array (0: none)
    first: bool = False    # is the input the data (no gradient to propagate)


class ShapeTrace(FunctionHook):
    """Records a :class:`Call` per forward function call."""

    name = "ShapeTrace"

    def __init__(self, data):
        self.data_id = id(data)
        self.calls = []

    def forward_postprocess(self, function, in_data):
        x = in_data[0]
        call = Call(function.label, int(x.size), first=id(x) == self.data_id)
        if isinstance(function, Convolution2DFunction):
            W = in_data[1]
            out_h, out_w = output_hw(x.shape[2:], W.shape[2:], function.stride, function.pad)
            call.positions = out_h * out_w
            call.gemm_flops = 2 * call.positions * W[0].size * W.shape[0]
            pointwise = W.shape[2:] == (1, 1) and tuple(function.stride) == (1, 1) \
                and tuple(function.pad) == (0, 0)
            call.patch_values = 0 if pointwise else call.positions * W[0].size
            call.weight = id(W)
        elif isinstance(function, LinearFunction):
            call.gemm_flops = 2 * in_data[1].size
            call.weight = id(in_data[1])
        elif isinstance(function, BatchNormFunction):
            call.positions = int(x.size // x.shape[1])
            call.weight = id(in_data[1])
        elif isinstance(function, registered_function_types()):
            # another registered layer type: its Fisher block is costed from its statistic
            # shapes; the call itself only as the elementwise passes of its input
            call.weight = id(in_data[1])
        self.calls.append(call)


@dataclasses.dataclass
class Profile:
    """What the cost model needs to know about a model."""

    arch: str
    size: int
    calls: list        # Call per forward function, then the loss
    items: list        # work items of distributed K-FAC (kfac_mn.distributed.work_items)
    call_of: dict      # block path -> its Call
    parameters: int
    arrays: int        # parameter arrays


def trace_model(model, arch, size, in_channels=3, example_shape=None):
    """Shapes of ``model`` (named ``arch``) from one forward pass of a batch of 1 (float32,
    training mode): an ``in_channels`` x ``size`` x ``size`` image, or ``example_shape``."""
    shape = example_shape or (in_channels, size, size)
    x = numpy.zeros((1, *shape), dtype=numpy.float32)
    trace = ShapeTrace(x)
    with trace, no_backprop_mode(), using_config("train", True):
        y = model(x)
    calls = trace.calls + [Call("SoftmaxCrossEntropy", int(y.shape[1]))]
    items = build_work_items(model, build_fisher_blocks(model))
    by_weight = {call.weight: call for call in calls if call.weight}
    call_of = {item.name: by_weight[id(item.params[0][1].data)]
               for item in items if item.block is not None}
    params = [param for _, param in model.namedparams()]
    return Profile(arch, size, calls, items, call_of, sum(p.size for p in params), len(params))
