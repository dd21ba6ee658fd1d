"""Every function on both backends (``xp``: NumPy, then CuPy marked ``gpu``).

Forward results are compared with direct float64 NumPy references written from the
definitions (loops over windows, textbook formulas), backward results with central
differences (``check_backward`` in float64 on the backend's arrays).  The ``gpu`` tests at
the end also compare the GPU with the CPU at ResNet-50's layer geometries, where the CUDA
kernels (im2col/col2im, batch norm) take over from the NumPy code.
"""
import numpy as np
import pytest

from kfac_mn import Variable, backend
from kfac_mn import functions as F
from kfac_mn.gradient_check import check_backward

# (ksize, stride, pad): every path of im2col/col2im (pointwise, same-size, strided phases,
# strided view) and non-square windows
GEOMETRIES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (7, 2, 3), (5, 3, 2),
              ((2, 3), (2, 1), (1, 0))]


def pair(value):
    return value if isinstance(value, tuple) else (value, value)


def host(array):
    return backend.to_cpu(array)


def reference_windows(x, ksize, stride, pad, fill):
    """Windows of ``x`` (N, C, H, W) padded with ``fill``: (N, C, OH, OW, kh, kw), by loops."""
    (kh, kw), (sy, sx), (ph, pw) = pair(ksize), pair(stride), pair(pad)
    n, c, h, w = x.shape
    padded = np.full((n, c, h + 2 * ph, w + 2 * pw), fill, dtype=np.float64)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    oh, ow = (h + 2 * ph - kh) // sy + 1, (w + 2 * pw - kw) // sx + 1
    windows = np.empty((n, c, oh, ow, kh, kw))
    for oy in range(oh):
        for ox in range(ow):
            windows[:, :, oy, ox] = padded[:, :, oy * sy:oy * sy + kh, ox * sx:ox * sx + kw]
    return windows


def reference_conv(x, W, b, stride, pad):
    windows = reference_windows(x, W.shape[2:], stride, pad, 0.0)
    return np.einsum("ncyxij,ocij->noyx", windows, W) + b[None, :, None, None]


@pytest.mark.parametrize("ksize,stride,pad", GEOMETRIES)
def test_im2col_matches_explicit_windows_and_col2im_is_its_adjoint(xp, ksize, stride, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 8))
    col = F.im2col(xp.asarray(x), pair(ksize), stride, pad)
    expected = reference_windows(x, ksize, stride, pad, 0.0).transpose(0, 1, 4, 5, 2, 3)
    np.testing.assert_array_equal(host(col), expected)
    c = rng.standard_normal(expected.shape)
    back = F.col2im(xp.asarray(c), stride, pad, 9, 8)
    # <im2col(x), c> == <x, col2im(c)> for every x and c
    np.testing.assert_allclose(np.vdot(x, host(back)), np.vdot(expected, c), rtol=1e-12)


@pytest.mark.parametrize("ksize,stride,pad", GEOMETRIES)
def test_convolution_forward_and_backward(xp, ksize, stride, pad):
    rng = np.random.default_rng(1)
    kh, kw = pair(ksize)
    x = rng.standard_normal((2, 3, 9, 8))
    W = rng.standard_normal((4, 3, kh, kw))
    b = rng.standard_normal(4)
    y = F.convolution_2d(xp.asarray(x, dtype=np.float32), xp.asarray(W, dtype=np.float32),
                         xp.asarray(b, dtype=np.float32), stride=stride, pad=pad)
    assert y.dtype == np.float32
    np.testing.assert_allclose(host(y.data), reference_conv(x, W, b, stride, pad),
                               rtol=1e-5, atol=1e-5)
    small = (xp.asarray(x[:1, :2, :6, :5]), xp.asarray(W[:2, :2]), xp.asarray(b[:2]))
    check_backward(lambda *v: F.convolution_2d(*v, stride=stride, pad=pad), small,
                   None, atol=1e-6, rtol=1e-5)


def test_linear_relu_and_basic_math(xp):
    rng = np.random.default_rng(2)
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(3)
    y = F.linear(xp.asarray(x), xp.asarray(W), xp.asarray(b))
    np.testing.assert_allclose(host(y.data), x @ W.T + b, rtol=1e-12)
    check_backward(F.linear, tuple(xp.asarray(a) for a in (x, W, b)), None)
    r = F.relu(xp.asarray(x))
    np.testing.assert_array_equal(host(r.data), np.maximum(x, 0))
    check_backward(F.relu, xp.asarray(x), None)
    check_backward(lambda a, c: F.sum((a * c + a / (c * c + 1.0) - a) ** 2, axis=1),
                   (xp.asarray(x), xp.asarray(x[::-1].copy())), None)


