"""Backends for the tests: the ``xp`` fixture and the ``gpu`` marker.

``xp`` runs a test once with NumPy and once with CuPy; the CuPy run carries the ``gpu``
marker.  Every test marked ``gpu`` (through ``xp`` or directly) is skipped, with the reason,
where CuPy or a CUDA device is missing, so the CPU suite collects them and stays green.
"""
import numpy
import pytest

from kfac_mn import backend


def _gpu_skip_reason():
    if not backend.cupy_available:
        return "needs CuPy (not installed)"
    if not backend.gpu_available():
        return "needs a CUDA device (none visible to CuPy)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array module under test: ``numpy``, then ``cupy`` (marked ``gpu``)."""
    return numpy if request.param == "numpy" else backend.cupy
