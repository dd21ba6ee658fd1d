"""Elementwise arithmetic and small array ops used to build losses and tests."""
from kfac_mn import backend
from kfac_mn.function_node import FunctionNode
from kfac_mn.variable import Variable, as_array


def _sum_to(x, shape):
    """Sum a broadcast gradient back to ``shape`` (the inverse of broadcasting)."""
    if x.shape == shape:
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and x.shape[lead + i] != 1)
    y = x.sum(axis=axes, keepdims=True)
    return y.reshape(shape)


def _same_array(x, like):
    xp = backend.get_array_module(like)
    return xp.asarray(x, dtype=like.dtype)


class Add(FunctionNode):
    def forward(self, inputs):
        x0, x1 = inputs
        self._shapes = (x0.shape, x1.shape)
        return (x0 + x1,)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        return tuple(_sum_to(gy, self._shapes[i]) for i in indexes)


class Mul(FunctionNode):
    def forward(self, inputs):
        self.retain_inputs((0, 1))
        x0, x1 = inputs
        return (x0 * x1,)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        x0, x1 = self.get_retained_inputs()
        other = (x1, x0)
        shapes = (x0.shape, x1.shape)
        return tuple(_sum_to(gy * other[i], shapes[i]) for i in indexes)


class Div(FunctionNode):
    def forward(self, inputs):
        self.retain_inputs((0, 1))
        x0, x1 = inputs
        return (x0 / x1,)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        x0, x1 = self.get_retained_inputs()
        grads = {0: lambda: _sum_to(gy / x1, x0.shape),
                 1: lambda: _sum_to(-gy * x0 / (x1 * x1), x1.shape)}
        return tuple(grads[i]() for i in indexes)


class Neg(FunctionNode):
    def forward(self, inputs):
        return (-inputs[0],)

    def backward(self, indexes, grad_outputs):
        return (-grad_outputs[0],)


class PowConst(FunctionNode):
    def __init__(self, exponent):
        self.exponent = exponent

    def forward(self, inputs):
        self.retain_inputs((0,))
        x, = inputs
        return (x ** self.exponent,)

    def backward(self, indexes, grad_outputs):
        x, = self.get_retained_inputs()
        gy, = grad_outputs
        return (gy * (self.exponent * x ** (self.exponent - 1)),)


class Reshape(FunctionNode):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, inputs):
        x, = inputs
        self._in_shape = x.shape
        return (x.reshape(self.shape),)

    def backward(self, indexes, grad_outputs):
        return (grad_outputs[0].reshape(self._in_shape),)


class Transpose(FunctionNode):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, inputs):
        x, = inputs
        self._ndim = x.ndim
        return (x.transpose(self.axes),)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        if self.axes is None:
            return (gy.transpose(),)
        inverse = [0] * self._ndim
        for i, a in enumerate(self.axes):
            inverse[a % self._ndim] = i
        return (gy.transpose(inverse),)


class Sum(FunctionNode):
    def __init__(self, axis, keepdims):
        if isinstance(axis, int):
            axis = (axis,)
        self.axis = axis
        self.keepdims = keepdims

    def forward(self, inputs):
        x, = inputs
        self._in_shape = x.shape
        return (x.sum(axis=self.axis, keepdims=self.keepdims),)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        xp = backend.get_array_module(gy)
        ndim = len(self._in_shape)
        if self.axis is not None and not self.keepdims:
            axes = sorted(a % ndim for a in self.axis)
            for a in axes:
                gy = xp.expand_dims(gy, a)
        return (xp.broadcast_to(gy, self._in_shape).copy(),)


class GetItem(FunctionNode):
    def __init__(self, index):
        self.index = index

    def forward(self, inputs):
        x, = inputs
        self._in_shape = x.shape
        self._dtype = x.dtype
        y = x[self.index]
        xp = backend.get_array_module(x)
        return (xp.asarray(y),)

    def backward(self, indexes, grad_outputs):
        gy, = grad_outputs
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self._in_shape, dtype=self._dtype)
        if xp is backend.numpy:
            xp.add.at(gx, self.index, gy)
        else:
            backend.cupyx.scatter_add(gx, self.index, gy)
        return (gx,)


def _binary(function_class, x0, x1):
    if not isinstance(x0, Variable) and not isinstance(x1, Variable):
        raise TypeError("at least one operand must be a Variable")
    like = as_array(x0) if isinstance(x0, Variable) else as_array(x1)
    if not isinstance(x0, Variable):
        x0 = _same_array(x0, like)
    if not isinstance(x1, Variable):
        x1 = _same_array(x1, like)
    return function_class().apply((x0, x1))[0]


def add(x0, x1):
    return _binary(Add, x0, x1)


def sub(x0, x1):
    return add(x0, neg(x1) if isinstance(x1, Variable) else -as_array(x1))


def mul(x0, x1):
    return _binary(Mul, x0, x1)


def div(x0, x1):
    return _binary(Div, x0, x1)


def neg(x):
    return Neg().apply((x,))[0]


def pow_const(x, exponent):
    return PowConst(exponent).apply((x,))[0]


def reshape(x, shape):
    return Reshape(tuple(shape)).apply((x,))[0]


def transpose(x, axes=None):
    return Transpose(None if axes is None else tuple(axes)).apply((x,))[0]


def sum(x, axis=None, keepdims=False):  # noqa: A001 - Chainer's name
    return Sum(axis, keepdims).apply((x,))[0]


def mean(x, axis=None, keepdims=False):
    data = as_array(x)
    if axis is None:
        count = data.size
    else:
        axes = (axis,) if isinstance(axis, int) else axis
        count = 1
        for a in axes:
            count *= data.shape[a]
    return sum(x, axis, keepdims) * (1.0 / count)


def get_item(x, index):
    return GetItem(index).apply((x,))[0]


def _install_operators():
    Variable.__add__ = Variable.__radd__ = add
    Variable.__mul__ = Variable.__rmul__ = mul
    Variable.__neg__ = neg
    Variable.__sub__ = sub
    Variable.__rsub__ = lambda self, other: add(neg(self), other)
    Variable.__truediv__ = div
    Variable.__rtruediv__ = lambda self, other: div(other, self)
    Variable.__pow__ = pow_const


_install_operators()
