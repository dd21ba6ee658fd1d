"""Linear, Convolution2D and BatchNormalization links."""
import numpy
import pytest

from kfac_mn import functions as F
from kfac_mn import initializers, links
from kfac_mn.configuration import using_config
from kfac_mn.function_hook import FunctionHook
from kfac_mn.variable import Variable


def rand(*shape, seed=0):
    return numpy.random.RandomState(seed).normal(size=shape).astype(numpy.float32)


def test_linear_computes_x_w_transpose_plus_b():
    layer = links.Linear(3, 2, initialW=rand(2, 3), initial_bias=numpy.array([1.0, -1.0]))
    x = rand(4, 3, seed=1)
    y = layer(x)
    numpy.testing.assert_allclose(y.data, x @ layer.W.data.T + layer.b.data, rtol=1e-6)
    assert [p for p, _ in layer.namedparams()] == ["/W", "/b"]
    assert layer.W.data.dtype == numpy.float32 and layer.b.data.dtype == numpy.float32


def test_linear_lazy_in_size_flattens_the_input():
    numpy.random.seed(0)
    layer = links.Linear(5)
    assert layer.in_size is None and layer.W.data is None
    y = layer(rand(2, 3, 2, 2))
    assert y.shape == (2, 5)
    assert layer.W.shape == (5, 12) and layer.in_size == 12
    assert layer.W.data.std() == pytest.approx(numpy.sqrt(1 / 12), rel=0.3)  # LeCun normal
    with pytest.raises(ValueError, match="expected 12 input features"):
        layer(rand(2, 7))


def test_linear_without_bias_and_bad_sizes():
    layer = links.Linear(3, 2, nobias=True)
    assert layer.b is None and [p for p, _ in layer.namedparams()] == ["/W"]
    y = layer(rand(4, 3))
    numpy.testing.assert_allclose(y.data, rand(4, 3) @ layer.W.data.T, rtol=1e-6)
    with pytest.raises(ValueError, match="Linear out_size must be a positive integer, got 0"):
        links.Linear(3, 0)
    with pytest.raises(ValueError, match="Linear in_size must be a positive integer"):
        links.Linear(2.5, 3)


@pytest.mark.torch
def test_convolution_matches_torch_with_stride_and_pad_pairs():
    torch = pytest.importorskip("torch")
    numpy.random.seed(0)
    conv = links.Convolution2D(3, 4, (3, 2), stride=(2, 1), pad=(1, 0),
                               initial_bias=rand(4, seed=3))
    x = rand(2, 3, 7, 6, seed=1)
    y = conv(x)
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(conv.W.data), torch.from_numpy(conv.b.data),
        stride=(2, 1), padding=(1, 0)).numpy()
    numpy.testing.assert_allclose(y.data, expected, rtol=1e-5, atol=1e-5)
    assert (conv.ksize, conv.stride, conv.pad) == ((3, 2), (2, 1), (1, 0))


def test_convolution_lazy_in_channels_and_errors():
    conv = links.Convolution2D(8, 3, pad=1, nobias=True, initialW=initializers.HeNormal())
    assert conv.out_channels == 8 and conv.in_channels is None and conv.b is None
    assert conv(rand(1, 5, 4, 4)).shape == (1, 8, 4, 4)
    assert conv.W.shape == (8, 5, 3, 3) and conv.in_channels == 5
    with pytest.raises(ValueError, match="expected 5 input channels"):
        conv(rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, C, H, W\)"):
        conv(rand(5, 4, 4))
    with pytest.raises(ValueError, match="Convolution2D stride must be an int or a pair"):
        links.Convolution2D(3, 4, 3, stride=0)
    with pytest.raises(ValueError, match="Convolution2D ksize must be an int or a pair"):
        links.Convolution2D(3, 4, (3, 3, 3))


def test_function_node_leads_back_to_the_link():
    """What the K-FAC hook relies on: inputs[1] of the node is the W parameter."""
    layer = links.Linear(3, 2)
    conv = links.Convolution2D(2, 2, 1)
    seen = []

    class Recorder(FunctionHook):
        def backward_preprocess(self, function, in_data, out_grad):
            if len(function.inputs) > 1:
                seen.append(function.inputs[1].get_variable_or_none())

    y = F.sum(conv(F.reshape(layer(rand(2, 3)), (2, 2, 1, 1))))
    with Recorder():
        y.backward()
    assert seen == [conv.W, layer.W]


