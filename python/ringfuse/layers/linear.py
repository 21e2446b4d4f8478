"""The linear layer of the inference models: y = x W^T + b with W float, or int8 per output
channel (w8a16: weight-only; w8a8: activations quantized per token, int8 x int8 GEMM).
Weights are checked once at load (``ops.prepare_linear``,
``prepare_int8_weight_only_linear``): a decode step calls each layer with ~10 us of work.

Napkin math at decode (M = 1): a [N, K] layer reads N K weight bytes x 4 (fp32) or x 1
(int8) + N 4 scale bytes and does 2 N K flops: bandwidth-bound, so int8 is ~4x fp32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import _C, ops
from ..nn import quantize_weight
from .sharding import Shard

QUANT_MODES = ("none", "w8a16", "w8a8")


# bf16 weights: rows up to which a layer always takes ringfuse's kernel (decode); past it,
# torch's bf16 GEMM where that one has native bf16 instructions (torch_bf16_gemm_is_native),
# ringfuse's kernels elsewhere. fp32 weights take ringfuse's kernels at every M (ops.linear:
# the per-row kernel up to 16 rows, its GEMM above, ~2x torch's fp32 GEMM).
BF16_KERNEL_MAX_M = 8

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its first one with bf16 dot products
_ONEDNN_NO_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def torch_bf16_gemm_is_native() -> bool:
    """Whether torch's CPU bf16 GEMM (oneDNN) runs native bf16 dot products on this host:
    AVX-512 BF16 or AMX, unless ONEDNN_MAX_CPU_ISA holds oneDNN below them. There it beat
    ringfuse's kernels, which widen bf16 to fp32 (Zen 5 VM, 2 threads: ringfuse 0.5-0.66x
    from M = 9); without them torch's bf16 GEMM is slow (the same VM with oneDNN held to AVX2:
    ringfuse 2.5-4.6x faster at M = 9-128 on SmolLM2's layers and [4096, 4096])."""
    info = _C.build_info()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_NO_BF16
    return (info["cpu_has_avx512_bf16"] or info["cpu_has_amx"]) and not capped


def _check_quant_and_dtype(quant, dtype) -> None:
    if quant not in QUANT_MODES:
        raise ValueError(f"Linear: quant must be one of {QUANT_MODES}, got {quant!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"Linear: dtype must be a float torch.dtype, got {dtype!r}")


def _checked_blocks(blocks):
    """The weight's row blocks, each checked as it comes (they are made one at a time)."""
    width, n = None, 0
    for b in blocks:
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or not b.is_floating_point() or b.shape[0] < 1 \
                or (width is not None and b.shape[1] != width):  # fmt: skip
            got = f"shape {tuple(b.shape)} {b.dtype}" if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"Linear: weight must be a float [N, K] tensor (or its row blocks [n, K]), got {got}")
        width, n = b.shape[1], n + 1
        yield b
    if n == 0:
        raise ValueError("Linear: weight has no rows")


def has_bias(source, shards: list[Shard] | None) -> bool:
    """Whether a (fused) projection has a bias: some of its bias ``shards`` are in the
    source (all missing, or no shards, is no bias)."""
    return bool(shards) and any(source.has(s.name) for s in shards)


def read_bias(source, shards: list[Shard] | None) -> torch.Tensor | None:
    """A (fused) projection's bias from its ``shards`` (None: the layer has no bias,
    ``has_bias``). A missing one is zeros (what HF initializes it to)."""
    if not has_bias(source, shards):
        return None
    if any(s.dim != 0 or s.stop is None for s in shards):
        raise ValueError(f"read_bias: bias shards are row ranges with a stop, got {shards}")
    return torch.cat([s.read(source) if source.has(s.name) else torch.zeros(s.stop - s.start) for s in shards])


