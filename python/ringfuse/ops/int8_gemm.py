"""int8 ops: dynamic per-token activation quantization, the W8A8 GEMM and the weight-only
linear. CPU tensors run the C++ kernels (csrc/cpu/int8_gemm.cpp), CUDA tensors the Triton
ones (kernels/int8_gemm.py).

``quantize_per_token(x [..., K]) -> (x_q int8 [..., K], scale fp32 [...])``:
symmetric, one scale per row: ``scale = max|x_row| / 127``, ``x_q = round(x / scale)``
(round half to even, as ``torch.round``), so ``x_q * scale`` approximates x within half a
step. A zero row gets scale 0 and x_q 0. inf / NaN cannot be quantized: ValueError.

``int8_gemm(a_q [M, K] int8, b_q [N, K] int8, a_scale [M], b_scale [N], bias=None,
out_dtype=torch.float32)``: ``(a_q @ b_q.T) * a_scale[:, None] * b_scale[None, :] + bias``
with exact int32 accumulation and the scales and bias applied in the epilogue;
``out_dtype=torch.int32`` returns the raw int32 product (scales and bias must then be None).
On CPU, b is packed into the kernel's layout on every call unless ``packed=`` is given (a
quantized linear layer packs once); CUDA reads b as it is.

``int8_weight_only_linear(x [..., K] float, w_q [N, K] int8, w_scale [N], bias=None,
group_size=None)``: ``x @ (w_q * w_scale[:, None]).T + bias`` in x's dtype, the weights
dequantized on the fly with fp32 accumulation (activations stay float): the decode path,
where the weight bytes are the cost and int8 weights read a quarter of fp32's. With
``group_size=g`` (a multiple of 16) w_scale is [N, ceil(K / g)], one scale per g K-columns.

Registered as ``torch.ops.ringfuse.quantize_per_token`` / ``int8_gemm`` /
``int8_weight_only_linear`` (fake kernels for
torch.compile; no autograd: quantization is not differentiable).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _common as c
from . import native
from .rms_norm import OP_LIB


def quantize_per_token(x):
    op = "quantize_per_token"
    c.check_float_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have at least one dimension of size >= 1 (the K axis), got {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.quantize_per_token(x)
    return _quantize(x)


def _quantize(x):
    k = x.shape[-1]
    x2 = x.reshape(-1, k)  # [rows, K]: a view for the usual layouts, else one copy
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):  # e.g. expanded rows: one copy
        x2 = x2.contiguous()
    rows = x2.shape[0]
    q = torch.empty((rows, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        if x.is_cuda:
            from ..kernels import int8_gemm as tk

            tk.quantize_per_token_fwd(q, scale, x2)  # a row with inf / NaN: scale NaN, flagged (no sync)
            c.after_launch(x.device)
        else:
            native.quantize_per_token(q, k, scale, x2, x2.stride(0), rows, k)  # q [rows, K] contiguous
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


OP_LIB.define("quantize_per_token(Tensor x) -> (Tensor, Tensor)")
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("quantize_per_token", _quantize, _key)


@torch.library.register_fake("ringfuse::quantize_per_token")
def _quantize_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# int8_gemm

GEMM_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int32)


def _check_int8_matrix(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise TypeError(f"{op}: {name} must have dtype int8, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op}: {name} must have a unit stride along K (rows of K bytes), got strides {t.stride()}")


def _check_vector(op, name, t, n, ref, ref_name, dtypes=(torch.float32,)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def int8_gemm(a_q, b_q, a_scale=None, b_scale=None, bias=None, *, out_dtype=torch.float32, packed=None):
    """``packed=pack_int8_weight(b_q)`` skips packing b on every call (eager only)."""
    op = "int8_gemm"
    _check_int8_matrix(op, "a_q", a_q)
    _check_int8_matrix(op, "b_q", b_q)
    (m, k), n = a_q.shape, b_q.shape[0]
    if b_q.shape[1] != k:
        raise ValueError(f"{op}: K of a_q ({k}) and b_q ({b_q.shape[1]}) differ (b_q is [N, K])")
    if b_q.device != a_q.device:
        raise ValueError(f"{op}: b_q is on {b_q.device} but a_q is on {a_q.device}")
    if out_dtype not in GEMM_OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {GEMM_OUT_DTYPES}, got {out_dtype}")
    if out_dtype == torch.int32:
        if a_scale is not None or b_scale is not None or bias is not None:
            raise ValueError(f"{op}: out_dtype=torch.int32 returns the raw product: pass no scales and no bias")
    else:
        if a_scale is None or b_scale is None:
            raise ValueError(f"{op}: a_scale [M] and b_scale [N] are required unless out_dtype=torch.int32")
        _check_vector(op, "a_scale", a_scale, m, a_q, "a_q")
        _check_vector(op, "b_scale", b_scale, n, a_q, "a_q")
        if bias is not None:
            _check_vector(op, "bias", bias, n, a_q, "a_q", c.FLOAT_DTYPES)
    _check_device(op, a_q)
    if k == 0:
        raise ValueError(f"{op}: K must be >= 1, got a_q of shape {tuple(a_q.shape)}")
    _check_k(op, k)
    if packed is not None and (not isinstance(packed, PackedInt8Weight) or packed.b_q is not b_q):
        raise ValueError(f"{op}: packed must be pack_int8_weight(b_q) of this very b_q")
    if packed is not None and not packed.is_current():
        raise ValueError(f"{op}: b_q was swapped, resized or written in place since pack_int8_weight(b_q): "
                         "pack it again")  # fmt: skip
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.int8_gemm(a_q, b_q, a_scale, b_scale, bias, out_dtype)
    return _int8_gemm(a_q, b_q, a_scale, b_scale, bias, out_dtype, packed)


class PackedInt8Weight(NamedTuple):
    """b [N, K] int8 in the CPU kernel's layout (``pack_int8_weight``), plus b itself for
    the exact fallback that b holding -128 needs."""

    packed: torch.Tensor  # int8 [panels * K/4 * 64]
    b_q: torch.Tensor  # int8 [N, K], unit stride along K
    has_min: bool  # b holds -128
    watch: c.Watch  # of b_q when packed: a later change makes the packing stale

    def is_current(self) -> bool:
        """False once b_q was swapped (``b_q.data = ...``), resized or written in place."""
        return not self.watch.changed()


# The int32 accumulator of int8 x int8 products is exact while K * 128 * 128 < 2^31 (every
# backend accumulates the whole K in int32): larger K is refused, never silently wrapped.
MAX_GEMM_K = 131071


def _check_k(op, k):
    if k > MAX_GEMM_K:
        raise ValueError(f"{op}: K must be <= {MAX_GEMM_K} (K * 128 * 128 products must fit the exact int32 "
                         f"accumulation), got K = {k}; split K and add the int32 partial products in int64")  # fmt: skip


def pack_int8_weight(b_q) -> PackedInt8Weight:
    """Pack b_q [N, K] int8 once for repeated ``int8_gemm(..., packed=)`` calls."""
    _check_int8_matrix("pack_int8_weight", "b_q", b_q)
    n, k = b_q.shape
    if k == 0 or not b_q.is_cpu:
        raise ValueError(f"pack_int8_weight: b_q must be a CPU tensor with K >= 1 (CUDA needs no packing), "
                         f"got {tuple(b_q.shape)} on {b_q.device}")  # fmt: skip
    _check_k("pack_int8_weight", k)
    if n > 1 and b_q.stride(0) < k:  # e.g. expanded rows: the kernel reads rows K apart at least
        raise ValueError(f"pack_int8_weight: b_q's rows must not overlap (row stride >= K = {k}), got strides "
                         f"{b_q.stride()}; pass b_q.contiguous()")  # fmt: skip
    packed = torch.empty(native.int8_packed_size(n, k), dtype=torch.int8)
    has_min = native.int8_pack_b(packed, b_q, b_q.stride(0), n, k) if n else False
    return PackedInt8Weight(packed, b_q, has_min, c.Watch((b_q,)))


def _check_device(op, t):
    if not (t.is_cpu or t.is_cuda):
        raise ValueError(f"{op}: tensors must be on CPU or CUDA, got {t.device}")


def _int8_gemm(a_q, b_q, a_scale, b_scale, bias, out_dtype, packed=None):
    (m, k), n = a_q.shape, b_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    if a_q.is_cuda:
        from ..kernels import int8_gemm as tk

        vec = [t.contiguous() if t is not None else None for t in (a_scale, b_scale)]
        tk.int8_gemm_fwd(out, a_q, b_q, *vec, bias.float().contiguous() if bias is not None else None)
        return out
    if m > 1 and a_q.stride(0) < k:  # overlapping rows (e.g. expanded): the kernel reads rows >= K apart
        a_q = a_q.contiguous()
    if packed is None:
        packed = pack_int8_weight(b_q if n == 1 or b_q.stride(0) >= k else b_q.contiguous())
    packed, b_q, has_min, _ = packed
    vec = [t.contiguous() if t is not None else None for t in (a_scale, b_scale)]
    bias32 = bias.float().contiguous() if bias is not None else None
    native.int8_gemm_packed(out, n, a_q, max(a_q.stride(0), k), packed, b_q, max(b_q.stride(0), k), has_min, *vec,
                            bias32, m, n, k)  # fmt: skip
    return out


OP_LIB.define(
    "int8_gemm(Tensor a_q, Tensor b_q, Tensor? a_scale, Tensor? b_scale, Tensor? bias, ScalarType out_dtype) -> Tensor"
)
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("int8_gemm", _int8_gemm, _key)


@torch.library.register_fake("ringfuse::int8_gemm")
def _int8_gemm_fake(a_q, b_q, a_scale, b_scale, bias, out_dtype):
    return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


# ---------------------------------------------------------------------------------------
# int8_weight_only_linear


def int8_weight_only_linear(x, w_q, w_scale, bias=None, *, group_size=None):
    op = "int8_weight_only_linear"
    c.check_float_tensor(op, "x", x)
    _check_int8_matrix(op, "w_q", w_q)
    n, k = w_q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., K] with K = {k} (w_q is [N, K]), got shape {tuple(x.shape)}")
    if w_q.device != x.device:
        raise ValueError(f"{op}: w_q is on {w_q.device} but x is on {x.device}")
    if group_size is None:
        _check_vector(op, "w_scale", w_scale, n, w_q, "w_q")
    else:
        _check_group_scale(op, w_scale, group_size, n, k, w_q)
    if bias is not None:
        _check_vector(op, "bias", bias, n, w_q, "w_q", c.FLOAT_DTYPES)
    _check_device(op, x)
    if k == 0:
        raise ValueError(f"{op}: K must be >= 1")
    if torch.compiler.is_compiling():
        return torch.ops.ringfuse.int8_weight_only_linear(x, w_q, w_scale, bias, group_size)
    return _weight_only(x, w_q, w_scale, bias, group_size)


def _check_group_scale(op, w_scale, group_size, n, k, ref):
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{op}: group_size must be an int or None, got {type(group_size).__name__}")
    if group_size < 16 or group_size % 16:
        raise ValueError(f"{op}: group_size must be a positive multiple of 16 (e.g. 32, 64, 128), got {group_size}")
    groups = -(-k // group_size)
    if not isinstance(w_scale, torch.Tensor):
        raise TypeError(f"{op}: w_scale must be a torch.Tensor, got {type(w_scale).__name__}")
    if w_scale.dtype != torch.float32:
        raise TypeError(f"{op}: w_scale must have dtype torch.float32, got {w_scale.dtype}")
    if w_scale.shape != (n, groups):
        raise ValueError(f"{op}: w_scale must have shape (N, ceil(K / group_size)) = ({n}, {groups}) for "
                         f"group_size={group_size}, got {tuple(w_scale.shape)}")  # fmt: skip
    if w_scale.device != ref.device:
        raise ValueError(f"{op}: w_scale is on {w_scale.device} but w_q is on {ref.device}")


def _weight_only(x, w_q, w_scale, bias, group_size=None):
    n, k = w_q.shape
    x2 = x.reshape(-1, k)  # [M, K]
    x2 = x2.float() if x.is_cpu else x2  # CPU kernels take fp32 x (small on the decode path)
    m = x2.shape[0]
    if x2.stride(-1) != 1 or (m > 1 and x2.stride(0) < k):  # e.g. expanded rows (stride 0)
        x2 = x2.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m and n and x.is_cuda:
        from ..kernels import int8_gemm as tk

        scale = w_scale if group_size is None else w_scale.contiguous()
        tk.weight_only_fwd(out, x2, w_q, scale, bias.float().contiguous() if bias is not None else None, group_size)
    elif m and n:
        scale = w_scale.contiguous()  # [N] or [N, groups]
        bias32 = bias.float().contiguous() if bias is not None else None
        if n > 1 and w_q.stride(0) < k:  # rows that overlap (an expanded w_q): the kernel takes N rows of K bytes
            w_q = w_q.contiguous()
        native.int8_weight_only_linear(out, n, x2, max(x2.stride(0), k), w_q, w_q.stride(0), scale,
                                       scale.shape[-1] if group_size else 0, group_size or 0, bias32, m, n, k)
    return out.reshape(*x.shape[:-1], n)


def _check_linear_weights(op, w_q, w_scale, bias) -> tuple[int, int]:
    """The prepared linears' weights: w_q [N, K >= 1] int8, w_scale [N] fp32, bias [N] float
    or None, on w_q's device. Returns (N, K)."""
    _check_int8_matrix(op, "w_q", w_q)
    n, k = w_q.shape
    if k == 0:
        raise ValueError(f"{op}: K must be >= 1")
    _check_vector(op, "w_scale", w_scale, n, w_q, "w_q")
    if bias is not None:
        _check_vector(op, "bias", bias, n, w_q, "w_q", c.FLOAT_DTYPES)
    return n, k


