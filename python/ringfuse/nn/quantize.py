"""``quantize(model)``: swap a model's nn.Linear layers for ``Int8Linear`` in place, with
optional SmoothQuant calibration.

SmoothQuant (Xiao et al. 2023): activations of LLMs have a few outlier input channels, and
a per-token int8 scale set by an outlier crushes every other channel to a few levels. For
each input channel j, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; dividing X by s and
multiplying W's columns by s is exact in real arithmetic and balances how hard the two are
to quantize (alpha = 0.5 splits it evenly). ``max|X_j|`` comes from calibration batches.
The division is folded into the preceding RMSNorm/LayerNorm weight where the model's
structure makes that safe (the norm feeds only the smoothed layers: q/k/v after
``input_layernorm`` and gate/up after ``post_attention_layernorm`` in HF Llama, Mistral,
Qwen2 and similar decoder layers; those projections share one s). Any other smoothed layer
divides its input by s itself (``Int8Linear.smooth``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .int8_linear import MODES, Int8Linear

DEFAULT_ALPHA = 0.5

# (norm attribute, module holding the projections, projection names) in HF decoder layers
FOLDABLE_GROUPS = (
    ("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj")),
    ("post_attention_layernorm", "mlp", ("gate_proj", "up_proj")),
)


def smooth_factors(act_absmax: torch.Tensor, weights: Iterable[torch.Tensor], alpha: float = DEFAULT_ALPHA):
    """s [K] for layers that share one input: ``max|X_j|^alpha / max_i max|W_i[:, j]|^(1-alpha)``.
    Channels that never saw a nonzero input (or have an all-zero weight column) keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_factors: alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().float()
    w = torch.stack([t.detach().float().abs().amax(0) for t in weights]).amax(0)  # [K]
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


def _run_batch(model, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def calibrate(model: torch.nn.Module, calibration: Iterable, names: Iterable[str] | None = None):
    """Run the calibration batches (each a tensor, a tuple of positional args or a dict of
    keyword args for ``model``) and return {linear name: max |input| per input channel}."""
    wanted = set(names) if names is not None else None
    absmax: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, module.in_features).abs().amax(0).float()  # [K]
            absmax[name] = torch.maximum(absmax[name], x) if name in absmax else x

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (wanted is None or name in wanted):
            hooks.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        batches = 0
        for batch in calibration:
            _run_batch(model, batch)
            batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("calibrate: calibration yielded no batches")
    return absmax


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


@torch.no_grad()
def quantize(model: torch.nn.Module, mode: str = "w8a8", *, skip: Iterable[str] = ("lm_head",),
             calibration: Iterable | None = None, alpha: float = DEFAULT_ALPHA,
             group_size: int | None = None) -> dict[str, int]:  # fmt: skip
    """Replace, in place, every ``torch.nn.Linear`` in ``model`` (HF models included) by an
    ``Int8Linear`` of ``mode`` ("w8a8" or "w8a16"), except those whose name or last name
    component is in ``skip``. ``calibration`` (w8a8 only): batches to run once to compute
    SmoothQuant factors with ``alpha``. ``group_size`` (w8a16 only): per-group weight
    scales. Returns {"quantized": n, "smoothed": n, "folded": n}."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"quantize: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"quantize: mode must be one of {MODES}, got {mode!r}")
    if isinstance(skip, str):
        raise TypeError(f"quantize: skip must be a collection of names, got the string {skip!r}")
    skip = tuple(skip)
    if calibration is not None and mode != "w8a8":
        raise ValueError("quantize: calibration (SmoothQuant) applies to mode='w8a8' only; "
                         "w8a16 keeps activations in float")  # fmt: skip
    targets = {name: m for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and not _skipped(name, skip)}  # fmt: skip
    smooth: dict[str, torch.Tensor] = {}
    folded: set[str] = set()
    if calibration is not None:
        absmax = calibrate(model, calibration, targets)
        folded = _fold_into_norms(model, targets, absmax, alpha, smooth)
        for name, lin in targets.items():
            if name not in smooth and name in absmax:
                smooth[name] = smooth_factors(absmax[name], [lin.weight], alpha)
    parents = dict(model.named_modules())
    for name, lin in targets.items():
        new = Int8Linear.from_float(lin, mode, smooth=smooth.get(name), group_size=group_size,
                                    divide_input=name not in folded)  # fmt: skip
        parent_name, _, child = name.rpartition(".")
        setattr(parents[parent_name] if parent_name else model, child, new)
    return {"quantized": len(targets), "smoothed": len(smooth), "folded": len(folded)}


def _fold_into_norms(model, targets, absmax, alpha, smooth) -> set[str]:
    """Llama-style decoder layers: one s per norm, shared by the projections it feeds, with
    1 / s folded into the norm weight. Fills ``smooth``; returns the folded layer names."""
    folded = set()
    names = {id(m): n for n, m in model.named_modules()}
    for layer in model.modules():
        for norm_attr, holder_attr, proj_names in FOLDABLE_GROUPS:
            norm, holder = getattr(layer, norm_attr, None), getattr(layer, holder_attr, None)
            weight = getattr(norm, "weight", None)
            if not isinstance(weight, torch.Tensor) or holder is None:
                continue
            projs = [getattr(holder, p, None) for p in proj_names]
            pnames = [names.get(id(p)) for p in projs]
            if not all(p is not None and n in targets and n in absmax for p, n in zip(projs, pnames)):
                continue  # not the expected structure, or a projection skipped: no folding
            if getattr(norm, "bias", None) is not None or weight.shape != (projs[0].in_features,):
                continue  # LayerNorm with a bias would need the bias divided too; keep it simple
            act = torch.stack([absmax[n] for n in pnames]).amax(0)  # the same input: same max
            s = smooth_factors(act, [p.weight for p in projs], alpha)
            weight.data.copy_((weight.data.float() / s.to(weight.device)).to(weight.dtype))
            for n in pnames:
                smooth[n] = s
                folded.add(n)
    return folded
