"""Batch normalization over all axes but the channel axis 1 (x is (N, C) or (N, C, H, W)).

Training (batch statistics, ``m = N * H * W`` values per channel):

    mu = mean(x),  var = mean((x - mu)^2),  inv_std = (var + eps)^(-1/2)
    x_hat = (x - mu) * inv_std,  y = gamma * x_hat + beta

and, summing over the ``m`` values of a channel (Ioffe & Szegedy 2015, eq. in sec. 3):

    g_beta  = sum(gy),  g_gamma = sum(gy * x_hat)
    gx = gamma * inv_std * (gy - (x_hat * g_gamma + g_beta) / m)

Evaluation uses given statistics (``fixed_batch_normalization``): ``y = x * scale + shift``
with ``scale = gamma * inv_std`` and ``shift = beta - mean * scale``.

On the GPU the elementwise passes (``x_hat`` and ``y``; ``gx``) are one fused CUDA kernel
each (:mod:`kfac_mn.cuda_kernels`); the statistics are CuPy reductions.  With
``backend.set_conv_backend('cudnn')`` cuDNN computes all of it from graphs
(:mod:`kfac_mn.cudnn_graphs`), and ``x_hat`` is formed only when K-FAC's batch-norm block
asks for it (on the steps that refresh its statistics).
"""
from kfac_mn import backend, cuda_kernels, cudnn_graphs
from kfac_mn.function_node import FunctionNode
from kfac_mn.functions.array_checks import check_ndim, check_same_dtype, check_vector
from kfac_mn.functions.batch_chunks import batch_chunks


def _as_ncs(x):
    """View (N, C) or (N, C, H, W) data as (N, C, S); S = 1 for (N, C)."""
    xp = backend.get_array_module(x)
    return xp.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)


def _channel_sums(a):
    """Per-channel sums of an (n, C, S) block.

    einsum's own vectorized loop: faster than ``.sum`` here, and unlike a BLAS
    matrix-vector product it never wakes BLAS threads for a small product.
    """
    return backend.get_array_module(a).einsum("ncs->c", a)


def _channel_dots(a, b):
    """Per-channel ``sum(a * b)`` of two (n, C, S) blocks, without a product temporary."""
    return backend.get_array_module(a, b).einsum("ncs,ncs->c", a, b)


def _batch_statistics(x3, chunks):
    """Per-channel mean and (biased) variance of (N, C, S) data, reading it once.

    Each cache-sized chunk gets an exact two-pass mean and sum of squared deviations;
    chunks are merged with Chan, Golub & LeVeque's update
    ``M2 = M2_a + M2_b + delta^2 n_a n_b / (n_a + n_b)``.
    """
    xp = backend.get_array_module(x3)
    c, s = x3.shape[1:]
    count = 0
    mean = xp.zeros(c, dtype=x3.dtype)
    m2 = xp.zeros(c, dtype=x3.dtype)
    for chunk in chunks:
        block = x3[chunk]
        k = block.shape[0] * s
        block_mean = _channel_sums(block) / k
        centered = block - block_mean[:, None]
        delta = block_mean - mean
        total = count + k
        m2 += _channel_dots(centered, centered)
        m2 += delta * delta * (count * k / total)
        mean += delta * (k / total)
        count = total
    return mean, m2 / count


def _check_inputs(function, x, gamma, beta, *stats):
    check_ndim("x", x, (2, 4), function)
    check_same_dtype(function, x=x, gamma=gamma, beta=beta)
    c = x.shape[1]
    check_vector(function, "gamma", gamma, c)
    check_vector(function, "beta", beta, c)
    for name, stat in stats:
        check_vector(function, name, stat, c)


