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
