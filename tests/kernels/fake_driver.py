"""A stand-in CUDA driver for Triton, for the host side of launches on a machine without a GPU.

Kernels compile for real (sm_90, Triton's own pipeline and ptxas); "loading" a cubin gives a
function handle derived from its bytes (one per compiled variant), and "launching" records
(kernel name, grid, stream, function, arguments) in LAUNCHES instead of running anything.
Installed with ``install()`` in a process without TRITON_INTERPRET (see launch_child.py).
"""

from __future__ import annotations

import hashlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

LAUNCHES: list[tuple] = []
RECORD = True  # False: launches do nothing at all (timing the host side)
STREAM = 7


def _arg(a):
    """Arguments as comparable values: a tensor by its address and dtype."""
    return ("tensor", a.data_ptr(), str(a.dtype)) if isinstance(a, torch.Tensor) else a


class _Launcher:
    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, g0, g1, g2, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args):
        if not RECORD:
            return
        if enter_hook is not None:
            enter_hook(launch_metadata)
        LAUNCHES.append((self.name, (g0, g1, g2), stream, function, tuple(_arg(a) for a in args)))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _Utils:
    @staticmethod
    def load_binary(name, cubin, shared, device):
        function = int.from_bytes(hashlib.sha256(cubin).digest()[:6], "little")
        return 1, function, 64, 0, 1024  # module, function, registers, spills, max threads

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class FakeDriver:
    utils = _Utils()
    launcher_cls = _Launcher

    @staticmethod
    def is_active():
        return True

    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device=None):
        return STREAM

    @staticmethod
    def get_current_target():
        return GPUTarget("cuda", 90, 32)

    @staticmethod
    def get_active_torch_device():
        return torch.device("cpu")


def install() -> None:
    driver.set_active(FakeDriver())