class PreparedInt8WeightOnlyLinear:
    """``int8_weight_only_linear(x, w_q, w_scale, bias)`` (per-channel scales) with the
    weights checked once, for a caller that applies them many times, like a decode loop. A
    call checks only x: a CPU float32 [M, K] tensor with a unit inner stride goes straight
    to the kernel; anything else takes the full op (same result, same errors). Made with
    ``prepare_int8_weight_only_linear``."""

    def __init__(self, w_q, w_scale, bias=None):
        n, k = _check_linear_weights("prepare_int8_weight_only_linear", w_q, w_scale, bias)
        # a call prepares again when one of these was swapped, resized or written in place
        self._sources = (w_q, w_scale) if bias is None else (w_q, w_scale, bias)
        self.w_q, self.w_scale, self.bias = w_q, w_scale.contiguous(), bias
        self.out_features, self.in_features = n, k
        self._bias32 = None if bias is None else bias.float().contiguous()
        self._direct = w_q.is_cpu
        # the kernel's weight: N rows of K bytes (a copy of an expanded w_q, whose rows overlap)
        self._w = w_q if n == 1 or w_q.stride(0) >= k else w_q.contiguous()
        self._w_stride = self._w.stride(0)
        self._watch = c.Watch(self._sources, copies=(self._w, self.w_scale, self._bias32))

    def __call__(self, x):
        if torch.compiler.is_compiling():  # traced: the op on the caller's tensors (no pointers to watch)
            return int8_weight_only_linear(x, *self._sources)
        if self._watch.changed():
            self.__init__(*self._sources)
        k = self.in_features
        if (not self._direct or type(x) is not torch.Tensor or x.dim() != 2 or x.dtype is not torch.float32
                or not x.is_cpu or x.shape[1] != k or x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < k)):  # fmt: skip
            return int8_weight_only_linear(x, self.w_q, self.w_scale, self.bias)
        m, n = x.shape[0], self.out_features
        out = torch.empty(m, n)
        if m:  # [M, N] <- [M, K] @ ([N, K] int8 * [N])^T
            native.int8_weight_only_linear(out, n, x, max(x.stride(0), k), self._w, self._w_stride, self.w_scale,
                                           0, 0, self._bias32, m, n, k)  # fmt: skip
        return out


