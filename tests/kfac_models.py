"""Small float64 models and brute-force references shared by the K-FAC tests."""
import numpy as np

from kfac_mn import Chain
from kfac_mn import functions as F
from kfac_mn import links as L


def to_float64(link):
    for param in link.params():
        param.data = param.data.astype(np.float64)
    for child in link.links():
        if isinstance(child, L.BatchNormalization):
            child.avg_mean = child.avg_mean.astype(np.float64)
            child.avg_var = child.avg_var.astype(np.float64)
    return link


class ConvNet(Chain):
    """conv -> relu -> linear, keeping each layer's output for the brute-force checks."""

    def __init__(self, in_channels=2, out_channels=3, ksize=3, stride=1, pad=1, bias=True,
                 size=7, n_class=5):
        super().__init__()
        out = (size + 2 * pad - ksize) // stride + 1
        with self.init_scope():
            self.conv = L.Convolution2D(in_channels, out_channels, ksize, stride, pad,
                                        nobias=not bias)
            self.fc = L.Linear(out_channels * out * out, n_class)

    def forward(self, x):
        self.h_conv = self.conv(x)
        self.a_fc = F.relu(self.h_conv)
        self.h_fc = self.fc(self.a_fc)
        return self.h_fc


def per_example_output_grads(model, x, t, outputs):
    """d loss_n / d output_n for each named output of ``model``, one backward per example.

    The full batch runs forward (so batch-coupled layers see the real batch);
    the loss of example n alone is back-propagated.  Returns name -> array of
    shape (N, ...).
    """
    n = len(x)
    grads = {name: [] for name in outputs}
    for i in range(n):
        model.cleargrads()
        y = model(x)
        loss = F.softmax_cross_entropy(y[i:i + 1], t[i:i + 1])
        loss.backward(retain_grad=True)
        for name in outputs:
            grads[name].append(getattr(model, name).grad[i].copy())
    return {name: np.stack(v) for name, v in grads.items()}


def per_example_param_grads(model, x, t, params):
    """Gradient of loss_n w.r.t. each parameter, for each example n: name -> (N, ...)."""
    n = len(x)
    grads = {name: [] for name in params}
    for i in range(n):
        model.cleargrads()
        y = model(x)
        F.softmax_cross_entropy(y[i:i + 1], t[i:i + 1]).backward()
        for name, param in params.items():
            grads[name].append(param.grad.copy())
    return {name: np.stack(v) for name, v in grads.items()}


def explicit_patches(x, ksize, stride, pad, bias):
    """Every conv patch, written out by loops: (N, S, C*k*k [+1])."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - ksize) // stride + 1
    ow = (w + 2 * pad - ksize) // stride + 1
    rows = np.empty((n, oh * ow, c * ksize * ksize + (1 if bias else 0)))
    for i in range(n):
        for p in range(oh):
            for q in range(ow):
                patch = xp[i, :, p * stride:p * stride + ksize, q * stride:q * stride + ksize]
                row = patch.ravel()
                if bias:
                    row = np.append(row, 1.0)
                rows[i, p * ow + q] = row
    return rows


class MixNet(Chain):
    """A user-registered layer type (``tests.new_layer_type.ChannelMix``) -> relu -> linear."""

    def __init__(self, in_channels=3, channels=4, length=5, n_class=3):
        from tests.new_layer_type import ChannelMix

        super().__init__()
        with self.init_scope():
            self.mix = ChannelMix(in_channels, channels)
            self.fc = L.Linear(channels * length, n_class)

    def forward(self, x):
        return self.fc(F.relu(self.mix(x)))


def mixnet_factors(model, x, t):
    """Brute-force K-FAC factors of ``model.mix`` on the batch ``(x, t)``, from each example
    alone: A = 1/N sum_{n,l} x x^T, G = 1/(N L) sum_{n,l} g g^T with g the gradient of example
    n's own loss with respect to the layer's output at position l."""
    from kfac_mn import Variable

    n, _, length = x.shape
    A = sum(x[i] @ x[i].T for i in range(n)) / n
    G = 0.0
    for i in range(n):
        y = Variable(np.einsum("oc,cl->ol", model.mix.W.data, x[i])[None])
        F.softmax_cross_entropy(model.fc(F.relu(y)), t[i:i + 1]).backward()
        g = y.grad[0]
        G = G + g @ g.T
    return A, G / (n * length)