def test_get_item_backward_adds_repeated_indices(xp):
    source = Variable(xp.arange(6, dtype=np.float32))
    picked = F.get_item(source, xp.asarray([0, 0, 2, 5, 5, 5]))
    picked.grad = xp.ones(6, dtype=np.float32)
    picked.backward()
    np.testing.assert_array_equal(host(source.grad), [2, 0, 1, 0, 0, 3])


def reference_batch_norm(x, gamma, beta, eps):
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    x_hat = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return x_hat * gamma.reshape(shape) + beta.reshape(shape), mean, var


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 3)])
def test_batch_normalization_training_and_fixed(xp, shape):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 3 + 1
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    running_mean, running_var = xp.zeros(3), xp.ones(3)
    y = F.batch_normalization(xp.asarray(x), xp.asarray(gamma), xp.asarray(beta), eps=1e-5,
                              running_mean=running_mean, running_var=running_var, decay=0.9)
    expected, mean, var = reference_batch_norm(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(host(y.data), expected, rtol=1e-10, atol=1e-12)
    m = x.size // 3
    np.testing.assert_allclose(host(running_mean), 0.1 * mean, rtol=1e-10)
    np.testing.assert_allclose(host(running_var), 0.9 + 0.1 * var * m / (m - 1), rtol=1e-10)
    small = tuple(xp.asarray(a) for a in (x[:3, :, :3, :2] if x.ndim == 4 else x, gamma, beta))
    check_backward(lambda *v: F.batch_normalization(*v, eps=1e-5), small, None,
                   atol=1e-5, rtol=1e-4)
    fixed = F.fixed_batch_normalization(*(xp.asarray(a) for a in (x, gamma, beta, mean, var)),
                                        eps=1e-5)
    np.testing.assert_allclose(host(fixed.data), expected, rtol=1e-10, atol=1e-12)
    check_backward(lambda *v: F.fixed_batch_normalization(*v, eps=1e-5),
                   tuple(xp.asarray(a) for a in (small[0], gamma, beta, mean, var + 0.5)),
                   None, atol=1e-5, rtol=1e-4)


def reference_max_pooling(x, ksize, stride, pad):
    """Forward by loops, and the backward of all-ones: each window's first maximum gets 1."""
    windows = reference_windows(x, ksize, stride, pad, -np.inf)
    y = windows.max(axis=(4, 5))
    (kh, kw), (sy, sx), (ph, pw) = pair(ksize), pair(stride), pair(pad)
    gx = np.zeros_like(x)
    n, c, oh, ow = y.shape
    for i, j, oy, ox in np.ndindex(n, c, oh, ow):
        ky, kx = np.unravel_index(np.argmax(windows[i, j, oy, ox]), (kh, kw))
        gx[i, j, oy * sy + ky - ph, ox * sx + kx - pw] += 1.0
    return y, gx


@pytest.mark.parametrize("ksize,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 1)])
def test_pooling_against_loops(xp, ksize, stride, pad):
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, (2, 3, 9, 8)).astype(np.float64)  # ties: the first maximum wins
    source = Variable(xp.asarray(x))
    y = F.max_pooling_2d(source, ksize, stride, pad)
    expected, expected_grad = reference_max_pooling(x, ksize, stride, pad)
    np.testing.assert_array_equal(host(y.data), expected)
    y.grad = xp.ones_like(y.data)
    y.backward()
    np.testing.assert_array_equal(host(source.grad), expected_grad)
    a = F.average_pooling_2d(xp.asarray(x), ksize, stride, pad)
    np.testing.assert_allclose(host(a.data),
                               reference_windows(x, ksize, stride, pad, 0.0).mean(axis=(4, 5)),
                               rtol=1e-12)
    check_backward(lambda v: F.average_pooling_2d(v, ksize, stride, pad),
                   xp.asarray(x[:1, :2]), None)
    g = F.global_average_pooling_2d(xp.asarray(x))
    np.testing.assert_allclose(host(g.data), x.mean(axis=(2, 3)), rtol=1e-12)
    check_backward(F.global_average_pooling_2d, xp.asarray(x[:1, :2]), None)


def test_softmax_cross_entropy_and_accuracy(xp):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 4)) * 3
    t = np.array([0, 3, 1, 1, 2, 0], dtype=np.int32)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    loss = F.softmax_cross_entropy(xp.asarray(x), xp.asarray(t), label_smoothing=0.1)
    q = np.full((6, 4), 0.1 / 4) + 0.9 * np.eye(4)[t]
    np.testing.assert_allclose(float(host(loss.data)), -(q * log_p).sum() / 6, rtol=1e-12)
    check_backward(lambda v, labels: F.softmax_cross_entropy(v, labels),
                   (xp.asarray(x), xp.asarray(t)), None)
    soft = rng.dirichlet(np.ones(4), 6)
    check_backward(lambda v, s: F.softmax_cross_entropy(v, s), (xp.asarray(x),
                   xp.asarray(soft)), None, no_grads=[False, True])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\), got values in \[0, 4\]"):
        F.softmax_cross_entropy(xp.asarray(x), xp.asarray(np.array([0, 4, 1, 1, 2, 0],
                                                                   dtype=np.int32)))
    accuracy = F.accuracy(xp.asarray(x), xp.asarray(t))
    assert float(host(accuracy.data)) == pytest.approx(np.mean(x.argmax(axis=1) == t))
    top2 = F.accuracy(xp.asarray(x), xp.asarray(t), top_k=2)
    in_top2 = [t[i] in np.argsort(x[i])[-2:] for i in range(6)]
    assert float(host(top2.data)) == pytest.approx(np.mean(in_top2))


