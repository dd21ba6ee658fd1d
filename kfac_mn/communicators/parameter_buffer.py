"""One contiguous buffer for all parameters of a model, in the model's ``namedparams`` order.

A :class:`~kfac_mn.link.Link` lists its parameters in a deterministic order of its own (by path,
numbers compared as numbers: ``/res2/9`` before ``/res2/10``) that does not depend on the order
in which they were registered, so element k of the buffer is the same parameter entry on every
rank.  The buffer keeps that order as it is.
"""
from kfac_mn import backend


def ordered_named_params(model, purpose):
    """``model.namedparams()`` in the model's own order, checked for data and a common dtype.

    ``purpose`` names the caller in error messages.
    """
    if not hasattr(model, "namedparams"):
        raise TypeError(f"{purpose}: expected a model with namedparams(), got "
                        f"{type(model).__name__}")
    params = list(model.namedparams())
    dtype = None
    for name, param in params:
        if param.data is None:
            raise ValueError(f"{purpose}: parameter {name!r} has no data yet; initialize it "
                             "(e.g. run one forward pass) on every rank first")
        if dtype is None:
            dtype, first = param.data.dtype, name
        elif param.data.dtype != dtype:
            raise TypeError(f"{purpose}: parameters must share one dtype to be packed; "
                            f"{first!r} is {dtype} but {name!r} is {param.data.dtype}")
    return params


def pack_data(params):
    """Concatenate the flattened data of ``params`` ((name, param) pairs) into one 1-D array."""
    xp = backend.get_array_module(params[0][1].data)
    return xp.concatenate([param.data.ravel() for _, param in params])


def pack_grads(params):
    """Concatenate the flattened grads of ``params``; a missing grad contributes zeros."""
    xp = backend.get_array_module(params[0][1].data)
    parts = []
    for name, param in params:
        if param.grad is None:
            parts.append(xp.zeros(param.data.size, dtype=param.data.dtype))
        elif param.grad.shape != param.data.shape:
            raise ValueError(f"parameter {name!r}: grad shape {param.grad.shape} differs from "
                             f"data shape {param.data.shape}")
        else:
            parts.append(param.grad.ravel())
    return xp.concatenate(parts).astype(params[0][1].data.dtype, copy=False)


def _segments(buffer, params):
    offset = 0
    for _, param in params:
        size = param.data.size
        yield param, buffer[offset:offset + size].reshape(param.data.shape)
        offset += size


def unpack_data(buffer, params):
    """Copy ``buffer`` (as laid out by :func:`pack_data`) into the parameters' data in place."""
    for param, segment in _segments(buffer, params):
        param.data[...] = segment


def unpack_grads(buffer, params):
    """Copy ``buffer`` into the grads: in place where a grad exists, as a new array otherwise."""
    for param, segment in _segments(buffer, params):
        if param.grad is None:
            param.grad = segment.copy()
        else:
            param.grad[...] = segment
