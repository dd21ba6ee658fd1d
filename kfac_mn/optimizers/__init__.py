"""Optimizers (Chainer's ``chainer.optimizers``) and ChainerMN's multi-node wrapper."""
from kfac_mn.optimizers.distributed_kfac import DistributedKFAC  # noqa: F401
from kfac_mn.optimizers.kfac import KFAC  # noqa: F401
from kfac_mn.optimizers.momentum_sgd import MomentumSGD, MomentumSGDRule  # noqa: F401
from kfac_mn.optimizers.multi_node import (  # noqa: F401
    MultiNodeOptimizer,
    create_multi_node_optimizer,
)
