# Without a GPU, Triton kernels run on CPU tensors under the interpreter: the flag must be
# set before triton is imported anywhere (torch itself does not import it). On a GPU box the
# real kernels run instead (the interpreter-only tests skip themselves); set
# TRITON_INTERPRET explicitly to override either way.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clear_device_error_flags():
    """Each test starts with the kernels' index-check flags clear (kernels/device_errors.py):
    a test that feeds a kernel bad values on purpose without reading the flag must not fail
    a later test that reads it (the GPU runner reads it after every step)."""
    import sys

    flags = sys.modules.get("ringfuse.kernels.device_errors")  # not imported: no kernel ran
    if flags is not None:
        flags.take()
    yield