def prepare_int8_weight_only_linear(w_q, w_scale, bias=None) -> PreparedInt8WeightOnlyLinear:
    """An ``int8_weight_only_linear`` with these per-channel weights checked once:
    ``prepare_int8_weight_only_linear(w_q, s, b)(x) == int8_weight_only_linear(x, w_q, s, b)``."""
    return PreparedInt8WeightOnlyLinear(w_q, w_scale, bias)


class PreparedInt8Linear:
    """The W8A8 linear ``y = int8_gemm(*quantize_per_token(x), w_q, ..., w_scale, bias,
    out_dtype=x.dtype)`` (x [..., K] -> y [..., N]) with the weights checked and packed once,
    for a caller that applies them many times (``nn.Int8Linear``). A call checks only x: a
    contiguous CPU float tensor goes straight to the two kernels; anything else takes the two
    full ops (same result, same errors). The two op calls cost ~30 us of checks on a small
    layer, more than the kernels at decode sizes. Made with ``prepare_int8_linear``."""

    def __init__(self, w_q, w_scale, bias=None):
        n, k = _check_linear_weights("prepare_int8_linear", w_q, w_scale, bias)
        _check_k("prepare_int8_linear", k)
        # a call prepares again when one of these was swapped, resized or written in place
        self._sources = (w_q, w_scale) if bias is None else (w_q, w_scale, bias)
        self.w_q, self.w_scale, self.bias = w_q, w_scale, bias
        self.out_features, self.in_features = n, k
        self._direct = w_q.is_cpu and (n == 1 or w_q.stride(0) >= k)  # else pack_int8_weight refuses
        self.packed = pack_int8_weight(w_q) if self._direct else None
        self._scale32 = w_scale.contiguous()
        self._bias32 = None if bias is None else bias.float().contiguous()
        kernel_tensors = (self._scale32, self._bias32) + ((self.packed.packed,) if self._direct else ())
        self._watch = c.Watch(self._sources, copies=kernel_tensors)

    def __call__(self, x):
        if torch.compiler.is_compiling():  # traced: the ops on the caller's tensors (no pointers to watch)
            return w8a8_linear(x, *self._sources)
        if self._watch.changed():
            self.__init__(*self._sources)
        k, n = self.in_features, self.out_features
        if (not self._direct or type(x) is not torch.Tensor or x.dtype not in c._FLOAT_SET or not x.is_cpu
                or not x.dim() or x.shape[-1] != k or not x.is_contiguous() or x.requires_grad):  # fmt: skip
            return self._full(x)
        m = x.numel() // k
        x_q = torch.empty((m, k), dtype=torch.int8)
        x_s = torch.empty((m,), dtype=torch.float32)
        out = torch.empty((m, n), dtype=x.dtype)
        if m:  # x [M, K] -> x_q [M, K], x_s [M] -> out [M, N] (as _quantize and _int8_gemm do)
            native.quantize_per_token(x_q, k, x_s, x, k, m, k)
            native.int8_gemm_packed(out, n, x_q, k, self.packed.packed, self.w_q, max(self.w_q.stride(0), k),
                                    self.packed.has_min, x_s, self._scale32, self._bias32, m, n, k)  # fmt: skip
        return out.view(*x.shape[:-1], n)

    def _full(self, x):
        """The two checked ops (any device, layout or dtype they take)."""
        return w8a8_linear(x, self.w_q, self.w_scale, self.bias, packed=self.packed)


