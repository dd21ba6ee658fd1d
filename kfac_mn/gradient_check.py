"""Check a function's backward against central differences (Chainer's ``check_backward``).

For outputs ``y_k = f(x)`` and output gradients ``gy_k``, backward must give
``g_i = d/dx_i sum_k <y_k, gy_k>``; numerically (second-order accurate central difference)

    g_i ~= sum_k <f(x + eps e_i) - f(x - eps e_i), gy_k> / (2 eps).

Both sides are computed in float64 by default, so the comparison tests the
backward formulas, not float32 rounding.
"""
import numpy

from kfac_mn import backend
from kfac_mn.configuration import no_backprop_mode
from kfac_mn.functions.basic_math import add, mul
from kfac_mn.functions.basic_math import sum as sum_all
from kfac_mn.variable import Variable, as_array


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def numerical_grad(f, inputs, grad_outputs, eps=1e-3):
    """Central-difference gradients of ``sum_k <f()[k], grad_outputs[k]>`` w.r.t. ``inputs``.

    ``f`` takes no argument and returns a tuple of arrays computed from ``inputs``,
    which this function perturbs in place (one element at a time) and restores.
    ``grad_outputs`` has one array (or ``None``: output ignored) per output.
    Returns one float64 array per input, of the input's shape.
    """
    if eps <= 0:
        raise ValueError(f"numerical_grad: eps must be positive, got {eps}")
    inputs = _as_tuple(inputs)
    grad_outputs = _as_tuple(grad_outputs)

    def weighted_output():
        outputs = _as_tuple(f())
        if len(outputs) != len(grad_outputs):
            raise ValueError(f"numerical_grad: f returned {len(outputs)} outputs but "
                             f"{len(grad_outputs)} grad_outputs were given")
        total = 0.0
        for y, gy in zip(outputs, grad_outputs):
            if gy is not None:
                y = backend.to_cpu(as_array(y)).astype(numpy.float64)
                total += float(numpy.vdot(y, backend.to_cpu(gy).astype(numpy.float64)))
        return total

    grads = []
    for x in inputs:
        grad = numpy.zeros(x.shape, dtype=numpy.float64)
        for index in numpy.ndindex(*x.shape):
            original = x[index].copy()
            x[index] = original + eps
            plus = weighted_output()
            x[index] = original - eps
            minus = weighted_output()
            x[index] = original
            grad[index] = (plus - minus) / (2 * eps)
        grads.append(grad)
    return tuple(grads)


def _outputs_of(function, args):
    outputs = _as_tuple(function(*args))
    for y in outputs:
        if not isinstance(y, Variable):
            raise TypeError(f"check_backward: the function must return Variables, got "
                            f"{type(y).__name__}")
    return outputs


def _backprop(outputs, grad_outputs):
    pairs = [(y, gy) for y, gy in zip(outputs, grad_outputs) if gy is not None]
    if not pairs:
        raise ValueError("check_backward: every grad_output is None; nothing to check")
    if len(pairs) == 1:
        y, gy = pairs[0]
        y.grad = gy.copy()
        y.backward()
        return
    total = None
    for y, gy in pairs:
        term = sum_all(mul(y, gy))
        total = term if total is None else add(total, term)
    total.backward()


def check_backward(function, inputs, grad_outputs, eps=1e-3, atol=1e-5, rtol=1e-4,
                   no_grads=None, dtype=numpy.float64):
    """Assert that ``function``'s backward matches central differences.

    ``function`` maps Variables to a Variable or a tuple of Variables; ``inputs`` is
    an array or a tuple of arrays; ``grad_outputs`` one array per output (``None``
    for a scalar output: ones).  Floating-point inputs and grad_outputs are cast to
    ``dtype`` (``None`` keeps them).  ``no_grads[i]`` true skips input ``i``
    (default: skip the non-float inputs, e.g. labels).  Raises AssertionError
    naming the input and the worst element when ``|g - g_num| > atol + rtol |g_num|``.
    """
    inputs = tuple(_cast(x, dtype) for x in _as_tuple(inputs))
    if no_grads is None:
        no_grads = [x.dtype.kind != "f" for x in inputs]
    if len(no_grads) != len(inputs):
        raise ValueError(f"check_backward: no_grads has {len(no_grads)} entries for "
                         f"{len(inputs)} inputs")
    variables = [Variable(x.copy(), requires_grad=not skip) for x, skip in zip(inputs, no_grads)]
    outputs = _outputs_of(function, variables)
    if grad_outputs is None:
        grad_outputs = tuple(backend.get_array_module(y.data).ones_like(y.data)
                             for y in outputs)
    grad_outputs = tuple(None if gy is None else _cast(gy, dtype)
                         for gy in _as_tuple(grad_outputs))
    if len(grad_outputs) != len(outputs):
        raise ValueError(f"check_backward: {len(grad_outputs)} grad_outputs for "
                         f"{len(outputs)} outputs")
    for y, gy in zip(outputs, grad_outputs):
        if gy is not None and gy.shape != y.shape:
            raise ValueError(f"check_backward: grad_output of shape {gy.shape} for an output "
                             f"of shape {y.shape}")
    _backprop(outputs, grad_outputs)

    probes = tuple(x.copy() for x in inputs)

    def evaluate():
        with no_backprop_mode():
            return tuple(y.data for y in _outputs_of(function, probes))

    checked = [i for i, skip in enumerate(no_grads) if not skip]
    numeric = numerical_grad(evaluate, tuple(probes[i] for i in checked), grad_outputs, eps)
    for i, expected in zip(checked, numeric):
        actual = variables[i].grad
        if actual is None:
            actual = numpy.zeros_like(expected)
        elif actual.shape != inputs[i].shape or actual.dtype != inputs[i].dtype:
            raise AssertionError(
                f"check_backward: gradient of input {i} has shape {actual.shape} and dtype "
                f"{actual.dtype}, the input {inputs[i].shape} and {inputs[i].dtype}")
        _assert_close(i, backend.to_cpu(actual).astype(numpy.float64), expected, atol, rtol)


def _cast(x, dtype):
    x = as_array(x)
    if dtype is not None and x.dtype.kind == "f":
        return x.astype(dtype)
    return x


def _assert_close(index, actual, expected, atol, rtol):
    error = numpy.abs(actual - expected)
    excess = error - (atol + rtol * numpy.abs(expected))
    if excess.size and excess.max() > 0:
        worst = tuple(int(i) for i in numpy.unravel_index(int(numpy.argmax(excess)), excess.shape))
        raise AssertionError(
            f"check_backward: backward of input {index} (shape {actual.shape}) differs from "
            f"central differences at {worst}: backward {actual[worst]:.6g}, numerical "
            f"{expected[worst]:.6g}; max abs error {error.max():.3g} "
            f"(atol {atol}, rtol {rtol})")
