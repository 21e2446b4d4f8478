"""Value checks on the GPU without a host sync.

The index tensors of the attention and KV-cache kernels (seq_lens, block tables, slot
mappings, positions, cu_seqlens) live on the device. Checking their values on the host
would read them back, a sync per call that also breaks CUDA-graph capture. Instead each
kernel checks the values it uses (the paged decode and the varlen prefill in a small
kernel launched before theirs, which keeps the big kernels' registers as they were). On a value out of range it does not read or write
through it, and it raises its check in a per-device flag:

- seq_lens outside [0, the cache's capacity]: that sequence's output row is zeros;
- a block id outside [0, num_blocks) among those a sequence reads: that row is zeros;
- a slot outside [-1, num_slots): that token's K/V rows are not written;
- a position outside [0, max_positions): that token's heads are left unrotated;
- cu_seqlens that do not start at 0, decrease, leave the packed tensors, or hold a run
  longer than the grid that max_seqlen_q sized: that sequence's rows are not written;
- and one value check on data: a row with inf or NaN given to quantize_per_token gets
  scale NaN and int8 zeros.

``ringfuse.ops.check_device_errors()`` reads the flags (the sync it costs is the caller's
choice: once per decode step, next to the copy of the sampled tokens), clears them and
raises ``ringfuse.ops.DeviceValueError`` naming what went wrong. Under
``RINGFUSE_SYNC_CHECKS=1`` every op checks right after its launch (a sync per op, for
debugging). Under the Triton interpreter the flag is a CPU tensor like the data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# what went wrong: a bit of take()'s result, and the flag slot kernels write (bit 1 << slot)
SEQ_LENS = 1
BLOCK_TABLE = 2
SLOT_MAPPING = 4
POSITIONS = 8
CU_SEQLENS = 16
NONFINITE = 32
SLOTS = 6

WHAT = {
    SEQ_LENS: "seq_lens outside [0, the cache's capacity] (those rows are zeros)",
    BLOCK_TABLE: "a block_table entry outside [0, num_blocks) among the blocks a sequence reads (that row is "
                 "zeros)",
    SLOT_MAPPING: "a slot_mapping value outside [-1, num_slots) (that token's K/V rows were not written)",
    POSITIONS: "a position outside [0, max_positions) of the cos/sin cache (that token was not rotated)",
    CU_SEQLENS: "cu_seqlens that do not start at 0, decrease, exceed the packed length or hold a run longer "
                "than max_seqlen_q (that sequence's rows were not written)",
    NONFINITE: "inf or NaN in a row given to quantize_per_token (int8 cannot represent it: that row's scale "
               "is NaN and its int8 values 0)",
}  # fmt: skip

_flags: dict[torch.device, torch.Tensor] = {}


def _normalized(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def flag(device: torch.device) -> torch.Tensor:
    """The error flag of ``device``: int32 [SLOTS], one slot per check (slot i set: bit
    1 << i), made (zeroed) at first use and kept for the life of the process, so a CUDA
    graph that captured its address can always write it. Make it before a capture:
    ``flag(device)`` costs a memset once. Kernels store 1 into their slot (a plain store:
    an atomic OR would order the kernel's memory accesses around it, and racing stores of
    the same value are harmless)."""
    device = _normalized(device)
    f = _flags.get(device)
    if f is None:
        f = _flags[device] = torch.zeros(SLOTS, dtype=torch.int32, device=device)
    return f


def take(device=None) -> int:
    """The bits raised on ``device`` (every device with a flag if None) since the last
    take, then clears them. Reads device memory: a sync."""
    bits = 0
    device = None if device is None else _normalized(device)
    for dev, f in list(_flags.items()):
        if device is None or dev == device:
            raised = f.tolist()
            if any(raised):
                f.zero_()
                bits |= sum(1 << i for i, r in enumerate(raised) if r)
    return bits


def describe(bits: int) -> list[str]:
    return [text for bit, text in WHAT.items() if bits & bit]


def slot(bit: int) -> tl.constexpr:
    """The flag slot of ``bit``, as the constant a kernel passes to raise_if."""
    return tl.constexpr(bit.bit_length() - 1)


@triton.jit
def raise_if(flag_ptr, slot: tl.constexpr, cond):
    """Raise the check of flag slot ``slot`` where ``cond`` holds (a scalar, or a vector of
    any shape: every lane where it holds stores the same 1)."""
    tl.store(flag_ptr + slot + cond.to(tl.int32) * 0, 1, mask=cond)
