import os

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def interpreter_bf16_round_to_nearest_even():
    """Triton 3.7's interpreter casts fp32 -> bf16 by truncation (create_fp_trunc ->
    cast_impl -> _convert_float with no rounding mode); GPUs round to nearest even
    (cvt.rn.bf16.f32), as torch does. Patch the emulator's cast for a test module so it
    checks the kernel's math, not the emulator's rounding. Restored afterwards."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = np.ascontiguousarray(src.data, dtype=np.float32)
            bits = torch.from_numpy(data).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    try:
        yield
    finally:
        builder.cast_impl = original
