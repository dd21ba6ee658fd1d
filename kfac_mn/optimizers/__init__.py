"""Optimizers (Chainer's ``chainer.optimizers``)."""
from kfac_mn.optimizers.distributed_kfac import DistributedKFAC  # noqa: F401,E402
from kfac_mn.optimizers.kfac import KFAC  # noqa: F401,E402
from kfac_mn.optimizers.momentum_sgd import MomentumSGD, MomentumSGDRule  # noqa: F401
