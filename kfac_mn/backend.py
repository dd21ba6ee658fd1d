"""The one place that chooses between NumPy (CPU) and CuPy (GPU).

Every other module asks ``xp = get_array_module(x)`` and writes code that works
for both.  CuPy is optional: the library imports and runs without it.
"""
import importlib

import numpy

try:
    import cupy
    import cupyx

    cupy_available = True
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None
    cupyx = None
    cupy_available = False


def gpu_available():
    """True when CuPy is importable and at least one CUDA device is visible."""
    if not cupy_available:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDA driver missing or broken
        return False


def load_nccl():
    """CuPy's NCCL binding (``cupy.cuda.nccl``), or None when CuPy or its NCCL is missing."""
    if not cupy_available:
        return None
    try:
        nccl = importlib.import_module("cupy.cuda.nccl")
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return nccl if getattr(nccl, "available", False) else None


class CudnnUnavailable(RuntimeError):
    """``conv_backend('cudnn')`` was asked for where cuDNN Frontend or cuDNN is missing."""


#: how the GPU computes convolutions and batch normalization: 'im2col' (im2col + cuBLAS GEMM
#: and this package's CUDA kernels, the default) or 'cudnn' (cuDNN Frontend graphs,
#: :mod:`kfac_mn.cudnn_graphs`).  NumPy arrays always take the im2col code.
CONV_BACKENDS = ("im2col", "cudnn")
_conv_backend = "im2col"
_cudnn_frontend = None


def load_cudnn_frontend():
    """cuDNN Frontend's Python module (``cudnn``) with the cuDNN library loaded, or
    :class:`CudnnUnavailable` saying what to install."""
    global _cudnn_frontend
    if _cudnn_frontend is not None:
        return _cudnn_frontend
    if not cupy_available:
        raise CudnnUnavailable("CuPy, and CuPy is not installed (pip install 'kfac_mn[gpu]')")
    try:
        frontend = importlib.import_module("cudnn")
    except ImportError as error:
        raise CudnnUnavailable(
            f"cuDNN Frontend, which does not import ({error}): pip install "
            "nvidia-cudnn-frontend (or 'kfac_mn[gpu]')") from None
    if not hasattr(frontend, "pygraph"):
        raise CudnnUnavailable(
            f"cuDNN Frontend's graph API, but the module 'cudnn' at "
            f"{getattr(frontend, '__file__', '?')} has no pygraph: pip install "
            "nvidia-cudnn-frontend")
    try:
        frontend.backend_version()
    except Exception as error:  # the library itself is missing or does not load
        raise CudnnUnavailable(
            f"the cuDNN library, which cuDNN Frontend cannot load ({error}): pip install "
            "nvidia-cudnn-cu12 (CUDA 12) or nvidia-cudnn-cu13 (CUDA 13); PyTorch's CUDA "
            "wheels bring one too") from None
    _cudnn_frontend = frontend
    return frontend


def set_conv_backend(name):
    """Choose :data:`CONV_BACKENDS` ``name`` for every later convolution and batch
    normalization on CuPy arrays; 'cudnn' checks first that cuDNN Frontend loads."""
    global _conv_backend
    if name not in CONV_BACKENDS:
        raise ValueError(f"conv backend must be one of {', '.join(CONV_BACKENDS)}, not {name!r}")
    if name == "cudnn":
        load_cudnn_frontend()
    _conv_backend = name


def conv_backend():
    return _conv_backend


def uses_cudnn(xp):
    """Do convolutions and batch normalization of ``xp`` arrays run on cuDNN graphs?"""
    return xp is not numpy and _conv_backend == "cudnn"


def _raw(x):
    # Variables carry their array in ``.data``; avoid importing Variable here.
    return getattr(x, "data", x) if hasattr(x, "creator") else x


def get_array_module(*args):
    """Return ``cupy`` if any argument lives on the GPU, else ``numpy``."""
    if cupy_available:
        for x in args:
            if isinstance(_raw(x), cupy.ndarray):
                return cupy
    return numpy


def is_gpu_array(x):
    return cupy_available and isinstance(_raw(x), cupy.ndarray)


def to_cpu(x):
    """Copy an array (or a Variable's array) to host memory as a NumPy array."""
    x = _raw(x)
    if x is None:
        return None
    if is_gpu_array(x):
        return x.get()
    return numpy.asarray(x)


def to_gpu(x, device=None):
    """Copy an array to the current (or the given) CUDA device as a CuPy array."""
    if not cupy_available:
        raise RuntimeError(
            "to_gpu needs CuPy; install a CUDA build of it "
            "(pip install 'kfac_mn[gpu]' or cupy-cudaXXx)")
    x = _raw(x)
    if x is None:
        return None
    if device is None:
        return cupy.asarray(x)
    with cupy.cuda.Device(device):
        return cupy.asarray(x)


def synchronize(*arrays):
    """Wait for the work queued on the current CUDA stream; a no-op on the CPU.

    With arrays, wait only when one of them lives on the GPU (cheap on the CPU path); with
    none, wait whenever a GPU is in use.  The one synchronisation of the library: timers call
    it at both ends of what they time, so asynchronous kernels are charged where launched.
    """
    on_gpu = any(is_gpu_array(a) for a in arrays if a is not None) if arrays else \
        gpu_available()
    if on_gpu:
        cupy.cuda.get_current_stream().synchronize()
