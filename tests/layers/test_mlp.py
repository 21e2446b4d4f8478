"""ringfuse.layers.GatedMLP against the gated MLP written out in fp64 torch math
(down(act(gate x) * up x), gate and up as HF keeps them, separately): SwiGLU and GeGLU,
float and int8 weights, a prefill's rows and a decode row; a bad activation is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ringfuse.layers import GatedMLP, Linear

HIDDEN, FFN = 64, 96


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(FFN, HIDDEN, generator=g) / 8 for _ in range(2))
    down = torch.randn(HIDDEN, FFN, generator=g) / 10
    return gate, up, down


def _reference(x, gate, up, down, activation):  # fp64
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    g = x @ gate.T
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    return (act * (x @ up.T)) @ down.T


def _mlp(gate, up, down, activation, quant="none"):
    return GatedMLP(Linear(torch.cat([gate, up]), None, quant, torch.float32), Linear(down, None, quant, torch.float32),
                    activation)  # fmt: skip


@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_float_weights_match_the_reference(activation, rows):
    """fp32 weights: within 2x torch's own fp32 error of the fp64 result (plus a floor of a
    few ulps of the output's scale for rows where torch happens to be exact)."""
    gate, up, down = _weights()
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    want = _reference(x, gate, up, down, activation)
    got = _mlp(gate, up, down, activation)(x)
    assert got.shape == (rows, HIDDEN) and got.dtype == torch.float32
    g = x @ gate.T  # torch's own fp32 computation, for the error budget
    act = F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")
    torch_err = ((act * (x @ up.T)) @ down.T - want).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2 * torch_err + floor


@pytest.mark.parametrize("quant", ["w8a16", "w8a8"])
def test_int8_weights_match_the_dequantized_reference(quant):
    """int8 per output channel: close to the MLP of the dequantized weights (w8a8 also
    quantizes the activations per token, within a few int8 steps of them)."""
    gate, up, down = _weights(1)
    mlp = _mlp(gate, up, down, "silu", quant)
    deq = lambda lin: lin.w_q.double() * lin.w_scale.double()[:, None]  # noqa: E731
    gate_up = deq(mlp.gate_up)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    want = _reference(x, gate_up[:FFN], gate_up[FFN:], deq(mlp.down), "silu")
    got = mlp(x).double()
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < (1e-5 if quant == "w8a16" else 0.03), rel
    # and far from an MLP that dropped a part: the test can tell a wrong wiring
    swapped = _reference(x, gate_up[FFN:], gate_up[:FFN], deq(mlp.down), "silu")
    assert (got - swapped).abs().max() / want.abs().max() > 0.1


def test_activation_is_checked():
    gate, up, down = _weights()
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'gelu_tanh'\), got 'relu'"):
        _mlp(gate, up, down, "relu")


def test_gate_rows_come_first():
    """gate_up holds the gate rows, then the up rows: swapping them changes the result (the
    activation applies to the first half only)."""
    gate, up, down = _weights(3)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(4))
    ours = _mlp(gate, up, down, "silu")(x).double()
    assert torch.allclose(ours, _reference(x, gate, up, down, "silu"), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ours, _reference(x, up, gate, down, "silu"), rtol=1e-2, atol=1e-3)
    assert math.isfinite(ours.abs().max().item())
