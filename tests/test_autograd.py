"""The define-by-run core: backward order, accumulation, graph lifetime, hooks."""
import gc
import weakref

import numpy as np
import pytest

import kfac_mn
from kfac_mn import FunctionHook, Variable, no_backprop_mode
from kfac_mn import functions as F


def test_chain_rule_matches_hand_derivative():
    x = Variable(np.array([1.0, -2.0, 3.0]))
    y = (x * x * x + 2.0 * x).sum()
    y.backward()
    np.testing.assert_allclose(x.grad, 3 * x.data ** 2 + 2.0)


def test_variable_used_twice_accumulates():
    x = Variable(np.array([0.5, 1.5]))
    y = x * 3.0
    z = (y * y + y).sum()  # y feeds two functions; x through both paths
    z.backward()
    np.testing.assert_allclose(x.grad, (2 * 9 * x.data + 3.0))


def test_diamond_graph_runs_each_function_once():
    class Count(FunctionHook):
        def __init__(self):
            self.backward = 0

        def backward_preprocess(self, function, in_data, out_grad):
            self.backward += 1

    x = Variable(np.array(2.0))
    a = x * x
    b = a * 3.0
    c = a * 4.0
    d = b + c
    with Count() as hook:
        d.backward()
    assert hook.backward == 4  # x*x, *3, *4, + : each exactly once
    assert x.grad == pytest.approx(14 * 2.0)  # d = 7 x^2


def test_leaf_gradients_accumulate_across_backward_calls_until_cleared():
    x = Variable(np.array([1.0, 2.0]))
    (x * 2.0).sum().backward()
    (x * 2.0).sum().backward()
    np.testing.assert_allclose(x.grad, [4.0, 4.0])
    x.cleargrad()
    assert x.grad is None


def test_intermediate_grads_dropped_unless_retained():
    x = Variable(np.array([1.0, 2.0]))
    h = x * x
    y = h.sum()
    y.backward()
    assert h.grad is None
    x.cleargrad()
    h = x * x
    y = h.sum()
    y.backward(retain_grad=True)
    np.testing.assert_allclose(h.grad, [1.0, 1.0])


def test_non_scalar_backward_needs_grad():
    x = Variable(np.ones(3))
    y = x * 2.0
    with pytest.raises(ValueError, match="non-scalar"):
        y.backward()
    y.grad = np.array([1.0, 2.0, 3.0])
    y.backward()
    np.testing.assert_allclose(x.grad, [2.0, 4.0, 6.0])


def test_no_backprop_mode_builds_no_graph():
    x = Variable(np.ones(3))
    with no_backprop_mode():
        y = x * 2.0
    assert y.creator is None
    assert kfac_mn.config.enable_backprop


def test_using_config_restores_and_rejects_unknown():
    with kfac_mn.using_config("train", False):
        assert not kfac_mn.config.train
    assert kfac_mn.config.train
    with pytest.raises(AttributeError, match="nosuch"):
        with kfac_mn.using_config("nosuch", 1):
            pass


def test_graph_has_no_cycles_and_is_freed_by_refcount():
    gc.disable()
    try:
        x = Variable(np.ones((4, 4)))
        y = (x * x + x).sum()
        creator = weakref.ref(y.creator)
        y.backward()
        del y
        assert creator() is None  # freed without the cycle collector
    finally:
        gc.enable()


def test_broadcasting_gradient_sums_back():
    x = Variable(np.ones((3, 4)))
    b = Variable(np.arange(4.0))
    (x * b).sum().backward()
    np.testing.assert_allclose(b.grad, [3.0] * 4)
    np.testing.assert_allclose(x.grad, np.tile(np.arange(4.0), (3, 1)))


def test_getitem_reshape_transpose_gradients():
    data = np.arange(24.0).reshape(2, 3, 4)
    x = Variable(data)
    y = x.transpose(2, 0, 1).reshape(4, 6)[1:3]
    (y * y).sum().backward()
    expected = np.zeros_like(data)
    expected[:, :, 1:3] = 2 * data[:, :, 1:3]
    np.testing.assert_allclose(x.grad, expected)


def test_float32_stays_float32():
    x = Variable(np.ones(3, dtype=np.float32))
    y = (x * 2.0 + 1.0).sum()
    y.backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32


class Recorder(FunctionHook):
    def __init__(self):
        self.forward = []
        self.backward = []

    def forward_postprocess(self, function, in_data):
        self.forward.append((function.label, [None if a is None else a.shape for a in in_data]))

    def backward_postprocess(self, function, in_data, out_grad):
        self.backward.append((function.label, [None if a is None else a.shape for a in in_data],
                              [None if g is None else g.shape for g in out_grad]))


def test_hook_sees_linear_and_conv_in_both_directions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    W_conv = Variable(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    W_fc = Variable(rng.standard_normal((6, 4 * 5 * 5)).astype(np.float32))
    b_fc = Variable(np.zeros(6, np.float32))
    with Recorder() as hook:
        h = F.convolution_2d(x, W_conv, stride=1, pad=1)
        y = F.linear(h, W_fc, b_fc)
        y.grad = np.ones_like(y.data)
        y.backward()
    labels = [label for label, _ in hook.forward]
    assert labels == ["Convolution2DFunction", "LinearFunction"]
    # backward: linear first; K-FAC needs the inputs (activations) and output gradients
    (lin, lin_in, lin_gy), (conv, conv_in, conv_gy) = hook.backward
    assert lin == "LinearFunction" and conv == "Convolution2DFunction"
    assert lin_in[0] == (2, 4, 5, 5) and lin_gy == [(2, 6)]
    assert conv_in[0] == (2, 3, 5, 5) and conv_gy == [(2, 4, 5, 5)]
    assert kfac_mn.function_hook.active_hooks() == []


def test_cuda_kernel_applicability_and_synchronize_on_the_cpu():
    """One test decides whether a CUDA kernel takes the work; synchronize is a CPU no-op."""
    from kfac_mn import backend, cuda_kernels

    gpu_like = object()  # any module other than NumPy stands for CuPy here
    assert not cuda_kernels.applies(np, np.float32)
    assert cuda_kernels.applies(gpu_like, np.float32, "float64")
    assert not cuda_kernels.applies(gpu_like, np.float32, np.float16)
    backend.synchronize(np.zeros(2), None)
    backend.synchronize()
