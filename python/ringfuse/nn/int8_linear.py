"""``Int8Linear``: a drop-in for ``torch.nn.Linear`` with int8 weights.

Two modes:
- ``"w8a8"`` (SmoothQuant-style): weights symmetric per output channel, activations
  quantized per token on every call (``ops.quantize_per_token``), int8 x int8 -> int32 GEMM
  with the scales and bias applied in its epilogue. The compute is int8: the fast path for
  prefill / large M.
- ``"w8a16"`` (weight-only): weights int8 (per channel, or per group of ``group_size``
  K-columns), activations stay float. Decode (small M) is bound by weight bytes, and int8
  weights are a quarter of fp32's.

Each mode keeps its numerics at every M; within a mode the op picks the kernel by the
number of rows M (w8a16 on CPU: a GEMV-style kernel up to 4 rows, then a blocked GEMM on
weights dequantized once per call). The state_dict holds plain tensors: ``weight``
(int8 [N, K]), ``weight_scale`` (fp32 [N] or [N, ceil(K / group_size)]), ``bias`` (as
nn.Linear) and, when smoothing is kept in the layer, ``smooth`` (fp32 [K], the input is
divided by it). The CPU GEMM's packed weight layout is built from ``weight`` on first use
and rebuilt whenever ``weight`` changes (``load_state_dict`` included); it is never saved.
"""

from __future__ import annotations

import torch

from .. import ops

MODES = ("w8a8", "w8a16")

