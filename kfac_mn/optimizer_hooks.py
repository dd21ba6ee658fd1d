"""Optimizer hooks: callables ``hook(optimizer)`` added with ``Optimizer.add_hook``."""
from kfac_mn.optimizer import as_param_dtype


class WeightDecay:
    """L2 regularisation on the gradients: grad <- grad + rate * W, before the update.

    Applied to every initialised parameter that has a gradient and an enabled
    update rule (biases and BatchNormalization parameters included, as in
    Chainer).  Equivalent to ``weight_decay=rate`` of ``torch.optim.SGD``.
    """

    name = "WeightDecay"
    timing = "pre"

    def __init__(self, rate):
        if not rate >= 0.0:
            raise ValueError(f"WeightDecay rate must be >= 0, got {rate!r}")
        self.rate = rate

    def __call__(self, optimizer):
        for param in optimizer.target.params(include_uninit=False):
            rule = param.update_rule
            if param.grad is None or (rule is not None and not rule.enabled):
                continue
            param.grad += as_param_dtype(self.rate, param) * param.data