class BatchNormalization(FunctionNode):
    """Training-mode batch normalization, inputs ``(x, gamma, beta)``.

    After ``forward`` it holds ``x_hat`` (the normalized input, shape of x) and
    ``inv_std`` (C,): K-FAC forms per-example gradients of gamma and beta from them
    (``g_gamma[n] = sum_s gy[n, :, s] * x_hat[n, :, s]``, ``g_beta[n] = sum_s gy[n, :, s]``).
    On cuDNN it keeps ``x`` and the batch mean instead, and ``x_hat`` is computed when read.
    """

    def __init__(self, eps=2e-5, running_mean=None, running_var=None, decay=0.9):
        if eps <= 0:
            raise ValueError(f"batch_normalization: eps must be positive, got {eps}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"batch_normalization: decay must be in [0, 1], got {decay}")
        self.eps = eps
        self.running_mean = running_mean
        self.running_var = running_var
        self.decay = decay
        self._x_hat = None
        self._x = self._mean = None  # the cuDNN path's
        self.inv_std = None

    @property
    def x_hat(self):
        if self._x_hat is None and self._x is not None:
            x3 = _as_ncs(self._x)
            self._x_hat = ((x3 - self._mean[:, None].astype(x3.dtype))
                           * self.inv_std[:, None].astype(x3.dtype)).reshape(self._x.shape)
        return self._x_hat

    def forward(self, inputs):
        x, gamma, beta = inputs
        _check_inputs("batch_normalization", x, gamma, beta,
                      ("running_mean", self.running_mean), ("running_var", self.running_var))
        xp = backend.get_array_module(x)
        self.retain_inputs((1,))
        if backend.uses_cudnn(xp):
            done = cudnn_graphs.batch_norm_forward(x, gamma, beta, self.eps, self.running_mean,
                                                   self.running_var, self.decay)
            if done is not None:
                y, self._mean, self.inv_std = done
                self._x = x
                return (y,)
        x3 = _as_ncs(x)
        chunks = batch_chunks(xp, x3.shape[0], x3[0].size)
        mean, var = _batch_statistics(x3, chunks)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        if cuda_kernels.applies(xp, x3.dtype):
            x_hat, y = cuda_kernels.batch_norm_forward(x3, mean, inv_std, gamma, beta)
        else:
            x_hat = xp.empty_like(x3)
            y = xp.empty_like(x3)
            center, scale, gain, shift = (v[:, None] for v in (mean, inv_std, gamma, beta))
            for chunk in chunks:  # x_hat = (x - mean) * inv_std, y = gamma * x_hat + beta
                x_hat_c, y_c = x_hat[chunk], y[chunk]
                xp.subtract(x3[chunk], center, out=x_hat_c)
                x_hat_c *= scale
                xp.multiply(x_hat_c, gain, out=y_c)
                y_c += shift
        self._x_hat = x_hat.reshape(x.shape)
        self.inv_std = inv_std
        self._update_running_stats(mean, var, x3.shape[0] * x3.shape[2])
        return (y.reshape(x.shape),)

    def _update_running_stats(self, mean, var, m):
        """Exponential averages, in place; the variance is the unbiased batch variance."""
        if self.running_mean is not None:
            self.running_mean *= self.decay
            self.running_mean += (1.0 - self.decay) * mean
        if self.running_var is not None:
            self.running_var *= self.decay
            self.running_var += ((1.0 - self.decay) * m / max(m - 1, 1)) * var

    def backward(self, indexes, grad_outputs):
        gamma, = self.get_retained_inputs()
        xp = backend.get_array_module(grad_outputs[0])
        if self._x is not None:  # forward ran on cuDNN
            done = cudnn_graphs.batch_norm_backward(grad_outputs[0], self._x, gamma,
                                                    self._mean, self.inv_std)
            if done is not None:
                gx, g_gamma, g_beta = done
                grads = {0: gx, 1: g_gamma.astype(gamma.dtype, copy=False),
                         2: g_beta.astype(gamma.dtype, copy=False)}
                return tuple(grads[i] for i in indexes)
        gy = _as_ncs(grad_outputs[0])
        x_hat = self.x_hat.reshape(gy.shape)
        m = gy.shape[0] * gy.shape[2]
        chunks = batch_chunks(xp, gy.shape[0], gy[0].size)
        g_beta = xp.zeros_like(gamma)
        g_gamma = xp.zeros_like(gamma)
        for chunk in chunks:
            g_beta += _channel_sums(gy[chunk])
            g_gamma += _channel_dots(gy[chunk], x_hat[chunk])
        grads = {1: g_gamma, 2: g_beta}
        if 0 in indexes:
            if cuda_kernels.applies(xp, gy.dtype):
                gx = cuda_kernels.batch_norm_backward(gy, x_hat, g_gamma / m, g_beta / m,
                                                      gamma * self.inv_std)
            else:
                gx = xp.empty_like(gy)
                slope, offset = (g_gamma / m)[:, None], (g_beta / m)[:, None]
                scale = (gamma * self.inv_std)[:, None]
                for chunk in chunks:  # gx = gamma inv_std (gy - (x_hat g_gamma + g_beta) / m)
                    gx_c = gx[chunk]
                    xp.multiply(x_hat[chunk], slope, out=gx_c)
                    gx_c += offset
                    xp.subtract(gy[chunk], gx_c, out=gx_c)
                    gx_c *= scale
            grads[0] = gx.reshape(grad_outputs[0].shape)
        return tuple(grads[i] for i in indexes)


class FixedBatchNormalization(FunctionNode):
    """Batch normalization with given statistics, inputs ``(x, gamma, beta, mean, var)``.

    All five inputs are differentiable (eq.: ``dy/dvar = -gamma (x - mean) inv_std^3 / 2``).
    """

    def __init__(self, eps=2e-5):
        if eps <= 0:
            raise ValueError(f"fixed_batch_normalization: eps must be positive, got {eps}")
        self.eps = eps

    def forward(self, inputs):
        x, gamma, beta, mean, var = inputs
        _check_inputs("fixed_batch_normalization", x, gamma, beta, ("mean", mean), ("var", var))
        check_same_dtype("fixed_batch_normalization", x=x, mean=mean, var=var)
        xp = backend.get_array_module(x)
        self.retain_inputs((0, 1, 3, 4))
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        if backend.uses_cudnn(xp):
            y = cudnn_graphs.batch_norm_inference(x, gamma, beta, mean, inv_std)
            if y is not None:
                return (y,)
        scale = gamma * inv_std
        x3 = _as_ncs(x)
        y = x3 * scale[:, None]
        y += (beta - mean * scale)[:, None]
        return (y.reshape(x.shape),)

    def backward(self, indexes, grad_outputs):
        x, gamma, mean, var = self.get_retained_inputs()
        xp = backend.get_array_module(x)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        scale = gamma * inv_std
        gy = _as_ncs(grad_outputs[0])
        grads = {}
        if 0 in indexes:
            grads[0] = (gy * scale[:, None]).reshape(x.shape)
        if {1, 2, 3, 4} & set(indexes):
            g_beta = _channel_sums(gy)
            x_hat = _as_ncs(x) - mean[:, None]
            x_hat *= inv_std[:, None]
            g_gamma = _channel_dots(gy, x_hat)
            grads[1] = g_gamma
            grads[2] = g_beta
            grads[3] = -scale * g_beta
            grads[4] = -0.5 * gamma * inv_std * inv_std * g_gamma
        return tuple(grads[i] for i in indexes)


def batch_normalization(x, gamma, beta, eps=2e-5, running_mean=None, running_var=None,
                        decay=0.9):
    """Normalize with batch statistics; update ``running_mean``/``running_var`` in place.

    ``running <- decay * running + (1 - decay) * batch`` (PyTorch's momentum is
    ``1 - decay``); the running variance uses the unbiased batch variance.
    """
    function = BatchNormalization(eps, running_mean, running_var, decay)
    return function.apply((x, gamma, beta))[0]


def fixed_batch_normalization(x, gamma, beta, mean, var, eps=2e-5):
    """Normalize with the given ``mean`` and ``var`` (evaluation mode)."""
    return FixedBatchNormalization(eps).apply((x, gamma, beta, mean, var))[0]
