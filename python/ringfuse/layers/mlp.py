"""The gated MLP of Llama-family blocks: down(act(gate(x)) * up(x)), gate and up in one GEMM.

SwiGLU (act = SiLU: Llama, Mistral, Qwen) runs ringfuse's fused ``silu_mul``, GeGLU (act =
GELU, tanh approximation: Gemma 2) its ``gelu_tanh_mul``: one pass over gate_up's output.

Napkin math at decode (M = 1, hidden H, FFN F): gate_up reads 2 F H weights, down F H;
the activation touches 3 F elements, ~1% of the bytes.
"""

from __future__ import annotations

import torch

from .. import ops
from .linear import Linear
from .sharding import Shard, column_parallel_shards

ACTIVATIONS = ("silu", "gelu_tanh")


class GatedMLP:
    """``gate_up``: [2 F, H] (this rank's gate rows, then its up rows); ``down``: [H, F]. Under
    tensor parallelism the output is this rank's partial sum (the caller all-reduces)."""

    def __init__(self, gate_up: Linear, down: Linear, activation: str = "silu"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.gate_up, self.down, self.activation = gate_up, down, activation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        gate_up = self.gate_up(x)  # [T, 2 F]
        act = ops.silu_mul(gate_up) if self.activation == "silu" else ops.gelu_tanh_mul(gate_up)  # [T, F]
        return self.down(act)


# Shard specs of the gated MLP (HF names under ``prefix``, e.g. "model.layers.3.mlp."):
# this rank's FFN columns [f0, f1) (``sharding.even_range``).


def gate_up_shards(prefix: str, ffn: tuple[int, int], biased: bool) -> tuple[list[Shard], list[Shard] | None]:
    """gate_up [2 F / tp, hidden]: this rank's gate rows, then its up rows (column-parallel)."""
    return column_parallel_shards([(f"{prefix}gate_proj", *ffn), (f"{prefix}up_proj", *ffn)], biased)


def down_shards(prefix: str, ffn: tuple[int, int], hidden: int, bias_here: bool
                ) -> tuple[list[Shard], list[Shard] | None]:  # fmt: skip
    """down [hidden, F / tp]: this rank's FFN columns (row-parallel; the bias on one rank)."""
    return [Shard(f"{prefix}down_proj.weight", 1, *ffn)], [Shard(f"{prefix}down_proj.bias", 0, 0, hidden)] \
        if bias_here else None  # fmt: skip
