"""The cuDNN path's logic, checked without a GPU: graph keys and the cache, the selection in
``backend`` and its messages, the graphs' definitions (against cuDNN Frontend's real API where
it is installed, and against a recording stand-in everywhere), the variant pack, and the
fallback where cuDNN has no engine.  tests/test_gpu_cudnn.py runs the graphs on a GPU."""
import functools
import importlib
import logging
import types

import numpy as np
import pytest

from kfac_mn import Variable, backend, cudnn_graphs
from kfac_mn.function_hook import FunctionHook
from kfac_mn.functions.convolution_2d import Convolution2DFunction
from kfac_mn.functions.patches import output_hw


class RecordConvolutions(FunctionHook):
    name = "RecordConvolutions"

    def __init__(self):
        self.seen = []

    def forward_postprocess(self, function, in_data):
        if isinstance(function, Convolution2DFunction):
            self.seen.append((in_data[0].shape, in_data[1].shape, function.stride, function.pad))


@functools.lru_cache(maxsize=None)
def resnet50_geometries(batch=1, size=224):
    """Every distinct (x shape, W shape, stride, pad) of ResNet-50's convolutions, and the
    shape of every batch-norm input, from one forward pass."""
    from models.resnet_imagenet import resnet50

    np.random.seed(0)
    model = resnet50(n_class=10)
    recorder = RecordConvolutions()
    with recorder:
        model(Variable(np.zeros((batch, 3, size, size), np.float32)))
    convolutions = sorted(set(recorder.seen))
    norms = sorted({(x[0], w[0]) + tuple(output_hw(x[2:], w[2:], s, p))
                    for x, w, s, p in convolutions})
    return convolutions, norms


def conv_keys(x_shape, w_shape, stride, pad, dtype="float32"):
    y_shape = cudnn_graphs.conv_output_shape(x_shape, w_shape, stride, pad)
    attrs = (tuple(stride), tuple(pad))
    return [cudnn_graphs.graph_key("conv_fprop", (x_shape, w_shape, y_shape), dtype, attrs, 0),
            cudnn_graphs.graph_key("conv_dgrad", (y_shape, w_shape, x_shape), dtype, attrs, 0),
            cudnn_graphs.graph_key("conv_wgrad", (x_shape, y_shape, w_shape), dtype, attrs, 0)]


def bn_keys(x_shape, dtype="float32"):
    return [cudnn_graphs.graph_key("bn_train", (x_shape,), dtype, (2e-5, 0.1, True), 0),
            cudnn_graphs.graph_key("bn_train", (x_shape,), dtype, (2e-5, 0.1, False), 0),
            cudnn_graphs.graph_key("bn_backward", (x_shape,), dtype, (), 0),
            cudnn_graphs.graph_key("bn_inference", (x_shape,), dtype, (), 0)]


# -- keys, cache, geometry --------------------------------------------------------------------
def test_a_key_names_everything_that_shapes_the_graph():
    key = cudnn_graphs.graph_key("conv_fprop", [(2, 3, 8, 8), (4, 3, 3, 3), (2, 4, 8, 8)],
                                 np.float32, ((1, 1), (1, 1)), 0)
    assert key == cudnn_graphs.graph_key("conv_fprop", ((2, 3, 8, 8), [4, 3, 3, 3], (2, 4, 8, 8)),
                                         "float32", ((1, 1), (1, 1)), 0)
    others = [key._replace(shapes=((3, 3, 8, 8), (4, 3, 3, 3), (3, 4, 8, 8))),
              key._replace(attrs=((2, 2), (1, 1))), key._replace(attrs=((1, 1), (0, 0))),
              key._replace(dtype=np.dtype(np.float16).str), key._replace(device=1),
              key._replace(op="conv_wgrad")]
    assert len({key, *others}) == 1 + len(others)
    hash(key)
    with pytest.raises(ValueError, match="unknown operation 'conv'"):
        cudnn_graphs.graph_key("conv", [], "float32", (), 0)


