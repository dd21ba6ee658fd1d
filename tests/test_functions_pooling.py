"""max_pooling_2d, average_pooling_2d and global_average_pooling_2d."""
import importlib

import numpy as np
import pytest

from kfac_mn import functions as F
from kfac_mn.gradient_check import check_backward
from kfac_mn.variable import Variable

# (x shape, ksize, stride, pad): overlapping windows, padding, odd and asymmetric sizes.
CONFIGS = [
    ((2, 3, 7, 7), 3, 2, 1),
    ((2, 2, 6, 5), 2, None, 0),
    ((1, 2, 5, 6), 3, 1, 1),
    ((2, 2, 9, 7), (3, 2), (2, 1), (1, 0)),
    ((1, 1, 8, 8), 4, 3, 2),
]


def distinct_values(shape, seed):
    """Values at least 0.01 apart, so that eps=1e-3 never changes which one is the max."""
    size = int(np.prod(shape))
    return np.random.default_rng(seed).permutation(size).reshape(shape) * 0.01 - size * 0.005


def output_shape(function, x, *args):
    return function(x, *args).shape


def brute_force_pool(x, ksize, stride, pad, reduce, pad_value):
    kh, kw = (ksize, ksize) if isinstance(ksize, int) else ksize
    stride = ksize if stride is None else stride
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh = (x.shape[2] + 2 * ph - kh) // sy + 1
    ow = (x.shape[3] + 2 * pw - kw) // sx + 1
    y = np.empty(x.shape[:2] + (oh, ow))
    for oy in range(oh):
        for ox in range(ow):
            window = padded[:, :, oy * sy:oy * sy + kh, ox * sx:ox * sx + kw]
            y[:, :, oy, ox] = reduce(window, axis=(2, 3))
    return y


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_max_pooling_forward_matches_brute_force(shape, ksize, stride, pad):
    x = distinct_values(shape, 0)
    np.testing.assert_array_equal(F.max_pooling_2d(x, ksize, stride, pad).data,
                                  brute_force_pool(x, ksize, stride, pad, np.max, -np.inf))


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_average_pooling_forward_counts_the_padding(shape, ksize, stride, pad):
    x = distinct_values(shape, 1)
    np.testing.assert_allclose(F.average_pooling_2d(x, ksize, stride, pad).data,
                               brute_force_pool(x, ksize, stride, pad, np.mean, 0.0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_max_pooling_backward_matches_central_differences(shape, ksize, stride, pad):
    x = distinct_values(shape, 2)
    gy = np.random.default_rng(3).standard_normal(
        output_shape(F.max_pooling_2d, x, ksize, stride, pad))
    check_backward(lambda v: F.max_pooling_2d(v, ksize, stride, pad), x, gy)


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_average_pooling_backward_matches_central_differences(shape, ksize, stride, pad):
    x = distinct_values(shape, 4)
    gy = np.random.default_rng(5).standard_normal(
        output_shape(F.average_pooling_2d, x, ksize, stride, pad))
    check_backward(lambda v: F.average_pooling_2d(v, ksize, stride, pad), x, gy)


def test_global_average_pooling_forward_and_backward():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 5, 2))
    np.testing.assert_allclose(F.global_average_pooling_2d(x).data, x.mean(axis=(2, 3)),
                               rtol=1e-12)
    check_backward(F.global_average_pooling_2d, x, rng.standard_normal((3, 4)))


def test_max_pooling_gives_a_tied_window_gradient_to_its_first_maximum():
    x = Variable(np.zeros((1, 1, 3, 3), np.float32))
    y = F.max_pooling_2d(x, 3, 1, 0)
    y.grad = np.ones((1, 1, 1, 1), np.float32)
    y.backward()
    expected = np.zeros((1, 1, 3, 3), np.float32)
    expected[0, 0, 0, 0] = 1
    np.testing.assert_array_equal(x.grad, expected)


@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_max_pooling_blocks_of_examples_give_the_same_results(monkeypatch, shape, ksize,
                                                              stride, pad):
    chunks = importlib.import_module("kfac_mn.functions.batch_chunks")
    rng = np.random.default_rng(14)
    x = np.maximum(np.round(rng.standard_normal((3,) + shape[1:]), 1), 0)  # many ties
    gy = None
    results = []
    for budget in (chunks.CACHE_BLOCK_ELEMENTS, 1):  # one block, then one example per block
        monkeypatch.setattr(chunks, "CACHE_BLOCK_ELEMENTS", budget)
        xv = Variable(x.copy())
        y = F.max_pooling_2d(xv, ksize, stride, pad)
        gy = rng.standard_normal(y.shape) if gy is None else gy
        y.grad = gy
        y.backward()
        results.append((y.data, xv.grad))
    for one_block, per_example in zip(*results):
        np.testing.assert_array_equal(per_example, one_block)


def test_pooling_keeps_float32():
    x = Variable(np.random.default_rng(7).standard_normal((2, 3, 6, 6)).astype(np.float32))
    for function in (lambda v: F.max_pooling_2d(v, 3, 2, 1),
                     lambda v: F.average_pooling_2d(v, 3, 2, 1), F.global_average_pooling_2d):
        x.cleargrad()
        y = function(x)
        assert y.dtype == np.float32
        y.grad = np.ones_like(y.data)
        y.backward()
        assert x.grad.dtype == np.float32


def test_pooling_rejects_bad_arguments():
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="at most half of ksize"):
        F.max_pooling_2d(x, 2, 1, 2)
    with pytest.raises(ValueError, match="at most half of ksize"):
        F.average_pooling_2d(x, 3, 1, 2)
    with pytest.raises(ValueError, match="ksize must be non-negative"):
        F.max_pooling_2d(x, -1)
    with pytest.raises(ValueError, match="4 dims"):
        F.global_average_pooling_2d(x[0])


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def compare_with_torch(torch, ours, theirs, x, gy_seed):
    xv = Variable(x)
    y = ours(xv)
    gy = np.random.default_rng(gy_seed).standard_normal(y.shape).astype(np.float32)
    y.grad = gy
    y.backward()
    x_t = torch.tensor(x, requires_grad=True)
    y_t = theirs(x_t)
    y_t.backward(torch.tensor(gy))
    np.testing.assert_allclose(y.data, y_t.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(xv.grad, x_t.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_max_pooling_matches_torch_with_ties(torch, shape, ksize, stride, pad):
    # Rounded ReLU outputs: many windows are all zeros or hold repeated maxima.
    rng = np.random.default_rng(8)
    x = np.maximum(np.round(rng.standard_normal(shape), 1), 0).astype(np.float32)
    compare_with_torch(torch, lambda v: F.max_pooling_2d(v, ksize, stride, pad),
                       lambda t: torch.nn.functional.max_pool2d(t, ksize, stride, pad), x, 9)


@pytest.mark.torch
@pytest.mark.parametrize("shape, ksize, stride, pad", CONFIGS)
def test_average_pooling_matches_torch(torch, shape, ksize, stride, pad):
    x = np.random.default_rng(10).standard_normal(shape).astype(np.float32)
    compare_with_torch(torch, lambda v: F.average_pooling_2d(v, ksize, stride, pad),
                       lambda t: torch.nn.functional.avg_pool2d(t, ksize, stride, pad,
                                                                count_include_pad=True), x, 11)


@pytest.mark.torch
def test_global_average_pooling_matches_torch(torch):
    x = np.random.default_rng(12).standard_normal((4, 6, 7, 7)).astype(np.float32)
    compare_with_torch(torch, F.global_average_pooling_2d, lambda t: t.mean(dim=(2, 3)), x, 13)
