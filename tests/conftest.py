"""Shared test set-up.

Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, which triton reads when
a kernel is defined: set it before anything imports dsa_compile.kernels.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def _register_backend() -> None:
    """backend="dsa" by name from a source tree too (the device machine runs the tests
    with PYTHONPATH=$PWD, where the package's entry point is not installed)."""
    import torch._dynamo

    try:
        torch._dynamo.lookup_backend("dsa")
    except Exception:
        from dsa_compile.backends.dynamo import dsa_backend

        torch._dynamo.register_backend(name="dsa")(dsa_backend)


_register_backend()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
