"""The units of second-order work that distributed K-FAC hands out to workers.

An item is either a Fisher block (a linear, convolution or batch-norm layer: its parameters'
gradients and its statistics) or a parameter that no block covers (its gradient is only
averaged over the ranks, PAPER.md: "parameters with no block use the plain gradient").  Each
item has exactly one owner rank (:mod:`kfac_mn.fisher.assignment`).

The shapes of a block's statistics follow from its parameters alone, so every rank can lay out
the communication buffers before any forward pass:

* linear / convolution (W: out x in, in = C kh kw):  A is (in [+1 with a bias])^2,  G is out^2;
* batch norm over C channels:  F is (2C,) for 'diag', (C, 2, 2) for 'unit', (2C, 2C) for 'full'.
"""
import dataclasses

from kfac_mn.fisher.blocks import BatchNormBlock, KroneckerBlock


def statistic_shapes(block):
    """{statistic name: shape} of the block's statistics (see the module docstring)."""
    if isinstance(block, KroneckerBlock):
        W = block.link.W.data
        inputs = W.size // W.shape[0] + (1 if block.has_bias else 0)
        return {"A": (inputs, inputs), "G": (W.shape[0], W.shape[0])}
    if isinstance(block, BatchNormBlock):
        c = block.link.gamma.data.size
        shapes = {"diag": (2 * c,), "unit": (c, 2, 2), "full": (2 * c, 2 * c)}
        return {"F": shapes[block.kind]}
    raise TypeError(f"no statistic layout for a {type(block).__name__} ({block.path})")


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One unit of ownership: ``name`` is the block's path, or the parameter's path.

    ``params`` are ``(path, Parameter)`` pairs in the block's own order (W, b or gamma, beta);
    ``block`` is None for a parameter without a Fisher block.
    """

    name: str
    params: tuple
    block: object = None

    def statistic_shapes(self):
        return {} if self.block is None else statistic_shapes(self.block)

    def gradient_size(self):
        return sum(param.data.size for _, param in self.params)


def build_work_items(link, fisher_blocks):
    """Blocks in ``fisher_blocks`` order, then the uncovered parameters in namedparams order.

    Every parameter must be initialised (the layout depends on the shapes); the error names the
    first one that is not.
    """
    named = list(link.namedparams())
    for path, param in named:
        if param.data is None:
            raise ValueError(
                f"distributed K-FAC: parameter {path} is not initialised; give the layer its "
                "input size (or run one forward pass) before optimizer.setup(model)")
    path_of = {id(param): path for path, param in named}
    items, covered = [], set()
    for block in fisher_blocks.values():
        params = tuple((path_of[id(p)], p) for p in block.params())
        covered.update(id(p) for _, p in params)
        items.append(WorkItem(block.path, params, block))
    items.extend(WorkItem(path, ((path, param),)) for path, param in named
                 if id(param) not in covered)
    return items