# -- GPU against CPU at ResNet-50 geometries --------------------------------------------------
RESNET_CONVS = [((2, 3, 224, 224), 64, 7, 2, 3), ((2, 64, 56, 56), 64, 3, 1, 1),
                ((2, 128, 56, 56), 128, 3, 2, 1), ((2, 256, 56, 56), 128, 1, 2, 0),
                ((2, 512, 7, 7), 2048, 1, 1, 0)]


def forward_backward_on(module, function, inputs, output_grad):
    """Output and input gradients of ``function`` on ``module``'s arrays, as host arrays."""
    variables = [Variable(module.asarray(a)) for a in inputs]
    y = function(*variables)
    y.grad = module.asarray(output_grad)
    y.backward()
    return [host(y.data)] + [host(v.grad) for v in variables]


def assert_gpu_matches_cpu(function, inputs, output_shape):
    output_grad = np.random.default_rng(8).standard_normal(output_shape).astype(np.float32)
    cpu = forward_backward_on(np, function, inputs, output_grad)
    gpu = forward_backward_on(backend.cupy, function, inputs, output_grad)
    for expected, actual in zip(cpu, gpu):
        np.testing.assert_allclose(actual, expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())


@pytest.mark.gpu
@pytest.mark.parametrize("shape,out_channels,ksize,stride,pad", RESNET_CONVS)
def test_gpu_convolution_matches_cpu_at_resnet_geometries(shape, out_channels, ksize, stride,
                                                          pad):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape).astype(np.float32)
    W = (rng.standard_normal((out_channels, shape[1], ksize, ksize))
         / np.sqrt(shape[1] * ksize * ksize)).astype(np.float32)
    side = (shape[2] + 2 * pad - ksize) // stride + 1
    assert_gpu_matches_cpu(lambda a, b: F.convolution_2d(a, b, stride=stride, pad=pad),
                           (x, W), (shape[0], out_channels, side, side))


@pytest.mark.gpu
def test_gpu_batch_norm_and_pooling_match_cpu_at_resnet_sizes():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 64, 56, 56)).astype(np.float32)
    gamma, beta = rng.standard_normal(64).astype(np.float32), np.zeros(64, np.float32)
    for shape in ((4, 64, 56, 56), (4, 64, 7, 7)):
        assert_gpu_matches_cpu(lambda a, g, b: F.batch_normalization(a, g, b),
                               (x[:, :, :shape[2], :shape[3]], gamma, beta), shape)
    # the same input on both backends, so that ties (ReLU zeros) are routed alike
    assert_gpu_matches_cpu(lambda a: F.max_pooling_2d(F.relu(a), 3, 2, 1), (x,),
                           (4, 64, 28, 28))
    assert_gpu_matches_cpu(lambda a: F.global_average_pooling_2d(F.average_pooling_2d(a, 2)),
                           (x,), (4, 64))
