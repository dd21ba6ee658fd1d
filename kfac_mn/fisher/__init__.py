"""K-FAC's per-layer math: Fisher blocks and their registry, factor products, damped
inverses, the refresh schedule and the hook that feeds the blocks.  Nothing here knows about
ranks or communication (that is :mod:`kfac_mn.distributed`)."""
from kfac_mn.fisher import blocks  # noqa: F401  (registers the built-in layer types)
from kfac_mn.fisher.registry import (  # noqa: F401
    BlockOptions,
    block_class_for,
    build_fisher_blocks,
    register_block,
)
