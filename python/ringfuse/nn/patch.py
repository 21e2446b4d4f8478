"""``patch(model)``: swap the norms of HF Llama-family models for ringfuse's, in place (the
approach of Liger-Kernel's ``apply_liger_kernel_to_*`` helpers, applied to instances)."""

from __future__ import annotations

import torch

from .norms import LayerNorm, RMSNorm

# HF RMSNorm classes whose forward is exactly
#   weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
# i.e. our cast_mode="llama". (Gemma's 1 + weight variant is deliberately absent.)
HF_LLAMA_STYLE_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})


def _replacement(module: torch.nn.Module):
    if isinstance(module, (RMSNorm, LayerNorm)):
        return None
    name = type(module).__name__
    if name in HF_LLAMA_STYLE_RMSNORMS:
        weight = module.weight
        new = RMSNorm(weight.shape[0], eps=module.variance_epsilon, cast_mode="llama",
                      device=weight.device, dtype=weight.dtype)
        new.weight = weight  # share the Parameter: optimizers and tied states keep working
        return new
    if type(module) is torch.nn.RMSNorm:
        new = RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
        new.weight = module.weight
        return new
    if type(module) is torch.nn.LayerNorm:
        new = LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine, bias=module.bias is not None)
        new.weight, new.bias = module.weight, module.bias
        return new
    return None


def patch(model: torch.nn.Module) -> dict[str, int]:
    """Replace, in place, every HF Llama/Qwen2/Mistral RMSNorm and every plain
    torch.nn.RMSNorm / LayerNorm inside ``model`` by the ringfuse module sharing the same
    parameters. Returns {class name: count replaced}. Logits stay equal within the
    tolerance rule (bitwise for the llama-style RMSNorms in most positions)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    counts: dict[str, int] = {}
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            new = _replacement(child)
            if new is not None:
                targets.append((parent, child_name, new, type(child).__name__))
    for parent, child_name, new, cls in targets:
        setattr(parent, child_name, new)
        counts[cls] = counts.get(cls, 0) + 1
    return counts