def w8a8_linear(x, w_q, w_scale, bias=None, *, packed=None):
    """x [..., K] float -> [..., N] in x's dtype: ``int8_gemm(x_q, w_q, x_s, w_scale, bias)``
    on ``x_q, x_s = quantize_per_token(x)`` flattened to [M, K]. ``packed`` (CPU, eager):
    ``pack_int8_weight(w_q)``."""
    x_q, x_s = quantize_per_token(x)  # [..., K] int8, [...] fp32 (a scalar x is refused there)
    k = x_q.shape[-1]
    x_q, x_s = x_q.reshape(-1, k), x_s.reshape(-1)
    packed = packed if x.is_cpu and not torch.compiler.is_compiling() else None
    y = int8_gemm(x_q, w_q, x_s, w_scale, bias, out_dtype=x.dtype, packed=packed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def prepare_int8_linear(w_q, w_scale, bias=None) -> PreparedInt8Linear:
    """A W8A8 linear with these per-channel weights checked and packed once:
    ``prepare_int8_linear(w_q, s, b)(x) == w8a8_linear(x, w_q, s, b)``."""
    return PreparedInt8Linear(w_q, w_scale, bias)


OP_LIB.define(
    "int8_weight_only_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int? group_size=None) -> Tensor"
)
for _key in ("CPU", "CUDA"):
    OP_LIB.impl("int8_weight_only_linear", _weight_only, _key)


@torch.library.register_fake("ringfuse::int8_weight_only_linear")
def _weight_only_fake(x, w_q, w_scale, bias, group_size=None):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))