def quantize_weight(weight: torch.Tensor, group_size: int | None = None):
    """Symmetric int8 of a float weight [N, K]: ``w_q = round(w / s)``, ``s = max|w| / 127``
    per output row (``group_size=None``) or per row and group of ``group_size`` K-columns
    (the last group may be partial). Returns (w_q int8 [N, K], s fp32 [N] or [N, groups])."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight: weight must be a 2-D float tensor [N, K], got {_describe(weight)}")
    w = weight.detach().float()
    if group_size is None:
        return ops.quantize_per_token(w)
    _check_group_size("quantize_weight", group_size)
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w, (0, groups * group_size - k))  # zeros leave each max unchanged
    q, s = ops.quantize_per_token(padded.reshape(n * groups, group_size))
    return q.reshape(n, groups * group_size)[:, :k].contiguous(), s.reshape(n, groups)


def _check_group_size(where, group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 or group_size % 16:
        raise ValueError(f"{where}: group_size must be None or a positive multiple of 16 (e.g. 128), got {group_size!r}")


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


class Int8Linear(torch.nn.Module):
    """y = x @ W.T + b with W held in int8; see the module docstring for the modes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "w8a8",
                 group_size: int | None = None, smooth: bool = False, device=None, dtype=None):  # fmt: skip
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Int8Linear: mode must be one of {MODES}, got {mode!r}")
        if group_size is not None:
            _check_group_size("Int8Linear", group_size)
            if mode == "w8a8":
                raise ValueError("Int8Linear: group_size applies to mode='w8a16' only: the w8a8 GEMM accumulates "
                                 "the whole K in int32, which needs one scale per output channel")  # fmt: skip
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        scale_shape = (out_features,) if group_size is None else (out_features, -(-in_features // group_size))
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if smooth:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.smooth = None
        self._prepared = None  # w8a8: ops.PreparedInt8Linear of the current weight, scale and bias

    @classmethod
    def from_float(cls, linear: torch.nn.Linear, mode: str = "w8a8", smooth: torch.Tensor | None = None,
                   group_size: int | None = None, *, divide_input: bool = True) -> "Int8Linear":  # fmt: skip
        """Quantize ``linear``. ``smooth`` [K] (SmoothQuant factors, positive): the weight's
        input channels are multiplied by it, which moves activation outliers into the
        weight; the layer divides its input by it (a ``smooth`` buffer), unless
        ``divide_input=False`` says the caller has folded 1 / smooth into the op that
        produces the input (``quantize`` does that for the norms of Llama-family layers)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Int8Linear.from_float: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()  # [N, K]
        if smooth is not None:
            smooth = _check_smooth("Int8Linear.from_float", smooth, linear.in_features, w.device)
            w = w * smooth[None, :]
        keep = smooth is not None and divide_input
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode, group_size=group_size,
                  smooth=keep, device=w.device,
                  dtype=linear.bias.dtype if linear.bias is not None else None)  # fmt: skip
        w_q, w_s = quantize_weight(w, group_size)
        new.weight.copy_(w_q)
        new.weight_scale.copy_(w_s)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        if keep:
            new.smooth.copy_(smooth)
        return new

    def dequantized_weight(self) -> torch.Tensor:
        """W as fp32 [N, K], the smoothing divided back out: what the layer computes with."""
        scale = self.weight_scale
        if self.group_size is None:
            scale = scale[:, None]
        else:
            scale = scale.repeat_interleave(self.group_size, dim=1)[:, : self.in_features]
        w = self.weight.float() * scale
        return w / self.smooth[None, :] if self.smooth is not None else w

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) cast every float buffer: the scales (and the
        # smoothing) are fp32 by definition and only follow the device (a cast made the next
        # forward fail, and fp16 scales would round the weights' scales)
        fp32 = {name: t for name in ("weight_scale", "smooth") if (t := self._buffers.get(name)) is not None}
        super()._apply(fn, recurse)
        for name, before in fp32.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = before.to(after.device)
        return self

    def __getstate__(self):
        # pickling (torch.save of the module, deepcopy): the packed weight is a cache of
        # views of it, rebuilt on the next forward, and torch.save refuses such views
        return dict(super().__getstate__(), _prepared=None)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # loaded in place: under torch.inference_mode no version counter would show it, so
        # the packed weight is dropped here rather than left to the prepared op's watch
        self._prepared = None

    def _prepared_w8a8(self):
        # made again when weight, weight_scale or bias was replaced; PreparedInt8Linear itself
        # re-checks and repacks when one was swapped (weight.data = ...), resized or written
        # in place (load_state_dict included)
        p = self._prepared
        if p is None or p.w_q is not self.weight or p.w_scale is not self.weight_scale or p.bias is not self.bias:
            p = self._prepared = ops.prepare_int8_linear(self.weight, self.weight_scale, self.bias)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"Int8Linear: input must be a float tensor, got {_describe(x)}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear: input must be [..., {self.in_features}], got shape {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:  # the output had no grad_fn: backward silently stopped here
            return _InputGrad.apply(x, self)
        return self._forward_frozen(x)

    def _forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        if self.mode == "w8a8":
            return self._forward_w8a8(x)
        return self._forward_w8a16(x)

    def _forward_w8a8(self, x):
        if torch.compiler.is_compiling():  # traced: the two ops (packing is eager-only)
            return ops.w8a8_linear(x, self.weight, self.weight_scale, self.bias)
        return self._prepared_w8a8()(x)  # quantize_per_token + int8_gemm, checks of x only

    def _forward_w8a16(self, x):
        return ops.int8_weight_only_linear(x, self.weight, self.weight_scale, self.bias, group_size=self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size is not None else ""
        smooth = ", smooth=True" if self.smooth is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}{group}{smooth}")  # fmt: skip


def _check_smooth(where, smooth, k, device):
    if not isinstance(smooth, torch.Tensor) or smooth.shape != (k,):
        raise ValueError(f"{where}: smooth must be a tensor of shape ({k},), got {_describe(smooth)}")
    smooth = smooth.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(smooth).all()) or not bool((smooth > 0).all()):
        raise ValueError(f"{where}: smooth factors must be finite and > 0")
    return smooth


class _InputGrad(torch.autograd.Function):
    """Int8Linear with a gradient for its input (the int8 weights are frozen), as bitsandbytes'
    int8 layers have, so that layers in front of it (adapters, a float head) can train:
    dx = dy @ W, W the dequantized weight with the smoothing divided out (the layer's own
    view of itself); the per-token rounding of w8a8's activations passes straight through."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return layer._forward_frozen(x)

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.layer.dequantized_weight()  # [N, K] fp32
        return (grad_y.float() @ w).to(ctx.x_dtype), None
