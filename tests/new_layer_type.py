"""A layer type K-FAC did not know, added from outside the library: the whole addition is the
block class at the bottom and its one registration.

``ChannelMix`` mixes the channels of a sequence at every position, ``y[n, :, l] = W x[n, :, l]``
(a 1-wide convolution over a 1-D sequence).  Its layer (link and function) is the user's own
code; for K-FAC it is a Kronecker-factored layer in the KFC layout, every position one row:

    A = 1/N sum_{n,l} x[n,:,l] x[n,:,l]^T,    G = 1/(N L) sum_{n,l} g[n,:,l] g[n,:,l]^T

with g the per-example output gradients (N times the gradient of the mean loss).
"""
from kfac_mn import backend, initializers
from kfac_mn.fisher import register_block
from kfac_mn.fisher.blocks import KroneckerBlock
from kfac_mn.fisher.factor_products import gram
from kfac_mn.function_node import FunctionNode
from kfac_mn.link import Link


class ChannelMixFunction(FunctionNode):
    """Inputs ``(x, W)``: x (N, C, L), W (O, C); output (N, O, L)."""

    def forward(self, inputs):
        x, W = inputs
        self.retain_inputs((0, 1))
        xp = backend.get_array_module(x, W)
        return (xp.einsum("oc,ncl->nol", W, x),)

    def backward(self, indexes, grad_outputs):
        x, W = self.get_retained_inputs()
        xp = backend.get_array_module(x, W)
        gy, = grad_outputs
        grads = {0: lambda: xp.einsum("oc,nol->ncl", W, gy),
                 1: lambda: xp.einsum("nol,ncl->oc", gy, x)}
        return tuple(grads[i]() for i in indexes)


class ChannelMix(Link):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.add_param("W", (out_channels, in_channels),
                       initializer=initializers.LeCunNormal())

    def forward(self, x):
        return ChannelMixFunction().apply((x, self.W))[0]


# -- the addition to K-FAC: one class, one registration --------------------------------------
class ChannelMixBlock(KroneckerBlock):
    """KFC for :class:`ChannelMix`: every (example, position) is one row of A's and G's
    products.  Statistic shapes, inversion cost, damping, inversion and preconditioning are
    the Kronecker block's own."""

    link_type = ChannelMix
    function_types = (ChannelMixFunction,)

    def accumulate_forward(self, function, in_data):
        x = in_data[0][:self._examples(len(in_data[0]))]
        rows = x.transpose(0, 2, 1).reshape(-1, x.shape[1])
        self._accumulate_A(rows, len(x))

    def accumulate_backward(self, function, in_data, out_grad):
        gy = out_grad[0]
        n, m = len(gy), self._examples(len(gy))
        rows = gy[:m].transpose(0, 2, 1).reshape(-1, gy.shape[1])
        self._accumulate("G", gram(rows, self.factor_dtype) * (n * n), m * gy.shape[2])


register_block(ChannelMixBlock)