def _channel_stats(y):
    return y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))


def test_batch_normalization_train_uses_batch_stats_and_updates_running_ones():
    bn = links.BatchNormalization(3, decay=0.8)
    mean_array, var_array = bn.avg_mean, bn.avg_var
    x = rand(4, 3, 2, 2) * 3.0 + 1.5
    y = bn(x)
    mean, var = _channel_stats(y.data)
    numpy.testing.assert_allclose(mean, 0.0, atol=1e-5)
    numpy.testing.assert_allclose(var, 1.0, rtol=1e-3)
    batch_mean = x.mean(axis=(0, 2, 3))
    batch_var = x.var(axis=(0, 2, 3), ddof=1)  # Chainer keeps the unbiased variance
    assert bn.avg_mean is mean_array and bn.avg_var is var_array  # updated in place
    numpy.testing.assert_allclose(bn.avg_mean, 0.2 * batch_mean, rtol=1e-5)
    numpy.testing.assert_allclose(bn.avg_var, 0.8 + 0.2 * batch_var, rtol=1e-5)
    assert [p for p, _ in bn.namedparams()] == ["/beta", "/gamma"]


def test_batch_normalization_eval_uses_running_stats_and_keeps_them():
    bn = links.BatchNormalization(3)
    bn.avg_mean[...] = [1.0, 2.0, 3.0]
    bn.avg_var[...] = [4.0, 1.0, 0.25]
    bn.gamma.data[...] = 2.0
    bn.beta.data[...] = 0.5
    x = rand(2, 3, 2, 2)
    with using_config("train", False):
        y = bn(Variable(x))
    expected = 2.0 * (x - bn.avg_mean[:, None, None]) / numpy.sqrt(
        bn.avg_var[:, None, None] + 2e-5) + 0.5
    numpy.testing.assert_allclose(y.data, expected, rtol=1e-5, atol=1e-6)
    numpy.testing.assert_array_equal(bn.avg_mean, [1.0, 2.0, 3.0])
    numpy.testing.assert_array_equal(bn.avg_var, [4.0, 1.0, 0.25])
    y_train = bn(x)  # back in training mode: batch statistics
    numpy.testing.assert_allclose(_channel_stats(y_train.data)[0], 0.5, atol=1e-5)


def test_batch_normalization_errors_and_dtype():
    bn = links.BatchNormalization(3, dtype=numpy.float64)
    assert bn.gamma.data.dtype == numpy.float64 and bn.avg_var.dtype == numpy.float64
    bn.name = "bn1"
    with pytest.raises(ValueError, match="BatchNormalization 'bn1': expected 3 channels"):
        bn(rand(2, 4, 1, 1).astype(numpy.float64))
    with pytest.raises(ValueError, match="decay must be in"):
        links.BatchNormalization(3, decay=1.5)
    with pytest.raises(ValueError, match="eps must be positive"):
        links.BatchNormalization(3, eps=0.0)


def test_classifier_returns_the_loss_and_keeps_logits_and_accuracy():
    numpy.random.seed(0)
    model = links.Classifier(links.Linear(4, 3))
    x = rand(5, 4)
    t = numpy.array([0, 1, 2, 1, 0], dtype=numpy.int32)
    loss = model(x, t)
    logits = x @ model.predictor.W.data.T
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - numpy.log(numpy.exp(shifted).sum(axis=1, keepdims=True))
    assert float(loss.data) == pytest.approx(-log_p[numpy.arange(5), t].mean(), rel=1e-5)
    numpy.testing.assert_allclose(model.y.data, logits, rtol=1e-5, atol=1e-6)
    assert float(model.accuracy.data) == pytest.approx((logits.argmax(axis=1) == t).mean())
    assert [p for p, _ in model.namedparams()] == ["/predictor/W", "/predictor/b"]
    loss.backward()
    assert model.predictor.W.grad is not None
    model.compute_accuracy = False
    model(x, t)
    assert model.accuracy is None
    with pytest.raises(TypeError, match="needs the predictor's inputs and the labels"):
        model(x)