def test_the_cache_builds_each_graph_once_and_remembers_what_cudnn_cannot_run(caplog):
    built = []

    def builder(key):
        built.append(key)
        if key.dtype == np.dtype(np.float64).str:
            raise cudnn_graphs.Unsupported("no engine")
        return f"graph {len(built)}"

    cache = cudnn_graphs.GraphCache(builder)
    first, second = conv_keys((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1))[:2]
    assert cache.get(first) == "graph 1" and cache.get(first) == "graph 1"
    assert cache.get(second) == "graph 2"
    unsupported = first._replace(dtype=np.dtype(np.float64).str)
    with caplog.at_level(logging.WARNING, logger="kfac_mn.cudnn_graphs"):
        assert cache.get(unsupported) is None and cache.get(unsupported) is None
    assert built == [first, second, unsupported]
    assert (cache.builds, cache.hits, len(cache)) == (3, 2, 3)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "conv_fprop" in warnings[0] and "no engine" in warnings[0]
    assert "im2col" in warnings[0]


def test_output_shapes_and_strides_match_the_im2col_path():
    convolutions, _ = resnet50_geometries()
    assert len(convolutions) >= 20  # ResNet-50 has a few dozen distinct convolutions
    for x_shape, w_shape, stride, pad in convolutions:
        y = cudnn_graphs.conv_output_shape(x_shape, w_shape, stride, pad)
        assert y[2:] == output_hw(x_shape[2:], w_shape[2:], stride, pad)
    a = np.empty((2, 3, 5, 7), np.float32)
    assert cudnn_graphs.contiguous_strides(a.shape) == [s // 4 for s in a.strides]
    assert cudnn_graphs.contiguous_strides((0, 3)) == [3, 1]


# -- selection ---------------------------------------------------------------------------------
@pytest.fixture
def restore_backend(monkeypatch):
    monkeypatch.setattr(backend, "_conv_backend", "im2col")
    monkeypatch.setattr(backend, "_cudnn_frontend", None)
    return monkeypatch


def test_selection_names_what_is_missing(restore_backend):
    monkeypatch = restore_backend
    with pytest.raises(ValueError, match="im2col, cudnn, not 'cudnnn'"):
        backend.set_conv_backend("cudnnn")
    monkeypatch.setattr(backend, "cupy_available", False)
    with pytest.raises(backend.CudnnUnavailable, match=r"CuPy.*kfac_mn\[gpu\]"):
        backend.set_conv_backend("cudnn")
    monkeypatch.setattr(backend, "cupy_available", True)
    real_import = importlib.import_module

    def import_without(name, *args):
        if name == "cudnn":
            raise ImportError("No module named 'cudnn'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_without)
    with pytest.raises(backend.CudnnUnavailable, match="pip install nvidia-cudnn-frontend"):
        backend.set_conv_backend("cudnn")

    def broken_library():
        raise RuntimeError("Unable to find symbol cudnnGetVersion")

    frontend = types.SimpleNamespace(pygraph=object, backend_version=broken_library)
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: frontend if name == "cudnn" else real_import(name, *a))
    with pytest.raises(backend.CudnnUnavailable,
                       match="cudnnGetVersion.*nvidia-cudnn-cu12.*nvidia-cudnn-cu13"):
        backend.set_conv_backend("cudnn")
    assert backend.conv_backend() == "im2col"  # a failed choice leaves the old one
    frontend.backend_version = lambda: 92400
    backend.set_conv_backend("cudnn")
    assert backend.conv_backend() == "cudnn" and backend.load_cudnn_frontend() is frontend


def test_numpy_arrays_keep_the_im2col_path_whatever_is_chosen(restore_backend):
    restore_backend.setattr(backend, "_conv_backend", "cudnn")
    assert not backend.uses_cudnn(np)
    from kfac_mn import functions as F

    rng = np.random.default_rng(0)
    x = Variable(rng.standard_normal((2, 3, 6, 6)))
    W = Variable(rng.standard_normal((4, 3, 3, 3)))
    y = F.convolution_2d(x, W, pad=1)
    y.grad = np.ones_like(y.data)
    y.backward()
    assert W.grad.shape == W.shape and x.grad.shape == x.shape  # no cuDNN was asked


# -- definitions -------------------------------------------------------------------------------
class Recorded:
    """A stand-in for cuDNN Frontend's tensors and graphs that records what is asked."""

    def __init__(self, graph, kind, **attributes):
        self.graph, self.kind, self.attributes = graph, kind, attributes
        self.dim = attributes.get("dim")
        self.stride = attributes.get("stride")
        self.output = False

    def set_output(self, value):
        self.output = value
        return self

    def set_dim(self, dim):
        self.dim = dim
        return self

    def set_stride(self, stride):
        self.stride = stride
        return self

    def set_data_type(self, data_type):
        self.attributes["data_type"] = data_type
        return self


class RecordingGraph:
    steps = ("validate", "build_operation_graph", "create_execution_plans", "check_support",
             "build_plans")

    def __init__(self, frontend, **options):
        self.frontend, self.options, self.calls, self.executed = frontend, options, [], []
        for step in self.steps:
            setattr(self, step, functools.partial(self._step, step))

    def _step(self, name, *args):
        self.calls.append(name)
        if name == self.frontend.unsupported_at:
            raise self.frontend.cudnnGraphNotSupportedError("no engine for this graph")

    def tensor(self, **attributes):
        return Recorded(self, "tensor", **attributes)

    def _node(self, kind, outputs, **inputs):
        self.calls.append(kind)
        made = [Recorded(self, f"{kind}:{i}", **inputs) for i in range(outputs)]
        return made[0] if outputs == 1 else made

    def conv_fprop(self, **inputs):
        return self._node("conv_fprop", 1, **inputs)

    def conv_dgrad(self, **inputs):
        return self._node("conv_dgrad", 1, **inputs)

    def conv_wgrad(self, **inputs):
        return self._node("conv_wgrad", 1, **inputs)

    def batchnorm(self, **inputs):
        return self._node("batchnorm", 5 if "in_running_mean" in inputs else 3, **inputs)

    def batchnorm_backward(self, **inputs):
        return self._node("batchnorm_backward", 3, **inputs)

    def batchnorm_inference(self, **inputs):
        return self._node("batchnorm_inference", 1, **inputs)

    def get_workspace_size(self):
        return 0

    def execute(self, pack, workspace, handle=None):
        self.executed.append((pack, workspace, handle))


def recording_frontend(unsupported_at=None):
    frontend = types.SimpleNamespace(
        data_type=types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF", DOUBLE="DOUBLE"),
        heur_mode=types.SimpleNamespace(A="A", FALLBACK="FALLBACK"),
        cudnnGraphNotSupportedError=type("cudnnGraphNotSupportedError", (Exception,), {}),
        unsupported_at=unsupported_at)
    frontend.pygraph = functools.partial(RecordingGraph, frontend)
    return frontend


def test_convolution_graphs_are_defined_as_the_function_computes_them():
    builder = cudnn_graphs.GraphBuilder(recording_frontend(), handle="handle")
    x_shape, w_shape, stride, pad = (2, 64, 56, 56), (128, 64, 3, 3), (2, 2), (1, 1)
    fprop, dgrad, wgrad = (builder(key) for key in conv_keys(x_shape, w_shape, stride, pad))
    y_shape = [2, 128, 28, 28]
    for compiled, inputs, output, shape in ((fprop, ("x", "w"), "y", y_shape),
                                            (dgrad, ("gy", "w"), "gx", list(x_shape)),
                                            (wgrad, ("x", "gy"), "gw", list(w_shape))):
        graph = compiled.graph
        assert graph.options == {"io_data_type": "FLOAT", "intermediate_data_type": "FLOAT",
                                 "compute_data_type": "FLOAT", "handle": "handle"}
        assert graph.calls[1:] == list(RecordingGraph.steps)
        node = compiled.tensors[output]
        assert node.output and node.dim == shape
        assert node.stride == cudnn_graphs.contiguous_strides(shape)
        assert node.attributes["padding"] == [1, 1] and node.attributes["stride"] == [2, 2]
        assert node.attributes["dilation"] == [1, 1]
        operands = [value for value in node.attributes.values() if isinstance(value, Recorded)]
        assert operands == [compiled.tensors[name] for name in inputs]
    assert compiled.tensors["x"].dim == list(x_shape)
    assert compiled.tensors["gy"].dim == y_shape
    assert compiled.tensors["gy"].attributes["data_type"] == "FLOAT"


def test_batch_norm_graphs_and_their_host_values():
    builder = cudnn_graphs.GraphBuilder(recording_frontend(), handle=None)
    train, without_running, backward, inference = (builder(key) for key in
                                                   bn_keys((4, 16, 7, 7), "float16"))
    assert train.graph.options["io_data_type"] == "HALF"
    assert set(train.tensors) == {"x", "gamma", "beta", "eps", "momentum", "running_mean",
                                  "running_var", "y", "mean", "inv_std", "next_running_mean",
                                  "next_running_var"}
    assert "running_mean" not in without_running.tensors
    assert train.tensors["eps"].attributes["is_pass_by_value"]
    assert float(train.host_values["eps"][0, 0, 0, 0]) == pytest.approx(2e-5)
    assert float(train.host_values["momentum"][0, 0, 0, 0]) == pytest.approx(0.1)
    assert train.tensors["gamma"].dim == [1, 16, 1, 1]
    assert train.tensors["gamma"].attributes["data_type"] == "FLOAT"  # statistics in float32
    assert train.tensors["y"].attributes["data_type"] == "HALF"
    assert set(backward.tensors) == {"gy", "x", "gamma", "mean", "inv_std", "gx", "g_gamma",
                                     "g_beta"}
    assert backward.tensors["gx"].attributes["grad"] is backward.tensors["gy"]
    assert set(inference.tensors) == {"x", "gamma", "beta", "mean", "inv_std", "y"}


def test_cudnn_without_an_engine_becomes_unsupported():
    builder = cudnn_graphs.GraphBuilder(recording_frontend("check_support"), handle=None)
    key = conv_keys((2, 3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1))[0]
    with pytest.raises(cudnn_graphs.Unsupported, match="no engine"):
        builder(key)
    assert cudnn_graphs.GraphCache(builder).get(key) is None
    with pytest.raises(cudnn_graphs.Unsupported, match="int32"):
        builder(key._replace(dtype=np.dtype(np.int32).str))


def test_the_variant_pack_binds_every_operand_to_its_array():
    compiled = cudnn_graphs.GraphBuilder(recording_frontend(), None)(
        bn_keys((4, 16, 7, 7))[0])
    arrays = {name: types.SimpleNamespace(data=types.SimpleNamespace(ptr=1000 + i))
              for i, name in enumerate(sorted(set(compiled.tensors) - {"eps", "momentum"}))}
    pack = compiled.variant_pack(arrays)
    assert {pack[compiled.tensors[name]] for name in arrays} == \
        {array.data.ptr for array in arrays.values()}
    assert pack[compiled.tensors["eps"]] == compiled.host_values["eps"].ctypes.data
    del arrays["next_running_var"], arrays["x"]
    with pytest.raises(ValueError, match="no array for next_running_var, x"):
        compiled.variant_pack(arrays)


@pytest.mark.parametrize("what", ["convolutions", "batch norms"])
def test_every_resnet50_graph_is_accepted_by_cudnn_frontend(what):
    """Against the real cuDNN Frontend (defining a graph needs no GPU): the keyword names and
    shapes that the recording stand-in above cannot vouch for."""
    frontend = pytest.importorskip("cudnn", reason="cuDNN Frontend is not installed "
                                   "(pip install nvidia-cudnn-frontend)")
    if not hasattr(frontend, "pygraph"):
        pytest.skip("the module 'cudnn' is not cuDNN Frontend")
    builder = cudnn_graphs.GraphBuilder(frontend, None)
    convolutions, norms = resnet50_geometries()
    keys = [key for geometry in convolutions for key in conv_keys(*geometry)] \
        if what == "convolutions" else [key for shape in norms for key in bn_keys(shape)]
    for key in keys:
        _, tensors, _ = builder.define(key)
        for name, tensor in tensors.items():
            assert list(tensor.get_dim()), (key, name)
