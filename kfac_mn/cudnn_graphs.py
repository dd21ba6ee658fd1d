"""Convolutions and batch normalization of CuPy arrays on cuDNN, through cuDNN Frontend graphs.

CuPy 14 has no cuDNN bindings.  NVIDIA's cuDNN Frontend (``pip install
nvidia-cudnn-frontend``, module ``cudnn``) builds cuDNN operation graphs from Python and
executes them on raw device pointers, so CuPy arrays need no PyTorch.  Its low-level graph
API (``cudnn.pygraph``) is the one used here; the library is loaded by
:func:`kfac_mn.backend.load_cudnn_frontend`, and used when :func:`kfac_mn.backend.uses_cudnn`
says so (``--conv-backend cudnn``).

- A graph is built once per :class:`GraphKey` (the operation, the operands' shapes and
  dtype, the convolution's stride and padding or the batch norm's epsilon and momentum, the
  device) and kept in a :class:`GraphCache`: ResNet-50 has a few dozen distinct convolutions
  and each is built once (cuDNN's heuristics, mode A then FALLBACK).
- It runs on CuPy's current stream (set on a cuDNN handle per device, only when it changes)
  with a workspace from CuPy's memory pool.
- A key whose graph cuDNN does not support is remembered and reported once; the callers in
  :mod:`kfac_mn.functions` then take the im2col / CuPy path for it (these functions return
  None).

Operands are NCHW and C-contiguous, as everywhere in kfac_mn; the per-channel operands of
batch normalization (gamma, beta, the statistics) are float32 of shape (1, C, 1, 1), and
compute is float32 (float16 data accumulate in float32).  cuDNN's ``inv_variance`` is
``1 / sqrt(var + eps)``, our ``inv_std``; its running variance uses the unbiased batch
variance, as ours (:mod:`kfac_mn.functions.batch_normalization`).
"""
import collections
import logging

import numpy

from kfac_mn import backend
from kfac_mn.functions.patches import output_hw

logger = logging.getLogger(__name__)

#: what identifies a graph: ``op`` (one of :data:`OPERATIONS`), ``shapes`` (the operands'
#: shapes in the order the builder reads them; a convolution's inputs, then its output),
#: ``dtype`` (of the data), ``attrs`` (stride and padding, or epsilon, momentum and whether
#: running statistics are updated), ``device``
GraphKey = collections.namedtuple("GraphKey", "op shapes dtype attrs device")

OPERATIONS = ("conv_fprop", "conv_dgrad", "conv_wgrad", "bn_train", "bn_backward",
              "bn_inference")
STATS_DTYPE = numpy.dtype(numpy.float32)
#: the data dtypes whose batch norm runs on cuDNN (its statistics are float32; float64 data
#: keep the CuPy path, which computes them in float64)
FLOAT32_STATISTICS = (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32))
#: each convolution graph: cuDNN Frontend's node, its two inputs (our name, the node's
#: keyword) and its output
CONVOLUTIONS = {"conv_fprop": ("conv_fprop", (("x", "image"), ("w", "weight")), "y"),
                "conv_dgrad": ("conv_dgrad", (("gy", "loss"), ("w", "filter")), "gx"),
                "conv_wgrad": ("conv_wgrad", (("x", "image"), ("gy", "loss")), "gw")}


def graph_key(op, shapes, dtype, attrs, device):
    """The :class:`GraphKey` of an operation; shapes and attrs become plain tuples."""
    if op not in OPERATIONS:
        raise ValueError(f"cudnn_graphs: unknown operation {op!r}")
    return GraphKey(op, tuple(tuple(int(d) for d in shape) for shape in shapes),
                    numpy.dtype(dtype).str, tuple(attrs), int(device))


class Unsupported(RuntimeError):
    """cuDNN has no engine for this graph."""


class GraphCache:
    """Built graphs by :class:`GraphKey`; ``builder(key)`` builds a missing one and returns
    it, or raises :class:`Unsupported` (remembered: None from then on, reported once)."""

    def __init__(self, builder):
        self._builder = builder
        self._graphs = {}
        self.builds = 0
        self.hits = 0

    def get(self, key):
        if key in self._graphs:
            self.hits += 1
            return self._graphs[key]
        self.builds += 1
        try:
            graph = self._builder(key)
        except Unsupported as error:
            logger.warning("cuDNN does not support %s %s (%s); it runs on the im2col/CuPy "
                           "path instead", key.op, key.shapes, error)
            graph = None
        self._graphs[key] = graph
        return graph

    def __len__(self):
        return len(self._graphs)

    def clear(self):
        self._graphs.clear()