class Linear:
    """y = x W^T + b: W float [N, K] (fp32: ringfuse's kernels at every M; bf16: ringfuse's
    kernel up to BF16_KERNEL_MAX_M rows, then torch's bf16 GEMM where it is native, else
    ringfuse's kernels again), or int8 per output channel with fp32 scales (w8a16: ringfuse's
    weight-only kernels; w8a8: activations quantized per token, int8 x int8 GEMM with the
    scales in its epilogue)."""

    def __init__(self, weight, bias: torch.Tensor | None, quant: str, dtype: torch.dtype):
        """``weight``: [N, K] float, or an iterator of its row blocks, taken one at a time so
        that a large matrix (the LM head) is never whole in fp32 when it is quantized."""
        _check_quant_and_dtype(quant, dtype)
        bias = None if bias is None else bias.to(dtype if quant == "none" else torch.float32).contiguous()
        blocks = _checked_blocks([weight] if isinstance(weight, torch.Tensor) else weight)
        if quant == "none":
            parts = [b.to(dtype) for b in blocks]
            self._setup(quant, {"weight": parts[0].contiguous() if len(parts) == 1 else torch.cat(parts), "bias": bias})
        else:
            parts = [quantize_weight(b.float()) for b in blocks]  # ([rows, K] int8, [rows] fp32) each
            w_q = parts[0][0] if len(parts) == 1 else torch.cat([q for q, _ in parts])
            w_scale = parts[0][1] if len(parts) == 1 else torch.cat([s for _, s in parts])
            self._setup(quant, {"w_q": w_q, "w_scale": w_scale, "bias": bias})

    @classmethod
    def load(cls, source, weight: list[Shard], bias: list[Shard] | None, quant: str, dtype: torch.dtype) -> Linear:
        """This rank's Linear from named tensors: the ``weight`` shards stacked along the rows
        (a fused projection: q, k, v; each read and, when quantized, converted before the
        next: the LM head comes in blocks of rows), the ``bias`` shards likewise
        (``read_bias``)."""
        return cls((s.read(source) for s in weight), read_bias(source, bias), quant, dtype)

    @classmethod
    def from_parts(cls, parts: dict, quant: str, shape: tuple[int, int], key: str, dtype: torch.dtype) -> Linear:
        """A Linear from the tensors ``parts()`` gave (the converted-weights cache), checked
        against the expected [N, K]."""
        self = cls.__new__(cls)
        names = {"weight"} if quant == "none" else {"w_q", "w_scale"}
        if not names <= parts.keys():
            raise ValueError(f"{key}: missing {sorted(names - parts.keys())}")
        main = parts["weight" if quant == "none" else "w_q"]
        if tuple(main.shape) != shape or (quant != "none" and tuple(parts["w_scale"].shape) != shape[:1]):
            raise ValueError(f"{key}: shape {tuple(main.shape)}, expected {shape}")
        if parts.get("bias") is not None and tuple(parts["bias"].shape) != shape[:1]:
            raise ValueError(f"{key}: bias shape {tuple(parts['bias'].shape)}, expected {shape[:1]}")
        want = {"weight": dtype, "bias": dtype} if quant == "none" else \
            {"w_q": torch.int8, "w_scale": torch.float32, "bias": torch.float32}  # fmt: skip
        bad = [k for k, v in parts.items() if v is not None and v.dtype != want.get(k, v.dtype)]
        if bad or not parts.keys() <= want.keys():
            raise ValueError(f"{key}: unexpected tensors or dtypes {[(k, parts[k].dtype) for k in parts]}")
        self._setup(quant, {"bias": None, **parts})
        return self

    def _setup(self, quant: str, parts: dict) -> None:
        self.quant, self.bias = quant, parts["bias"]
        if quant == "none":
            self.weight = parts["weight"]  # [N, K]
            self.out_features, self.in_features = self.weight.shape
            self._kernel = ops.prepare_linear(self.weight, self.bias)  # weights checked once
            # rows past which torch's GEMM takes over (None: never), decided at load
            bf16_torch = self.weight.dtype == torch.bfloat16 and torch_bf16_gemm_is_native()
            self._kernel_max_m = BF16_KERNEL_MAX_M if bf16_torch else None
            return
        self.w_q, self.w_scale = parts["w_q"], parts["w_scale"]  # [N, K] int8, [N] fp32
        self.out_features, self.in_features = self.w_q.shape
        if quant == "w8a16":
            self._w8a16 = ops.prepare_int8_weight_only_linear(self.w_q, self.w_scale, self.bias)
        else:  # checked once and, on the CPU, packed into the GEMM's layout (CUDA reads w_q as it is)
            self._w8a8 = ops.prepare_int8_linear(self.w_q, self.w_scale, self.bias)

    def parts(self) -> dict[str, torch.Tensor]:
        """The converted tensors, as ``from_parts`` takes them back."""
        out = {"weight": self.weight} if self.quant == "none" else {"w_q": self.w_q, "w_scale": self.w_scale}
        return out if self.bias is None else {**out, "bias": self.bias}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.quant == "none":
            # ringfuse's kernels (decode-sized M: the bandwidth-bound one, where MKL streams
            # the weights at a third of the DRAM bandwidth on AMD hosts; prefill: its GEMM);
            # bf16 past BF16_KERNEL_MAX_M rows where torch's bf16 GEMM is native: torch's
            if x.is_cpu and (self._kernel_max_m is None or x.shape[0] <= self._kernel_max_m):
                return self._kernel(x)
            return F.linear(x, self.weight, self.bias)
        if self.quant == "w8a16":
            return self._w8a16(x)
        return self._w8a8(x)
