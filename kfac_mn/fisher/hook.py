"""The FunctionHook that feeds the Fisher blocks, keeping K-FAC outside the autograd.

Forward: a call of one of a block's ``function_types`` (see
:mod:`kfac_mn.fisher.registry`) whose second input is that block's first parameter hands its
inputs to the block (a linear or convolution block keeps the activations; a batch-norm block
reads ``x_hat`` from the node later).  Backward: the same call hands over the gradient of its
output.  The layer is recognised by its parameter array: ``in_data[1]`` is the weight (or
gamma) array of the link, the very object the link holds.

Only the layers in ``active`` (those due for a refresh this step) are
collected, so stale steps cost no factor computation.
"""
import time

from kfac_mn.backend import synchronize
from kfac_mn.function_hook import FunctionHook


class KFACHook(FunctionHook):
    name = "KFACHook"

    def __init__(self, blocks, active):
        """``blocks``: path -> block; ``active``: the paths to collect this time."""
        self._blocks = [blocks[path] for path in active]
        self._by_array = {}
        self._uninitialized = True
        self._index_arrays()
        self._by_function = {}
        self.forward_seconds = 0.0   # time spent on factor work inside the forward pass
        self.backward_seconds = 0.0  # ... and inside the backward pass

    def _index_arrays(self):
        # A lazily initialised weight gets its array only at its first call.
        self._by_array = {}
        self._uninitialized = False
        for block in self._blocks:
            data = block.param_list()[0].data
            if data is None:
                self._uninitialized = True
            else:
                self._by_array[id(data)] = block

    def _block_of(self, function, in_data):
        if len(in_data) < 2:
            return None
        block = self._by_array.get(id(in_data[1]))
        if block is None and self._uninitialized:
            self._index_arrays()
            block = self._by_array.get(id(in_data[1]))
        if block is None or not isinstance(function, block.function_types):
            return None
        return block

    def forward_postprocess(self, function, in_data):
        block = self._block_of(function, in_data)
        if block is None:
            return
        start = time.perf_counter()
        block.accumulate_forward(function, in_data)
        synchronize(in_data[0])
        self.forward_seconds += time.perf_counter() - start
        self._by_function[id(function)] = (function, block)

    def backward_preprocess(self, function, in_data, out_grad):
        entry = self._by_function.get(id(function))
        if entry is None or out_grad[0] is None:
            return
        start = time.perf_counter()
        entry[1].accumulate_backward(function, in_data, out_grad)
        synchronize(out_grad[0])
        self.backward_seconds += time.perf_counter() - start
