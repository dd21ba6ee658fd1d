"""FunctionNode: one differentiable operation in the define-by-run graph."""
import weakref

from kfac_mn.configuration import config
from kfac_mn.function_hook import active_hooks
from kfac_mn.variable import Variable, as_variable


class FunctionNode:
    """Base class of differentiable functions (Chainer semantics).

    Subclasses implement ``forward(inputs)`` on a tuple of arrays, returning a
    tuple of arrays, and ``backward(target_input_indexes, grad_outputs)``
    returning one gradient array (or ``None``) per target index.  Inside
    ``forward`` they call ``retain_inputs``/``retain_outputs`` to keep exactly
    the arrays ``backward`` needs; nothing else is kept alive by the graph.
    """

    rank = 0
    inputs = ()
    outputs = ()
    _input_indexes_to_retain = ()
    _output_indexes_to_retain = ()
    _retained_output_data = None

    @property
    def label(self):
        return type(self).__name__

    def apply(self, inputs):
        """Run forward on Variables or arrays and return a tuple of Variables."""
        input_vars = [as_variable(x) for x in inputs]
        in_data = tuple(x.data for x in input_vars)
        hooks = active_hooks()
        for hook in hooks:
            hook.forward_preprocess(self, in_data)
        outputs = self.forward(in_data)
        if not isinstance(outputs, tuple):
            raise TypeError(f"{self.label}.forward must return a tuple")
        for hook in hooks:
            hook.forward_postprocess(self, in_data)

        requires_grad = config.enable_backprop and any(
            x.requires_grad for x in input_vars)
        output_vars = [Variable(y, requires_grad=requires_grad) for y in outputs]
        if requires_grad:
            self.rank = max(x.rank for x in input_vars)
            self.inputs = tuple(x.node for x in input_vars)
            for y in output_vars:
                y.node.set_creator(self)
            self.outputs = tuple(weakref.ref(y.node) for y in output_vars)
            for i in self._input_indexes_to_retain:
                self.inputs[i].retain_data()
            self._retained_output_data = tuple(
                outputs[i] for i in self._output_indexes_to_retain)
        return tuple(output_vars)

    def retain_inputs(self, indexes):
        self._input_indexes_to_retain = tuple(indexes)

    def retain_outputs(self, indexes):
        self._output_indexes_to_retain = tuple(indexes)

    def get_retained_inputs(self):
        return tuple(self.inputs[i].data for i in self._input_indexes_to_retain)

    def get_retained_outputs(self):
        return self._retained_output_data

    def forward(self, inputs):
        raise NotImplementedError

    def backward(self, target_input_indexes, grad_outputs):
        raise NotImplementedError(f"{self.label} is not differentiable")
