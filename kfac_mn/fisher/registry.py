"""One registration per layer type: which Fisher block serves which link.

A block class declares everything K-FAC needs to know about its layer type:

* ``link_type``: the :class:`~kfac_mn.link.Link` class it serves (subclasses included);
* ``function_types``: the :class:`~kfac_mn.function_node.FunctionNode` classes whose calls
  carry that link's parameter as their second input (the hook hands those calls to the block);
* ``statistic_names`` / ``symmetric``, :meth:`statistic_shapes` and :meth:`inversion_cost`.

:func:`register_block` adds it; from then on the optimizer builds such blocks
(:func:`build_fisher_blocks`), the :class:`~kfac_mn.fisher.hook.KFACHook` feeds them, work
items, the owners' assignment and the cost model read their shapes and costs, and
:class:`~kfac_mn.optimizer_hooks.WeightRescale` rescales the weights of Kronecker-factored
layers.  The built-in blocks (linear, convolution, batch norm) register themselves in
:mod:`kfac_mn.fisher.blocks`; a user's layer type is one class and one call.
"""
import dataclasses
import inspect

from kfac_mn.function_node import FunctionNode
from kfac_mn.link import Link

_BLOCK_CLASSES = {}  # link type -> block class


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """What every block is built with (the K-FAC optimizer's settings).

    ``bn_fisher``: 'diag', 'unit' or 'full' (batch-norm blocks); ``factor_dtype``: the
    precision of the factor products' inputs (None: the data's); ``max_examples``: statistics
    from a batch's first examples only (None: all of them).
    """

    bn_fisher: str = "diag"
    factor_dtype: object = None
    max_examples: int = None


def register_block(block_class):
    """Make ``block_class`` the Fisher block of its ``link_type``; returns the class (so it
    can be used as a decorator).  Registering another class for a registered link type is an
    error; registering the same class again does nothing."""
    link_type = getattr(block_class, "link_type", None)
    if not (inspect.isclass(link_type) and issubclass(link_type, Link)):
        raise TypeError(f"register_block: {block_class.__name__}.link_type must be a Link "
                        f"class, got {link_type!r}")
    functions = getattr(block_class, "function_types", ())
    if not (isinstance(functions, tuple) and functions and all(
            inspect.isclass(f) and issubclass(f, FunctionNode) for f in functions)):
        raise TypeError(f"register_block: {block_class.__name__}.function_types must be a "
                        f"non-empty tuple of FunctionNode classes, got {functions!r}")
    known = _BLOCK_CLASSES.get(link_type)
    if known is not None and known is not block_class:
        raise ValueError(f"register_block: {link_type.__name__} already has the Fisher block "
                         f"{known.__name__}; cannot register {block_class.__name__} for it")
    _BLOCK_CLASSES[link_type] = block_class
    return block_class


def block_class_for(link):
    """The block class registered for ``link``'s type or its nearest base class; None if
    K-FAC does not cover it."""
    for cls in type(link).__mro__:
        if cls in _BLOCK_CLASSES:
            return _BLOCK_CLASSES[cls]
    return None


def registered_function_types():
    """Every function class some registered block recognises (a tuple, for isinstance)."""
    return tuple(f for block_class in _BLOCK_CLASSES.values()
                 for f in block_class.function_types)


def build_fisher_blocks(link, bn_fisher="diag", factor_dtype=None, max_examples=None):
    """One block per covered link of ``link`` (itself included), keyed by path, sorted."""
    options = BlockOptions(bn_fisher, factor_dtype, max_examples)
    blocks = {}
    for path, child in link.namedlinks():
        block_class = block_class_for(child)
        if block_class is not None:
            blocks[path] = block_class(path, child, options)
    return blocks
