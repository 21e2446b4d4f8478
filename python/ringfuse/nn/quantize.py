"""``quantize(model)``: swap a model's nn.Linear layers for ``Int8Linear`` in place, with
optional SmoothQuant calibration.

SmoothQuant (Xiao et al. 2023): activations of LLMs have a few outlier input channels, and
a per-token int8 scale set by an outlier crushes every other channel to a few levels. For
each input channel j, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; dividing X by s and
multiplying W's columns by s is exact in real arithmetic and balances how hard the two are
to quantize (alpha = 0.5 splits it evenly). ``max|X_j|`` comes from calibration batches.
The division is folded into the preceding RMSNorm/LayerNorm weight where that is exact:
the norm's output is the projections' input (q/k/v after ``input_layernorm`` and gate/up
after ``post_attention_layernorm`` in HF Llama, Mistral, Qwen2 and similar decoder layers;
those projections share one s), which calibration confirms (the norm's output and their
input have the same per-channel maxima), and the norm's output scales with its weight
(``weight * x``: Gemma's ``(1 + weight) * x`` does not). Any other smoothed layer divides
its input by s itself (``Int8Linear.smooth``).
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
    if type(model) is torch.nn.Linear:
        raise TypeError("quantize: model is itself a torch.nn.Linear, which cannot be replaced in place; "
                        "use Int8Linear.from_float(linear, mode)")  # fmt: skip
    if mode not in MODES:
        raise ValueError(f"quantize: mode must be one of {MODES}, got {mode!r}")
    if isinstance(skip, str):
        raise TypeError(f"quantize: skip must be a collection of names, got the string {skip!r}")
    try:
        skip = tuple(skip)
    except TypeError:
        raise TypeError(f"quantize: skip must be a collection of names (() skips none), got {skip!r}") from None
    if calibration is not None and mode != "w8a8":
        raise ValueError("quantize: calibration (SmoothQuant) applies to mode='w8a8' only; "
                         "w8a16 keeps activations in float")  # fmt: skip
    targets = {name: m for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and not _skipped(name, skip)}  # fmt: skip
    smooth: dict[str, torch.Tensor] = {}
    folded: set[str] = set()
    groups = _norm_groups(model, targets) if calibration is not None else []
    # all or nothing: a call that fails (a bad group_size, a calibration batch that raises)
    # leaves the model as it was, its norm weights included
    saved = [(norm.weight, norm.weight.detach().clone()) for _, norm, _ in groups]
    try:
        if calibration is not None:
            norm_out: dict[str, torch.Tensor] = {}  # norm name -> max |output| per channel
            hooks = [norm.register_forward_hook(_absmax_into(norm_out, name)) for name, norm, _ in groups]
            try:
                absmax = calibrate(model, calibration, targets)
            finally:
                for h in hooks:
                    h.remove()
            folded = _fold_into_norms(groups, absmax, norm_out, alpha, smooth)
            for name, lin in targets.items():
                if name not in smooth and name in absmax:
                    smooth[name] = smooth_factors(absmax[name], [lin.weight], alpha)
        new = {name: Int8Linear.from_float(lin, mode, smooth=smooth.get(name), group_size=group_size,
                                           divide_input=name not in folded)
               for name, lin in targets.items()}  # fmt: skip
    except BaseException:
        with torch.no_grad():
            for weight, before in saved:
                weight.copy_(before)
        raise
    parents = dict(model.named_modules())
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        setattr(parents[parent_name] if parent_name else model, child, module)
    return {"quantized": len(targets), "smoothed": len(smooth), "folded": len(folded)}


def _norm_groups(model, targets) -> list[tuple[str, torch.nn.Module, dict[str, torch.nn.Linear]]]:
    """(norm name, norm, {projection name: projection}) of the FOLDABLE_GROUPS found in
    ``model``, where every projection is quantized and the norm is a weight-only one of
    their input width."""
    names = {id(m): n for n, m in model.named_modules()}
    groups = []
    for layer in model.modules():
        for norm_attr, holder_attr, proj_names in FOLDABLE_GROUPS:
            norm, holder = getattr(layer, norm_attr, None), getattr(layer, holder_attr, None)
            weight = getattr(norm, "weight", None)
            if not isinstance(norm, torch.nn.Module) or not isinstance(weight, torch.Tensor) or holder is None:
                continue
            projs = [getattr(holder, p, None) for p in proj_names]
            pnames = [names.get(id(p)) for p in projs]
            if not all(p is not None and n in targets for p, n in zip(projs, pnames)):
                continue  # not the expected structure, or a projection skipped: no folding
            if getattr(norm, "bias", None) is not None or weight.shape != (projs[0].in_features,):
                continue  # LayerNorm with a bias would need the bias divided too; keep it simple
            groups.append((names[id(norm)], norm, dict(zip(pnames, projs))))
    return groups


def _absmax_into(store: dict, name: str):
    def hook(module, args, out):
        out = out[0] if isinstance(out, tuple) else out
        x = out.detach().reshape(-1, out.shape[-1]).abs().amax(0).float()
        store[name] = torch.maximum(store[name], x) if name in store else x

    return hook


def _scales_with_weight(norm: torch.nn.Module) -> bool:
    """Whether doubling the norm's weight doubles its output (exact in floating point for an
    output of ``weight * x``), as dividing the weight by s must divide the output by s."""
    w = norm.weight
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    saved = w.data.clone()
    try:
        y1 = norm(x)
        w.data.mul_(2)
        y2 = norm(x)
    finally:
        w.data.copy_(saved)
    return isinstance(y1, torch.Tensor) and torch.equal(y2, 2 * y1)


def _fold_into_norms(groups, absmax, norm_out, alpha, smooth) -> set[str]:
    """One s per norm, shared by the projections it feeds, with 1 / s folded into the norm
    weight, where that is exact (module docstring). Fills ``smooth``; returns the folded
    layer names."""
    folded = set()
    for norm_name, norm, projs in groups:
        if not all(n in absmax for n in projs) or norm_name not in norm_out:
            continue  # not reached by the calibration batches
        act = torch.stack([absmax[n] for n in projs]).amax(0)  # the same input: the same max
        if not torch.equal(norm_out[norm_name].to(act.device), act) or not _scales_with_weight(norm):
            continue  # the norm's output is not (exactly) their input: each smooths its own input
        s = smooth_factors(act, [p.weight for p in projs.values()], alpha)
        weight = norm.weight
        weight.data.copy_((weight.data.float() / s.to(weight.device)).to(weight.dtype))
        for n in projs:
            smooth[n] = s
            folded.add(n)
    return folded
