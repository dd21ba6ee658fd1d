"""The cuDNN path on a GPU against the im2col path on the same GPU (float32, rtol 1e-4): every
convolution of ResNet-50 forward and backward, batch norm in training (with its running
statistics and K-FAC's x_hat) and in evaluation, float16 data, the graph cache, a K-FAC step;
and batched inversion against one factor at a time.  Skipped without CuPy, a GPU or cuDNN
Frontend (pip install 'kfac_mn[gpu]')."""
import numpy as np
import pytest

from kfac_mn import Variable, backend, cudnn_graphs
from kfac_mn import functions as F
from kfac_mn.fisher.batched_inverse import InverseRequest, batched_damped_inverses
from kfac_mn.fisher.inverse import FallbackCounter, damped_inverse
from tests.test_cudnn_graphs import resnet50_geometries

pytestmark = pytest.mark.gpu
BATCH = 4


@pytest.fixture(scope="module")
def cupy():
    if not backend.gpu_available():
        pytest.skip("no CuPy or no GPU")
    try:
        backend.load_cudnn_frontend()
    except backend.CudnnUnavailable as error:
        pytest.skip(f"cuDNN Frontend: {error}")
    return backend.cupy


def on(conv_backend, function, inputs, output_grad):
    """Output and input gradients of ``function`` with ``conv_backend``, as host arrays."""
    previous = backend.conv_backend()
    backend.set_conv_backend(conv_backend)
    try:
        variables = [Variable(backend.cupy.asarray(a)) for a in inputs]
        y = function(*variables)
        y.grad = backend.cupy.asarray(output_grad)
        y.backward()
        return [backend.to_cpu(y.data)] + [backend.to_cpu(v.grad) for v in variables]
    finally:
        backend.set_conv_backend(previous)


def assert_close(actual, expected, rtol):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a.astype(np.float32), e.astype(np.float32), rtol=rtol,
                                   atol=rtol * float(np.abs(e).max()))


def conv_inputs(x_shape, w_shape, stride, pad, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x_shape = (BATCH,) + tuple(x_shape[1:])
    x = rng.standard_normal(x_shape).astype(dtype)
    W = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    y_shape = cudnn_graphs.conv_output_shape(x_shape, w_shape, stride, pad)
    return (x, W), rng.standard_normal(y_shape).astype(dtype)


@pytest.mark.parametrize("geometry", resnet50_geometries()[0], ids=str)
def test_every_resnet50_convolution_forward_and_backward(cupy, geometry):
    x_shape, w_shape, stride, pad = geometry
    inputs, gy = conv_inputs(x_shape, w_shape, stride, pad)

    def conv(x, W):
        return F.convolution_2d(x, W, stride=stride, pad=pad)

    assert_close(on("cudnn", conv, inputs, gy), on("im2col", conv, inputs, gy), 1e-4)


def test_convolution_with_bias_and_float16_data(cupy):
    x_shape, w_shape, stride, pad = (BATCH, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1)
    (x, W), gy = conv_inputs(x_shape, w_shape, stride, pad)
    b = np.linspace(-1, 1, 64).astype(np.float32)

    def conv(x, W, b):
        return F.convolution_2d(x, W, b, stride=stride, pad=pad)

    assert_close(on("cudnn", conv, (x, W, b), gy), on("im2col", conv, (x, W, b), gy), 1e-4)
    half = [a.astype(np.float16) for a in (x, W, b)]
    assert_close(on("cudnn", conv, half, gy.astype(np.float16)),
                 on("im2col", conv, (x, W, b), gy), 2e-2)


@pytest.mark.parametrize("shape", resnet50_geometries()[1], ids=str)
def test_batch_norm_in_training_with_running_statistics_and_x_hat(cupy, shape):
    shape = (BATCH,) + shape[1:]
    rng = np.random.default_rng(1)
    x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
    gamma, beta, mean0 = (rng.standard_normal(shape[1]).astype(np.float32) for _ in range(3))
    var0 = (rng.standard_normal(shape[1]) ** 2 + 0.5).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    results = {}
    for conv_backend in ("cudnn", "im2col"):
        running_mean, running_var = cupy.asarray(mean0), cupy.asarray(var0)
        nodes = []

        def bn(x, g, b, mean=running_mean, var=running_var, nodes=nodes):
            y = F.batch_normalization(x, g, b, running_mean=mean, running_var=var)
            nodes.append(y.creator)
            return y

        results[conv_backend] = on(conv_backend, bn, (x, gamma, beta), gy) + [
            backend.to_cpu(running_mean), backend.to_cpu(running_var),
            backend.to_cpu(nodes[0].x_hat)]
    assert_close(results["cudnn"], results["im2col"], 1e-4)


def test_batch_norm_in_evaluation(cupy):
    rng = np.random.default_rng(2)
    shape = (BATCH, 256, 14, 14)
    x = rng.standard_normal(shape).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(256).astype(np.float32) for _ in range(3))
    var = (rng.standard_normal(256) ** 2 + 0.1).astype(np.float32)
    gy = rng.standard_normal(shape).astype(np.float32)
    inputs = (x, gamma, beta, mean, var)
    assert_close(on("cudnn", F.fixed_batch_normalization, inputs, gy),
                 on("im2col", F.fixed_batch_normalization, inputs, gy), 1e-4)


def test_each_graph_is_built_once(cupy):
    inputs, gy = conv_inputs((BATCH, 32, 20, 20), (48, 32, 3, 3), (2, 2), (1, 1))

    def conv(x, W):
        return F.convolution_2d(x, W, stride=2, pad=1)

    on("cudnn", conv, inputs, gy)
    built = sum(cudnn_graphs.cached_graphs().values())
    for _ in range(3):
        on("cudnn", conv, inputs, gy)
    assert sum(cudnn_graphs.cached_graphs().values()) == built


def test_batched_inversion_on_the_gpu_equals_one_factor_at_a_time(cupy):
    rng = np.random.default_rng(3)
    requests = []
    for i, side in enumerate([64, 64, 576, 576, 1152, 64, 2048, 256, 256, 4608]):
        rows = rng.standard_normal((side, side + 16)).astype(np.float32)
        requests.append(InverseRequest("A", cupy.asarray(rows @ rows.T / rows.shape[1]),
                                       1e-3, f"/layer{i}/A"))
    counter = FallbackCounter()
    batched = batched_damped_inverses(requests, np.float32, counter)
    for request, inverse in zip(requests, batched):
        single = damped_inverse(request.matrix, request.damping, np.float32, request.label)
        assert_close([backend.to_cpu(inverse)], [backend.to_cpu(single)], 1e-3)
    assert not counter