def contiguous_strides(shape):
    """Element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(int(extent), 1)
    return list(reversed(strides))


def conv_output_shape(x_shape, w_shape, stride, pad):
    """(N, C_out, OH, OW) of a convolution, by the im2col path's own geometry."""
    return (x_shape[0], w_shape[0]) + tuple(output_hw(x_shape[2:], w_shape[2:], stride, pad))


class CompiledGraph:
    """A built cuDNN Frontend graph: its operand tensors by name, the host values it reads
    (batch norm's epsilon and momentum) and its workspace size."""

    def __init__(self, graph, tensors, host_values=None):
        self.graph = graph
        self.tensors = tensors            # name -> the graph's tensor
        self.host_values = host_values or {}  # name -> NumPy array, passed by value
        self.workspace_size = int(graph.get_workspace_size())

    def variant_pack(self, arrays):
        """{graph tensor: pointer} for ``arrays`` (name -> CuPy array) and the host values;
        every operand of the graph must be given."""
        missing = sorted(set(self.tensors) - set(arrays) - set(self.host_values))
        if missing:
            raise ValueError(f"cudnn_graphs: no array for {', '.join(missing)}")
        pack = {self.tensors[name]: array.data.ptr for name, array in arrays.items()}
        pack.update({self.tensors[name]: value.ctypes.data
                     for name, value in self.host_values.items()})
        return pack

    def run(self, handle, arrays):
        cupy = backend.cupy
        workspace = cupy.empty(self.workspace_size, dtype=cupy.uint8) \
            if self.workspace_size else None
        self.graph.execute(self.variant_pack(arrays),
                           workspace.data.ptr if workspace is not None else 0, handle=handle)


# -- building ---------------------------------------------------------------------------------
def _cudnn_dtype(cudnn, dtype):
    types = {"<f4": cudnn.data_type.FLOAT, "<f2": cudnn.data_type.HALF,
             "<f8": cudnn.data_type.DOUBLE}
    if numpy.dtype(dtype).str not in types:
        raise Unsupported(f"dtype {numpy.dtype(dtype).name}")
    return types[numpy.dtype(dtype).str]


