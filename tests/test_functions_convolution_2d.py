"""convolution_2d, im2col and col2im: definitions, gradients, and PyTorch parity."""
import importlib

import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.function_hook import FunctionHook
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable

# (x shape, ksize, stride, pad): odd sizes, strides 1/2, pads 0/1/3, kernels 1/3/7,
# asymmetric pairs, and every im2col/col2im path (pointwise, same-size stride 1,
# stride-phase gather, strided view).
CONFIGS = [
    ((2, 3, 5, 4), 1, 1, 0),
    ((2, 3, 7, 6), 1, 2, 0),
    ((2, 3, 7, 6), 3, 1, 1),
    ((2, 2, 7, 5), 3, 2, 1),
    ((1, 2, 6, 7), 3, 1, 3),
    ((2, 2, 9, 8), 7, 2, 3),
    ((2, 2, 7, 8), (3, 1), (2, 1), (0, 1)),
    ((2, 2, 5, 4), 5, 1, 2),
    ((1, 2, 3, 2), 5, 1, 2),
    ((2, 2, 6, 5), (3, 1), 1, (1, 0)),
    ((2, 2, 9, 7), 5, (2, 1), 2),
]


def brute_force_im2col(x, ksize, stride, pad):
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    n, c, h, w = x.shape
    oh = (h + 2 * ph - kh) // sy + 1
    ow = (w + 2 * pw - kw) // sx + 1
    col = np.zeros((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            for oy in range(oh):
                for ox in range(ow):
                    y, xx = oy * sy + i - ph, ox * sx + j - pw
                    if 0 <= y < h and 0 <= xx < w:
                        col[:, :, i, j, oy, ox] = x[:, :, y, xx]
    return col


def brute_force_conv(x, W, b, stride, pad):
    col = brute_force_im2col(x, W.shape[2:], stride, pad)
    y = np.einsum("ncklyx,dckl->ndyx", col, W)
    return y if b is None else y + b[:, None, None]


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_im2col_matches_the_definition(shape, ksize, stride, pad):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    col = F.im2col(x, ksize, stride, pad)
    assert col.flags.c_contiguous
    np.testing.assert_array_equal(col, brute_force_im2col(x, ksize, stride, pad))


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_col2im_is_the_adjoint_of_im2col(shape, ksize, stride, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    col_shape = F.im2col(x, ksize, stride, pad).shape
    c = rng.standard_normal(col_shape)
    img = F.col2im(c, stride, pad, shape[2], shape[3])
    assert img.shape == shape and img.flags.c_contiguous
    np.testing.assert_allclose(np.vdot(img, x), np.vdot(c, F.im2col(x, ksize, stride, pad)),
                               rtol=1e-12)


def test_pointwise_im2col_is_the_input_itself():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype(np.float32)
    col = F.im2col(x, 1, 1, 0)
    assert col.shape == (2, 3, 1, 1, 4, 5) and col.flags.c_contiguous
    np.testing.assert_array_equal(col, brute_force_im2col(x, 1, 1, 0))
    transposed = np.asfortranarray(x)
    np.testing.assert_array_equal(F.im2col(transposed, 1, 1, 0), col)
    assert F.im2col(transposed, 1, 1, 0).flags.c_contiguous


def test_im2col_rejects_bad_windows():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit"):
        F.im2col(x, 7, 1, 1)
    with pytest.raises(ValueError, match="stride"):
        F.im2col(x, 3, 0, 0)
    with pytest.raises(ValueError, match="NCHW"):
        F.im2col(x[0], 3, 1, 0)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous array of shape"):
        F.im2col(x, 3, 1, 1, out=np.zeros((1, 1, 3, 3, 4, 3), np.float32))
    col = F.im2col(x, 3, 1, 1)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous array of shape"):
        F.col2im(col, 1, 1, 4, 4, out=np.zeros((1, 1, 4, 8), np.float32)[..., ::2])


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_im2col_and_col2im_write_into_out(shape, ksize, stride, pad):
    rng = np.random.default_rng(10)
    x = rng.standard_normal(shape)
    expected = F.im2col(x, ksize, stride, pad)
    out = np.full(expected.shape, np.nan)
    assert F.im2col(x, ksize, stride, pad, out=out) is out
    np.testing.assert_array_equal(out, expected)
    img = np.full(shape, np.nan)
    assert F.col2im(expected, stride, pad, shape[2], shape[3], out=img) is img
    np.testing.assert_array_equal(img, F.col2im(expected, stride, pad, shape[2], shape[3]))


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_forward_matches_brute_force(shape, ksize, stride, pad, bias):
    rng = np.random.default_rng(3)
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    x = rng.standard_normal(shape)
    W = rng.standard_normal((4, shape[1], kh, kw))
    b = rng.standard_normal(4) if bias else None
    y = F.convolution_2d(x, W, b, stride, pad)
    np.testing.assert_allclose(y.data, brute_force_conv(x, W, b, stride, pad), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_backward_matches_central_differences(shape, ksize, stride, pad, bias):
    rng = np.random.default_rng(4)
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    x = rng.standard_normal(shape)
    W = rng.standard_normal((3, shape[1], kh, kw))
    inputs = (x, W, rng.standard_normal(3)) if bias else (x, W)
    y_shape = F.convolution_2d(*inputs, stride=stride, pad=pad).shape
    check_backward(lambda *v: F.convolution_2d(*v, stride=stride, pad=pad), inputs,
                   rng.standard_normal(y_shape))


def test_weight_gradient_takes_both_gemm_layouts():
    # 1x1 on 2x2 images (S=4): C_out*K > S*(C_out+K), the transposed single-GEMM layout;
    # 3x3 on 9x9 (S=81): the batched layout.  Both must give sum_n gy[n] col[n]^T.
    rng = np.random.default_rng(5)
    for x_shape, W_shape, pad in [((3, 40, 2, 2), (50, 40, 1, 1), 0),
                                  ((3, 2, 9, 9), (2, 2, 3, 3), 1)]:
        x, W = rng.standard_normal(x_shape), rng.standard_normal(W_shape)
        xv, Wv = Variable(x), Variable(W)
        y = F.convolution_2d(xv, Wv, pad=pad)
        y.grad = rng.standard_normal(y.shape)
        y.backward()
        col = brute_force_im2col(x, W_shape[2:], 1, pad).reshape(x_shape[0], W[0].size, -1)
        expected = np.einsum("nos,nks->ok", y.grad.reshape(*y.shape[:2], -1), col)
        np.testing.assert_allclose(Wv.grad, expected.reshape(W_shape), rtol=1e-10)


def test_node_geometry_gives_kfac_the_same_patches():
    rng = np.random.default_rng(6)
    x = Variable(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    W = Variable(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    seen = {}

    class Spy(FunctionHook):
        def backward_preprocess(self, function, in_data, out_grad):
            seen["patches"] = F.im2col(in_data[0], function.ksize, function.stride, function.pad)

    y = F.convolution_2d(x, W, stride=(2, 1), pad=1)
    node = y.creator
    assert isinstance(node, F.Convolution2DFunction)
    assert node.stride == (2, 1) and node.pad == (1, 1) and node.ksize == (3, 3)
    y.grad = np.ones_like(y.data)
    with Spy():
        y.backward()
    col = seen["patches"].reshape(2, 27, -1)
    np.testing.assert_allclose(np.matmul(W.data.reshape(4, 27), col).reshape(y.shape), y.data,
                               rtol=1e-5, atol=1e-5)
    first = (x.grad.copy(), W.grad.copy())
    x.cleargrad()
    W.cleargrad()
    y.backward()  # the graph can be traversed again
    np.testing.assert_array_equal(x.grad, first[0])
    np.testing.assert_array_equal(W.grad, first[1])


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_blocks_of_examples_give_the_same_results(monkeypatch, shape, ksize, stride, pad):
    module = importlib.import_module("kfac_mn.functions.convolution_2d")  # not the function
    rng = np.random.default_rng(9)
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    arrays = (rng.standard_normal((3,) + shape[1:]), rng.standard_normal((4, shape[1], kh, kw)))
    gy = None
    results = []
    for budget in (module.PATCH_BLOCK_ELEMENTS, 1):  # one block, then one example per block
        monkeypatch.setattr(module, "PATCH_BLOCK_ELEMENTS", budget)
        x, W = (Variable(a.copy()) for a in arrays)
        y = F.convolution_2d(x, W, stride=stride, pad=pad)
        gy = rng.standard_normal(y.shape) if gy is None else gy
        y.grad = gy
        y.backward()
        results.append((y.data, x.grad, W.grad))
    for one_block, per_example in zip(*results):
        np.testing.assert_allclose(per_example, one_block, rtol=1e-12, atol=1e-12)


def test_float32_stays_float32():
    rng = np.random.default_rng(7)
    x = Variable(rng.standard_normal((2, 3, 6, 6)).astype(np.float32))
    W = Variable(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    b = Variable(rng.standard_normal(4).astype(np.float32))
    y = F.convolution_2d(x, W, b, 2, 1)
    assert y.dtype == np.float32
    y.grad = np.ones_like(y.data)
    y.backward()
    assert x.grad.dtype == W.grad.dtype == b.grad.dtype == np.float32


def test_convolution_rejects_bad_inputs():
    x = np.zeros((1, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="3 channels but W expects 2"):
        F.convolution_2d(x, np.zeros((4, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="dtype float64"):
        F.convolution_2d(x, np.zeros((4, 3, 3, 3)))
    with pytest.raises(ValueError, match="b must have shape"):
        F.convolution_2d(x, np.zeros((4, 3, 3, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="stride"):
        F.convolution_2d(x, np.zeros((4, 3, 3, 3), np.float32), stride=0)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_convolution_matches_torch(torch, shape, ksize, stride, pad, bias):
    rng = np.random.default_rng(8)
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    arrays = [rng.standard_normal(shape).astype(np.float32),
              rng.standard_normal((5, shape[1], kh, kw)).astype(np.float32)]
    if bias:
        arrays.append(rng.standard_normal(5).astype(np.float32))
    ours = [Variable(a) for a in arrays]
    y = F.convolution_2d(*ours, stride=stride, pad=pad)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    y.grad = gy
    y.backward()
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y_t = torch.nn.functional.conv2d(theirs[0], theirs[1], theirs[2] if bias else None,
                                     stride, pad)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-4, atol=1e-4)
    for v, t in zip(ours, theirs):
        np.testing.assert_allclose(v.grad, t.grad.numpy(), rtol=1e-4, atol=1e-4)
