"""Variables and the backward pass of the define-by-run graph.

The graph is split as in Chainer: a :class:`Variable` is what the user holds
(data and grad); its :class:`VariableNode` is what the graph holds (creator,
rank, and the data only when a function retained it).  Function nodes hold
their input nodes strongly and their output nodes weakly, so the graph has no
reference cycles and is freed as soon as the last Variable of it goes away.
"""
import heapq
import weakref

from kfac_mn import backend
from kfac_mn.function_hook import active_hooks


class VariableNode:
    __slots__ = ("creator", "rank", "requires_grad", "data", "shape", "dtype",
                 "_variable", "__weakref__")

    def __init__(self, variable, requires_grad):
        self.creator = None
        self.rank = 0
        self.requires_grad = requires_grad
        self.data = None  # set only when a function retains it
        self.shape = None if variable.data is None else variable.data.shape
        self.dtype = None if variable.data is None else variable.data.dtype
        self._variable = weakref.ref(variable)

    def set_creator(self, function):
        self.creator = function
        self.rank = function.rank + 1

    def retain_data(self):
        variable = self._variable()
        if variable is None:
            raise RuntimeError("cannot retain the data of a freed variable")
        self.data = variable.data

    def get_variable_or_none(self):
        return self._variable()


class Variable:
    """An array with a gradient and a link to the function that created it."""

    __array_priority__ = 200

    def __init__(self, data=None, name=None, requires_grad=True):
        self.data = data
        self.name = name
        self.grad = None
        self.node = VariableNode(self, requires_grad)

    # -- array-like -------------------------------------------------------
    @property
    def array(self):
        return self.data

    @array.setter
    def array(self, value):
        self.data = value

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def xp(self):
        return backend.get_array_module(self.data)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        name = f" {self.name}" if self.name else ""
        return f"variable{name}({self.data!r})"

    # -- graph ------------------------------------------------------------
    @property
    def creator(self):
        return self.node.creator

    @property
    def requires_grad(self):
        return self.node.requires_grad

    @property
    def rank(self):
        return self.node.rank

    def cleargrad(self):
        self.grad = None

    def unchain(self):
        """Cut the link to the creator; this variable becomes a leaf."""
        self.node.creator = None
        self.node.rank = 0

    def to_cpu(self):
        self.data = backend.to_cpu(self.data)
        if self.grad is not None:
            self.grad = backend.to_cpu(self.grad)

    def to_gpu(self, device=None):
        self.data = backend.to_gpu(self.data, device)
        if self.grad is not None:
            self.grad = backend.to_gpu(self.grad, device)

    def backward(self, retain_grad=False):
        """Back-propagate from this variable through its whole graph.

        Functions run in decreasing rank (topological) order.  Leaf variables
        accumulate into ``.grad`` (a variable used twice gets the sum).
        Intermediate gradients are dropped as soon as they are used unless
        ``retain_grad`` is true.
        """
        if self.creator is None:
            return
        if self.grad is None:
            if self.data.size != 1:
                raise ValueError(
                    "backward() from a non-scalar variable needs its .grad set "
                    f"(shape {self.shape})")
            self.grad = self.xp.ones_like(self.data)
        grads = {self.node: self.grad}
        heap = []
        seen = set()

        def push(function):
            if function not in seen:
                seen.add(function)
                heapq.heappush(heap, (-function.rank, id(function), function))

        push(self.creator)
        hooks = active_hooks()
        while heap:
            function = heapq.heappop(heap)[2]
            outputs = [ref() for ref in function.outputs]
            out_grad = tuple(None if node is None else grads.pop(node, None)
                             for node in outputs)
            if retain_grad:
                for node, gy in zip(outputs, out_grad):
                    variable = None if node is None else node.get_variable_or_none()
                    if variable is not None:
                        variable.grad = gy
            if all(gy is None for gy in out_grad):
                continue
            targets = tuple(i for i, node in enumerate(function.inputs)
                            if node.requires_grad)
            if not targets:
                continue
            in_data = tuple(node.data for node in function.inputs)
            for hook in hooks:
                hook.backward_preprocess(function, in_data, out_grad)
            in_grad = function.backward(targets, out_grad)
            for hook in hooks:
                hook.backward_postprocess(function, in_data, out_grad)
            if len(in_grad) != len(targets):
                raise ValueError(
                    f"{function.label}.backward returned {len(in_grad)} gradients "
                    f"for {len(targets)} inputs")
            given = []
            for i, gx in zip(targets, in_grad):
                if gx is None:
                    continue
                if any(gx is g for g in given):
                    gx = gx.copy()  # never let two gradients share memory
                given.append(gx)
                node = function.inputs[i]
                if node.creator is None:
                    variable = node.get_variable_or_none()
                    if variable is not None:
                        variable.grad = gx if variable.grad is None else variable.grad + gx
                elif node in grads:
                    grads[node] = grads[node] + gx
                else:
                    grads[node] = gx
                    push(node.creator)

    # -- arithmetic (defined in kfac_mn.functions.basic_math) --------------
    def reshape(self, *shape):
        from kfac_mn.functions import reshape
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return reshape(self, shape)

    def transpose(self, *axes):
        from kfac_mn.functions import transpose
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return transpose(self, axes or None)

    @property
    def T(self):
        return self.transpose()

    def sum(self, axis=None, keepdims=False):
        from kfac_mn.functions import sum as sum_
        return sum_(self, axis, keepdims)

    def __getitem__(self, index):
        from kfac_mn.functions import get_item
        return get_item(self, index)


class Parameter(Variable):
    """A Variable owned by a Link; optimizers update it through an UpdateRule."""

    def __init__(self, data=None, name=None):
        super().__init__(data, name=name)
        self.update_rule = None

    def initialize(self, data):
        self.data = data
        self.node.shape = data.shape
        self.node.dtype = data.dtype


def as_variable(x):
    """Wrap an array as a Variable that needs no gradient; pass Variables through."""
    if isinstance(x, Variable):
        return x
    return Variable(x, requires_grad=False)


def as_array(x):
    return x.data if isinstance(x, Variable) else x
