"""Weight initializers (Chainer's ``chainer.initializers``).

An initializer is called on an existing array and fills it in place.  Random
values are always drawn on the host with NumPy, from the global RNG
(``numpy.random.seed``) or from the ``rng`` given to the initializer (a
``numpy.random.RandomState`` or ``numpy.random.Generator``), then copied to
the array's device.  The same seed therefore gives the same weights on the CPU
and on the GPU.

Fans follow Chainer: for a weight of shape ``(out, in, k1, k2, ...)``
``fan_in = in * k1 * k2 * ...`` and ``fan_out = out * k1 * k2 * ...``.
"""
import math
import numbers

import numpy

from kfac_mn import backend


def get_fans(shape):
    """Return ``(fan_in, fan_out)`` of a weight of shape ``(out, in, *kernel)``."""
    if len(shape) < 2:
        raise ValueError(
            f"fan-based initializers need a weight with at least 2 axes, got shape {shape}")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


class Initializer:
    """Base class: ``initializer(array)`` fills ``array`` in place.

    ``dtype`` (optional) is the dtype a link uses when it creates the array.
    """

    def __init__(self, dtype=None):
        self.dtype = None if dtype is None else numpy.dtype(dtype)

    def __call__(self, array):
        values = self.host_values(array.shape, array.dtype)
        xp = backend.get_array_module(array)
        array[...] = xp.asarray(values)

    def host_values(self, shape, dtype):
        """The values to write, as a NumPy array of ``shape`` and ``dtype``."""
        raise NotImplementedError(f"{type(self).__name__} must define host_values")


class Constant(Initializer):
    """Fill with ``fill_value`` (a scalar, or an array broadcastable to the shape)."""

    def __init__(self, fill_value, dtype=None):
        super().__init__(dtype)
        self.fill_value = backend.to_cpu(fill_value)

    def host_values(self, shape, dtype):
        fill = numpy.asarray(self.fill_value)
        try:
            return numpy.broadcast_to(fill, shape).astype(dtype)
        except ValueError:
            raise ValueError(
                f"Constant initializer: a fill value of shape {fill.shape} does not fit "
                f"an array of shape {tuple(shape)}") from None


class Zero(Constant):
    def __init__(self, dtype=None):
        super().__init__(0.0, dtype)


class One(Constant):
    def __init__(self, dtype=None):
        super().__init__(1.0, dtype)


class _RandomInitializer(Initializer):
    def __init__(self, scale, dtype, rng):
        super().__init__(dtype)
        if not scale > 0:
            raise ValueError(f"{type(self).__name__}: scale must be positive, got {scale}")
        self.scale = scale
        self.rng = numpy.random if rng is None else rng


class Normal(_RandomInitializer):
    """Draw from N(0, scale^2)."""

    def __init__(self, scale=0.05, dtype=None, rng=None):
        super().__init__(scale, dtype, rng)

    def host_values(self, shape, dtype):
        return self.rng.normal(0.0, self.scale, size=shape).astype(dtype)


class Uniform(_RandomInitializer):
    """Draw from U(-scale, scale)."""

    def __init__(self, scale=0.05, dtype=None, rng=None):
        super().__init__(scale, dtype, rng)

    def host_values(self, shape, dtype):
        return self.rng.uniform(-self.scale, self.scale, size=shape).astype(dtype)


class LeCunNormal(_RandomInitializer):
    """N(0, s^2) with s = scale * sqrt(1 / fan_in) (LeCun et al. 1998)."""

    def __init__(self, scale=1.0, dtype=None, rng=None):
        super().__init__(scale, dtype, rng)

    def host_values(self, shape, dtype):
        fan_in, _ = get_fans(shape)
        std = self.scale * math.sqrt(1.0 / fan_in)
        return self.rng.normal(0.0, std, size=shape).astype(dtype)


class GlorotUniform(_RandomInitializer):
    """U(-s, s) with s = scale * sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""

    def __init__(self, scale=1.0, dtype=None, rng=None):
        super().__init__(scale, dtype, rng)

    def host_values(self, shape, dtype):
        fan_in, fan_out = get_fans(shape)
        bound = self.scale * math.sqrt(6.0 / (fan_in + fan_out))
        return self.rng.uniform(-bound, bound, size=shape).astype(dtype)


class HeNormal(_RandomInitializer):
    """N(0, s^2) with s = scale * sqrt(2 / fan) (He et al. 2015), fan = fan_in or fan_out."""

    def __init__(self, scale=1.0, dtype=None, fan_option="fan_in", rng=None):
        super().__init__(scale, dtype, rng)
        if fan_option not in ("fan_in", "fan_out"):
            raise ValueError(
                f"HeNormal: fan_option must be 'fan_in' or 'fan_out', got {fan_option!r}")
        self.fan_option = fan_option

    def host_values(self, shape, dtype):
        fan_in, fan_out = get_fans(shape)
        fan = fan_in if self.fan_option == "fan_in" else fan_out
        std = self.scale * math.sqrt(2.0 / fan)
        return self.rng.normal(0.0, std, size=shape).astype(dtype)


def get_initializer(initializer, default):
    """Turn a link's ``initialW``-style argument into an Initializer.

    ``None`` gives ``default``; a scalar or an array gives :class:`Constant`;
    an Initializer (or any callable filling an array) is returned as is.
    """
    if initializer is None:
        return default
    if callable(initializer):
        return initializer
    if isinstance(initializer, (numbers.Number, numpy.ndarray)) \
            or backend.is_gpu_array(initializer):
        return Constant(initializer)
    raise TypeError(
        "an initializer must be None, a scalar, an array or a callable, "
        f"got {type(initializer).__name__}")


def generate_array(initializer, shape, dtype=None):
    """A new host array of ``shape`` filled by ``initializer``.

    The dtype is ``dtype``, else the initializer's own ``dtype``, else float32.
    """
    if dtype is None:
        dtype = getattr(initializer, "dtype", None) or numpy.float32
    array = numpy.empty(shape, dtype=dtype)
    initializer(array)
    return array