class GraphBuilder:
    """Builds the graph of a :class:`GraphKey` with cuDNN Frontend ``cudnn`` on ``handle``."""

    def __init__(self, cudnn, handle):
        self.cudnn = cudnn
        self.handle = handle

    def define(self, key):
        """``(graph, tensors, host values)``: the operation graph of ``key``, not yet built
        (defining needs no GPU)."""
        cudnn = self.cudnn
        graph = cudnn.pygraph(io_data_type=_cudnn_dtype(cudnn, key.dtype),
                              intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        define = self._convolution if key.op in CONVOLUTIONS else getattr(self, "_" + key.op)
        tensors, host_values = define(graph, key)
        return graph, tensors, host_values

    def __call__(self, key):
        cudnn = self.cudnn
        graph, tensors, host_values = self.define(key)
        try:
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
        except cudnn.cudnnGraphNotSupportedError as error:
            raise Unsupported(str(error)) from None
        return CompiledGraph(graph, tensors, host_values)

    def _data(self, graph, name, shape, dtype):
        return graph.tensor(name=name, dim=list(shape), stride=contiguous_strides(shape),
                            data_type=_cudnn_dtype(self.cudnn, dtype))

    def _output(self, tensor, shape, dtype):
        tensor.set_output(True).set_dim(list(shape)).set_stride(contiguous_strides(shape))
        tensor.set_data_type(_cudnn_dtype(self.cudnn, dtype))
        return tensor

    def _convolution(self, graph, key):
        node, inputs, output = CONVOLUTIONS[key.op]
        stride, pad = key.attrs
        tensors = {name: self._data(graph, name, shape, key.dtype)
                   for (name, _), shape in zip(inputs, key.shapes)}
        result = getattr(graph, node)(**{keyword: tensors[name] for name, keyword in inputs},
                                      padding=list(pad), stride=list(stride), dilation=[1, 1])
        # the output's shape is set: dgrad's and wgrad's cannot be inferred
        tensors[output] = self._output(result, key.shapes[2], key.dtype)
        return tensors, {}

    def _channel(self, graph, name, channels):
        return self._data(graph, name, (1, channels, 1, 1), STATS_DTYPE)

    def _scalar(self, graph, name):
        return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1],
                            data_type=self.cudnn.data_type.FLOAT, is_pass_by_value=True)

    def _bn_train(self, graph, key):
        (x_shape,), (eps, momentum, running) = key.shapes, key.attrs
        c = x_shape[1]
        tensors = {"x": self._data(graph, "x", x_shape, key.dtype),
                   "gamma": self._channel(graph, "gamma", c),
                   "beta": self._channel(graph, "beta", c),
                   "eps": self._scalar(graph, "eps"), "momentum": self._scalar(graph, "momentum")}
        inputs = dict(input=tensors["x"], scale=tensors["gamma"], bias=tensors["beta"],
                      epsilon=tensors["eps"], momentum=tensors["momentum"])
        if running:
            tensors["running_mean"] = self._channel(graph, "running_mean", c)
            tensors["running_var"] = self._channel(graph, "running_var", c)
            inputs.update(in_running_mean=tensors["running_mean"],
                          in_running_var=tensors["running_var"])
        outputs = graph.batchnorm(name="bn", **inputs)
        y, mean, inv_std = outputs[:3]
        tensors.update(y=self._output(y, x_shape, key.dtype),
                       mean=self._output(mean, (1, c, 1, 1), STATS_DTYPE),
                       inv_std=self._output(inv_std, (1, c, 1, 1), STATS_DTYPE))
        if running:
            tensors["next_running_mean"] = self._output(outputs[3], (1, c, 1, 1), STATS_DTYPE)
            tensors["next_running_var"] = self._output(outputs[4], (1, c, 1, 1), STATS_DTYPE)
        host = {"eps": numpy.full((1, 1, 1, 1), eps, STATS_DTYPE),
                "momentum": numpy.full((1, 1, 1, 1), momentum, STATS_DTYPE)}
        return tensors, host

    def _bn_backward(self, graph, key):
        (x_shape,), c = key.shapes, key.shapes[0][1]
        tensors = {"gy": self._data(graph, "gy", x_shape, key.dtype),
                   "x": self._data(graph, "x", x_shape, key.dtype),
                   "gamma": self._channel(graph, "gamma", c),
                   "mean": self._channel(graph, "mean", c),
                   "inv_std": self._channel(graph, "inv_std", c)}
        gx, g_gamma, g_beta = graph.batchnorm_backward(
            name="bn_backward", grad=tensors["gy"], input=tensors["x"], scale=tensors["gamma"],
            mean=tensors["mean"], inv_variance=tensors["inv_std"])
        tensors.update(gx=self._output(gx, x_shape, key.dtype),
                       g_gamma=self._output(g_gamma, (1, c, 1, 1), STATS_DTYPE),
                       g_beta=self._output(g_beta, (1, c, 1, 1), STATS_DTYPE))
        return tensors, {}

    def _bn_inference(self, graph, key):
        (x_shape,), c = key.shapes, key.shapes[0][1]
        tensors = {"x": self._data(graph, "x", x_shape, key.dtype),
                   "gamma": self._channel(graph, "gamma", c),
                   "beta": self._channel(graph, "beta", c),
                   "mean": self._channel(graph, "mean", c),
                   "inv_std": self._channel(graph, "inv_std", c)}
        y = graph.batchnorm_inference(name="bn_inference", input=tensors["x"],
                                      mean=tensors["mean"], inv_variance=tensors["inv_std"],
                                      scale=tensors["gamma"], bias=tensors["beta"])
        tensors["y"] = self._output(y, x_shape, key.dtype)
        return tensors, {}


# -- running ----------------------------------------------------------------------------------
class _Device:
    """One device's cuDNN handle (on the stream last set) and graph cache."""

    def __init__(self, cudnn):
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.stream = None
        self.cache = GraphCache(GraphBuilder(cudnn, self.handle))

    def run(self, key, arrays):
        """Run the graph of ``key`` on ``arrays``; False where cuDNN does not support it."""
        compiled = self.cache.get(key)
        if compiled is None:
            return False
        stream = backend.cupy.cuda.get_current_stream().ptr
        if stream != self.stream:
            self.cudnn.set_stream(handle=self.handle, stream=stream)
            self.stream = stream
        compiled.run(self.handle, arrays)
        return True


_devices = {}


def _device():
    device = backend.cupy.cuda.Device().id
    if device not in _devices:
        _devices[device] = _Device(backend.load_cudnn_frontend())
    return device, _devices[device]


def cached_graphs():
    """How many graphs each device holds (for tests and benchmarks)."""
    return {device: len(entry.cache) for device, entry in _devices.items()}


def _run(op, shapes, dtype, attrs, arrays):
    device, entry = _device()
    return entry.run(graph_key(op, shapes, dtype, attrs, device), arrays)


def _contiguous(*arrays):
    return [backend.cupy.ascontiguousarray(a) for a in arrays]


def _convolve(op, first, second, output_shape, stride, pad):
    """A new array of ``output_shape`` computed by the convolution graph ``op`` (one of
    :data:`CONVOLUTIONS`) from its two inputs, or None where cuDNN does not support it."""
    _, inputs, output = CONVOLUTIONS[op]
    first, second = _contiguous(first, second)
    result = backend.cupy.empty(output_shape, dtype=first.dtype)
    arrays = {inputs[0][0]: first, inputs[1][0]: second, output: result}
    ok = _run(op, (first.shape, second.shape, tuple(output_shape)), first.dtype,
              (tuple(stride), tuple(pad)), arrays)
    return result if ok else None


