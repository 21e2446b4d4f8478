"""Drop-in modules: same constructor, parameters and state_dict as torch's; same outputs."""

import pytest
import torch

import ringfuse.nn as rnn

from ..ops.norm_reference import assert_within_tolerance


def test_rms_norm_is_a_drop_in_for_torch():
    ref = torch.nn.RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours = rnn.RMSNorm(96, eps=1e-5)
    assert isinstance(ours, torch.nn.RMSNorm)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 96)
    x64 = x.double()
    ref64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * ref.weight.double()
    assert_within_tolerance(ours(x), ref64, ref(x))


def test_rms_norm_default_eps_and_no_affine():
    ours, ref = rnn.RMSNorm(40, elementwise_affine=False), torch.nn.RMSNorm(40, elementwise_affine=False)
    assert ours.weight is None and list(ours.state_dict()) == []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        # small activations, where eps shows: eps=None is the compute type's epsilon (fp32's for
        # 16-bit x), as torch's kernel takes it; finfo(bf16).eps was 1.6 off here
        x = 0.05 * torch.randn(3, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
        torch.testing.assert_close(ours(x), ref(x))


def test_multi_dim_normalized_shape():
    x = torch.randn(4, 3, 5, 6)
    ln_ref, ln = torch.nn.LayerNorm((5, 6)), rnn.LayerNorm((5, 6))
    with torch.no_grad():
        ln_ref.weight.normal_()
        ln_ref.bias.normal_()
    ln.load_state_dict(ln_ref.state_dict())
    torch.testing.assert_close(ln(x), ln_ref(x), rtol=1e-5, atol=1e-5)
    rn_ref, rn = torch.nn.RMSNorm((5, 6)), rnn.RMSNorm((5, 6))
    torch.testing.assert_close(rn(x), rn_ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="trailing shape"):
        ln(torch.randn(4, 6, 5))


def test_layer_norm_drop_in_and_no_bias():
    for bias in (True, False):
        ref = torch.nn.LayerNorm(64, bias=bias)
        ours = rnn.LayerNorm(64, bias=bias)
        assert list(ours.state_dict()) == list(ref.state_dict())
        with torch.no_grad():
            ref.weight.normal_()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(7, 64)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_modules_train():
    """A few SGD steps on a norm-only model move the loss like torch's modules do."""
    torch.manual_seed(0)
    x, target = torch.randn(16, 32), torch.randn(16, 32)
    losses = {}
    for name, cls in (("torch", torch.nn.LayerNorm), ("ringfuse", rnn.LayerNorm)):
        torch.manual_seed(1)
        m = cls(32)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        hist = []
        for _ in range(5):
            opt.zero_grad()
            loss = (m(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            hist.append(loss.item())
        losses[name] = hist
    torch.testing.assert_close(torch.tensor(losses["ringfuse"]), torch.tensor(losses["torch"]), rtol=1e-5, atol=1e-6)


def test_add_rms_norm_module():
    m = rnn.AddRMSNorm(48, eps=1e-5)
    assert list(m.state_dict()) == ["weight"]
    x, r = torch.randn(2, 48), torch.randn(2, 48)
    out, s = m(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(x + r, (48,), m.weight, 1e-5))
    with pytest.raises(ValueError, match="hidden_size"):
        rnn.AddRMSNorm(0)
    with pytest.raises(ValueError, match="cast_mode"):
        rnn.AddRMSNorm(8, cast_mode="gemma")
