"""Optimizer hooks: callables ``hook(optimizer)`` added with ``Optimizer.add_hook``."""
from kfac_mn.fisher.blocks import KroneckerBlock
from kfac_mn.fisher.registry import block_class_for
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
            param.grad += param.data * as_param_dtype(self.rate, param)


class WeightRescale:
    """The paper's replacement for weight decay: after each update, rescale the weight ``W``
    of every Kronecker-factored layer (a link whose registered Fisher block is a
    :class:`~kfac_mn.fisher.blocks.KroneckerBlock`: convolution and fully connected layers,
    and any such layer type registered later) to Frobenius norm sqrt(2 * out_channels).

    That is the expected norm of a He-normal initialised weight (each of the
    ``out_channels`` rows has expected squared norm 2), so the scale of W stays
    at its initial value while its direction is trained (the paper's recipe).
    Biases and BatchNormalization parameters are left alone.
    """

    name = "WeightRescale"
    timing = "post"

    def __call__(self, optimizer):
        for link in optimizer.target.links():
            block_class = block_class_for(link)
            if block_class is None or not issubclass(block_class, KroneckerBlock) \
                    or link.W.data is None:
                continue
            W = link.W.data
            xp = link.W.xp
            norm = xp.sqrt(xp.sum(W * W))
            target = as_param_dtype((2.0 * W.shape[0]) ** 0.5, link.W)
            W *= xp.divide(target, xp.maximum(norm, as_param_dtype(1e-12, link.W))).astype(
                W.dtype)
