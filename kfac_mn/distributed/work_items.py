"""The units of second-order work that distributed K-FAC hands out to workers.

An item is either a Fisher block (a linear, convolution or batch-norm layer: its parameters'
gradients and its statistics) or a parameter that no block covers (its gradient is only
averaged over the ranks: parameters with no block use the plain gradient).  Each
item has exactly one owner rank (:mod:`kfac_mn.distributed.assignment`).

The shapes of a block's statistics follow from its parameters alone
(:meth:`~kfac_mn.fisher.blocks.FisherBlock.statistic_shapes`), so every rank can lay out the
communication buffers before any forward pass.
"""
import dataclasses


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
        return {} if self.block is None else self.block.statistic_shapes()

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
