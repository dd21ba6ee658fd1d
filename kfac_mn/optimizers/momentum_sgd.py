"""Momentum SGD with Chainer's convention.

Chainer:  v <- momentum * v - lr * grad;   W <- W + v
PyTorch (``torch.optim.SGD``, dampening 0, no Nesterov):
          b <- momentum * b + grad;        W <- W - lr * b
With a constant learning rate the two are the same method, v = -lr * b, and
give the same weights step by step.  They differ when lr changes: Chainer's
velocity carries the old learning rates, PyTorch's buffer does not (it
rescales the whole history by the new lr).  The paper's recipe (Chainer code)
uses the former, and also scales momentum down with lr (docs/SPEC.md, section 2).
"""
import numbers

from kfac_mn.optimizer import (
    GradientMethod,
    Hyperparameter,
    HyperparameterProxy,
    UpdateRule,
    as_param_dtype,
)

_default_hyperparam = Hyperparameter()
_default_hyperparam.lr = 0.01
_default_hyperparam.momentum = 0.9


def _check_lr(lr):
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr >= 0.0:
        raise ValueError(f"MomentumSGD lr must be a number >= 0, got {lr!r}")
    return lr


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"MomentumSGD momentum must be a number in [0, 1], got {momentum!r}")
    return momentum


class MomentumSGDRule(UpdateRule):
    """Update rule of :class:`MomentumSGD`; state ``v`` (velocity), zeros at first."""

    def __init__(self, parent_hyperparam=None, lr=None, momentum=None):
        super().__init__(parent_hyperparam or _default_hyperparam)
        if lr is not None:
            self.hyperparam.lr = _check_lr(lr)
        if momentum is not None:
            self.hyperparam.momentum = _check_momentum(momentum)

    def init_state(self, param):
        self.state["v"] = param.xp.zeros_like(param.data)

    def update_core(self, param):
        """v <- momentum * v - lr * grad; W <- W + v (in place, in the param's dtype)."""
        v = self.state["v"]
        v *= as_param_dtype(self.hyperparam.momentum, param)
        v -= param.grad * as_param_dtype(self.hyperparam.lr, param)
        param.data += v


class MomentumSGD(GradientMethod):
    """MomentumSGD(lr=0.01, momentum=0.9); ``optimizer.lr`` and ``.momentum`` are settable."""

    lr = HyperparameterProxy("lr")
    momentum = HyperparameterProxy("momentum")

    def __init__(self, lr=_default_hyperparam.lr, momentum=_default_hyperparam.momentum):
        super().__init__()
        self.hyperparam.lr = _check_lr(lr)
        self.hyperparam.momentum = _check_momentum(momentum)

    def create_update_rule(self):
        return MomentumSGDRule(self.hyperparam)
