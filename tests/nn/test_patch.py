"""ringfuse.nn.patch on tiny random HF Llama / Qwen2 / Mistral models: logits unchanged."""

import pytest
import torch

import ringfuse.nn as rnn

transformers = pytest.importorskip("transformers")  # test extra; always present in CI

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**COMMON, rms_norm_eps=1e-5),
        "qwen2": lambda: transformers.Qwen2Config(**COMMON, rms_norm_eps=1e-6),
        "mistral": lambda: transformers.MistralConfig(**COMMON, rms_norm_eps=1e-5, sliding_window=None),
    }[kind]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(dtype).eval()
    with torch.no_grad():  # HF initializes norm weights to 1: make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_keeps_logits(kind, dtype):
    model = tiny(kind, dtype)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    keys = list(model.state_dict())
    counts = rnn.patch(model)
    # 2 norms per layer + the final norm
    assert sum(counts.values()) == 2 * 2 + 1, counts
    assert list(model.state_dict()) == keys
    assert any(isinstance(m, rnn.RMSNorm) for m in model.modules())
    with torch.no_grad():
        after = model(ids).logits
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    else:  # llama cast order reproduces HF's roundings: nearly every logit is identical
        assert (after != before).float().mean() < 0.05
        torch.testing.assert_close(after.float(), before.float(), rtol=0.05, atol=0.05)
    assert rnn.patch(model) == {}  # idempotent


def test_patched_model_fine_tunes():
    model = tiny("llama")
    rnn.patch(model)
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    norm_weight = model.model.norm.weight
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert norm_weight.grad is not None and torch.isfinite(norm_weight.grad).all()
    assert norm_weight.grad.abs().sum() > 0


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rnn.patch("model")