def conv2d_forward(x, W, stride, pad):
    """``y`` of the convolution (no bias), or None where cuDNN does not support it."""
    return _convolve("conv_fprop", x, W, conv_output_shape(x.shape, W.shape, stride, pad),
                     stride, pad)


def conv2d_backward_data(gy, W, x_shape, stride, pad):
    """The input gradient of the convolution, or None."""
    return _convolve("conv_dgrad", gy, W, x_shape, stride, pad)


def conv2d_backward_filter(x, gy, w_shape, stride, pad):
    """The weight gradient of the convolution, or None."""
    return _convolve("conv_wgrad", x, gy, w_shape, stride, pad)


def _as_nchw(x):
    return x.reshape(x.shape + (1,) * (4 - x.ndim))


def _per_channel(v):
    """(C,) of any float dtype as a float32 (1, C, 1, 1) operand."""
    return backend.cupy.ascontiguousarray(v, dtype=STATS_DTYPE).reshape(1, -1, 1, 1)


def batch_norm_forward(x, gamma, beta, eps, running_mean, running_var, decay):
    """Training batch norm: ``(y, mean, inv_std)`` (mean and inv_std float32 (C,)), the
    running statistics updated in place with momentum ``1 - decay``; None where cuDNN does
    not support it, and for float64 data, whose statistics float32 would round."""
    if x.dtype not in FLOAT32_STATISTICS:
        return None
    cupy = backend.cupy
    (x4,) = _contiguous(_as_nchw(x))
    c = x4.shape[1]
    running = running_mean is not None and running_var is not None
    arrays = {"x": x4, "gamma": _per_channel(gamma), "beta": _per_channel(beta),
              "y": cupy.empty_like(x4), "mean": cupy.empty((1, c, 1, 1), STATS_DTYPE),
              "inv_std": cupy.empty((1, c, 1, 1), STATS_DTYPE)}
    if running:
        arrays["running_mean"] = _per_channel(running_mean)
        arrays["running_var"] = _per_channel(running_var)
        arrays["next_running_mean"] = cupy.empty((1, c, 1, 1), STATS_DTYPE)
        arrays["next_running_var"] = cupy.empty((1, c, 1, 1), STATS_DTYPE)
    if not _run("bn_train", (x4.shape,), x4.dtype, (float(eps), 1.0 - float(decay), running),
                arrays):
        return None
    if running:
        running_mean[...] = arrays["next_running_mean"].reshape(c)
        running_var[...] = arrays["next_running_var"].reshape(c)
    return arrays["y"].reshape(x.shape), arrays["mean"].reshape(c), arrays["inv_std"].reshape(c)


def batch_norm_backward(gy, x, gamma, mean, inv_std):
    """``(gx, g_gamma, g_beta)`` of training batch norm (the gradients of gamma and beta as
    float32 (C,)), or None (as for the forward)."""
    if x.dtype not in FLOAT32_STATISTICS:
        return None
    cupy = backend.cupy
    gy4, x4 = _contiguous(_as_nchw(gy), _as_nchw(x))
    c = x4.shape[1]
    arrays = {"gy": gy4, "x": x4, "gamma": _per_channel(gamma), "mean": _per_channel(mean),
              "inv_std": _per_channel(inv_std), "gx": cupy.empty_like(x4),
              "g_gamma": cupy.empty((1, c, 1, 1), STATS_DTYPE),
              "g_beta": cupy.empty((1, c, 1, 1), STATS_DTYPE)}
    if not _run("bn_backward", (x4.shape,), x4.dtype, (), arrays):
        return None
    return arrays["gx"].reshape(x.shape), arrays["g_gamma"].reshape(c), \
        arrays["g_beta"].reshape(c)


def batch_norm_inference(x, gamma, beta, mean, inv_std):
    """``gamma (x - mean) inv_std + beta`` with given statistics, or None (as for the
    training forward)."""
    if x.dtype not in FLOAT32_STATISTICS:
        return None
    cupy = backend.cupy
    (x4,) = _contiguous(_as_nchw(x))
    arrays = {"x": x4, "gamma": _per_channel(gamma), "beta": _per_channel(beta),
              "mean": _per_channel(mean), "inv_std": _per_channel(inv_std),
              "y": cupy.empty_like(x4)}
    if not _run("bn_inference", (x4.shape,), x4.dtype, (), arrays):
        return None
    return arrays["y"].reshape(x.shape)
