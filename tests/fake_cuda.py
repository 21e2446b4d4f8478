"""CPU tensors that take the ops' CUDA branches, for testing those branches without a GPU.

``as_cuda(t)`` views t as a ``FakeCuda`` tensor: ``is_cuda`` is True and ``is_cpu`` False, so
ringfuse.ops picks its CUDA path (Triton launchers, no host syncs); everything else, the
device and the memory included, stays the CPU's. Under the Triton interpreter
(TRITON_INTERPRET=1, as tests/conftest.py sets it) the Triton kernels then run on that CPU
memory. What this checks is the ops' Python on the CUDA side (dispatch, fast paths,
unchecked launchers, plans) and the kernels' results; device placement, streams and real
launches need a GPU (the gpu-marked tests). torch functions given a FakeCuda tensor return
plain tensors (its __torch_function__ is disabled), as a new output of an op is.
"""

from __future__ import annotations

import os

import pytest
import torch

interp_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs Triton kernels under the interpreter (TRITON_INTERPRET=1)"
)


class FakeCuda(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def is_cpu(self) -> bool:
        return False


def as_cuda(t: torch.Tensor) -> FakeCuda:
    return t.as_subclass(FakeCuda)
