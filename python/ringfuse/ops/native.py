"""The one caller of ``ringfuse._C``: a typed wrapper per entry point, and the only code in
ringfuse that hands raw data pointers to C++.

``_C`` does not link libtorch, so its functions take integer data pointers, sizes, row
strides, dtype codes and a thread count (CUDA: a stream handle). Each wrapper here takes the
binding's arguments in the binding's order, with these changes:

- every data pointer becomes the tensor it points into (``None`` for an absent optional
  one, which the kernel gets as 0); the wrapper reads the pointer;
- dtype codes, the thread count (``torch.get_num_threads()``, as torch's own ops use) and,
  for CUDA kernels, the device and current stream are derived by the wrapper, never passed
  (a thread count stays an argument only where it is the caller's choice: the machine-limit
  probes, the shared-memory ring);
- sizes and row strides (in elements) stay arguments: the caller decides how it presents a
  tensor to the kernel (an N-d tensor as [rows, hidden] rows, one row of any stride).

A wrapper does not validate: the op that calls it has checked device, dtype, shape, strides,
aliasing and empty tensors, with error messages for the user, and C++ re-checks what would
corrupt memory. Asserts state cheap internal invariants only (dtypes that the kernel
assumes equal, and so cannot check). Wrappers sit on the batch-1 decode path, where a call
costs microseconds of Python: plain positional parameters, no ``**kwargs``, no object built
per call.

Each wrapper looks ``_C.<name>`` up when it is called, never binding the function at import:
``ops.capture_cpu_graph`` records a decode step by swapping the attributes of ``_C`` for
recording versions while it captures.

A wrapper whose kernel may read a decode step's q, k or v inside one fused projection
(``PagedDecodePlan.run_packed``: qkv [B, (Hq + 2 Hkv) D]) takes the element offset of its
first row as a last ``*_offset`` argument (default 0) instead of a view, which would cost
more Python than the kernel call. The queries ``_C.isa()``, ``_C.set_isa()`` and ``_C.build_info()``,
which take no pointers, are called where they are needed.
"""

from __future__ import annotations

import torch

from .. import _C

try:  # CUDA builds of torch: the current stream's handle without a Stream object (as Triton does)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:

    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


# The dtype codes of csrc/common.h (keep in sync).
DTYPE_CODE = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.int8: 3,
    torch.int32: 4,
    torch.int64: 5,
}
_CODE = DTYPE_CODE

# silu_mul's ``activation``: csrc/cpu/silu_mul.h GatedActivation.
GATED_ACTIVATIONS = {"silu_mul": 0, "gelu_tanh_mul": 1}
# rows up to which _C.linear runs its per-row kernel, more its GEMM (csrc/cpu/linear.h)
LINEAR_ROW_KERNEL_MAX_M: int = _C.LINEAR_ROW_KERNEL_MAX_M

_num_threads = torch.get_num_threads


def wide_kernels() -> bool:
    """Whether the 16-lane AVX-512 variants of the CPU kernels run at the current ISA level
    (the "avx512vnni" level and above: the default on hosts with AVX-512 VNNI)."""
    return _C.build_info()["int8_gemm_isa"] == "avx512vnni"

# ---------------------------------------------------------------------------------------
# Norms (csrc/cpu/norms.h, csrc/cuda/norms.h). Tensors are [rows, hidden] rows ``*_stride``
# elements apart with a unit inner stride; x, residual and residual_out share x's dtype; out
# may be x (and residual_out residual): in place. weight (and bias) [hidden] have one dtype,
# x's or float32.


def rms_norm(out: torch.Tensor, out_stride: int, residual_out: torch.Tensor | None, residual_out_stride: int,
             x: torch.Tensor, x_stride: int, residual: torch.Tensor | None, residual_stride: int,
             weight: torch.Tensor | None, rows: int, hidden: int, eps: float, llama_cast: bool) -> None:
    """out [rows, hidden] <- RMSNorm(s) * weight, s = x, or s = x + residual (then also
    residual_out [rows, hidden] <- s); CPU tensors."""
    xp, xcode = x.data_ptr(), _CODE[x.dtype]
    rp = 0 if residual is None else residual.data_ptr()
    _C.rms_norm(
        xp if out is x else out.data_ptr(), out_stride,
        rp if residual_out is residual else 0 if residual_out is None else residual_out.data_ptr(),
        residual_out_stride,
        xp, x_stride, rp, residual_stride, 0 if weight is None else weight.data_ptr(), rows, hidden, eps,
        xcode, xcode if weight is None else _CODE[weight.dtype], xcode if out is x else _CODE[out.dtype],
        llama_cast, _num_threads(),
    )  # fmt: skip


def _on_device(entry, dev: torch.device, *args) -> None:
    """entry(*args, stream): a _C CUDA entry run on dev's current stream with dev current
    (its kernel launches on the current device). The device guard, a context manager of a
    few us, is entered only when another device is current."""
    current = torch.cuda.current_device()
    if dev.index is None or dev.index == current:
        entry(*args, _raw_stream(current))
        return
    with torch.cuda.device(dev):
        entry(*args, torch.cuda.current_stream(dev).cuda_stream)


def rms_norm_cuda(out: torch.Tensor, out_stride: int, residual_out: torch.Tensor | None, residual_out_stride: int,
                  x: torch.Tensor, x_stride: int, residual: torch.Tensor | None, residual_stride: int,
                  weight: torch.Tensor | None, rows: int, hidden: int, eps: float, llama_cast: bool) -> None:
    """``rms_norm`` for CUDA tensors (the CUDA C++ kernel), on x's device and its current stream."""
    xcode = _CODE[x.dtype]
    _on_device(
        _C.rms_norm_cuda, x.device,
        out.data_ptr(), out_stride, 0 if residual_out is None else residual_out.data_ptr(), residual_out_stride,
        x.data_ptr(), x_stride, 0 if residual is None else residual.data_ptr(), residual_stride,
        0 if weight is None else weight.data_ptr(), rows, hidden, eps,
        xcode, xcode if weight is None else _CODE[weight.dtype], _CODE[out.dtype], llama_cast,
    )  # fmt: skip


def _layer_norm_args(out, out_stride, residual_out, residual_out_stride, x, x_stride, residual, residual_stride,
                     weight, bias, rows, hidden, eps) -> tuple:
    """The pointer, size and dtype-code arguments that layer_norm and layer_norm_cuda share."""
    assert weight is None or bias is None or weight.dtype == bias.dtype  # one parameter dtype code
    param = weight if weight is not None else bias
    xcode = _CODE[x.dtype]
    return (
        out.data_ptr(), out_stride, 0 if residual_out is None else residual_out.data_ptr(), residual_out_stride,
        x.data_ptr(), x_stride, 0 if residual is None else residual.data_ptr(), residual_stride,
        0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(), rows, hidden, eps,
        xcode, xcode if param is None else _CODE[param.dtype], _CODE[out.dtype],
    )  # fmt: skip


def layer_norm(out: torch.Tensor, out_stride: int, residual_out: torch.Tensor | None, residual_out_stride: int,
               x: torch.Tensor, x_stride: int, residual: torch.Tensor | None, residual_stride: int,
               weight: torch.Tensor | None, bias: torch.Tensor | None, rows: int, hidden: int, eps: float) -> None:
    """out [rows, hidden] <- LayerNorm(s) * weight + bias, s = x, or s = x + residual (then
    also residual_out [rows, hidden] <- s); CPU tensors."""
    _C.layer_norm(*_layer_norm_args(out, out_stride, residual_out, residual_out_stride, x, x_stride, residual,
                                    residual_stride, weight, bias, rows, hidden, eps), _num_threads())  # fmt: skip


def layer_norm_cuda(out: torch.Tensor, out_stride: int, residual_out: torch.Tensor | None, residual_out_stride: int,
                    x: torch.Tensor, x_stride: int, residual: torch.Tensor | None, residual_stride: int,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, rows: int, hidden: int,
                    eps: float) -> None:
    """``layer_norm`` for CUDA tensors (the CUDA C++ kernel), on x's device and its current stream."""
    args = _layer_norm_args(out, out_stride, residual_out, residual_out_stride, x, x_stride, residual,
                            residual_stride, weight, bias, rows, hidden, eps)  # fmt: skip
    _on_device(_C.layer_norm_cuda, x.device, *args)


# ---------------------------------------------------------------------------------------
# Elementwise and GEMM kernels (CPU)


def _at(t: torch.Tensor, offset: int) -> int:
    """The address of element ``offset`` of t's storage view (t's data pointer + offset)."""
    return t.data_ptr() + offset * t.element_size() if offset else t.data_ptr()


def rotary_embedding(x: torch.Tensor, token_stride: int, head_stride: int, tokens: int, heads: int, head_dim: int,
                     positions: torch.Tensor, cache: torch.Tensor, cache_stride: int, max_positions: int,
                     rot_dim: int, gptj: bool, x_offset: int = 0) -> None:
    """Rotate x [tokens, heads, head_dim] (token / head strides in elements, unit inner
    stride; starting x_offset elements into x) in place: the first rot_dim dims of each head
    by the angles of its token's position. positions [tokens] int64 contiguous; cache
    [max_positions, rot_dim] float32 (cos | sin), rows cache_stride apart."""
    _C.rotary_embedding(_at(x, x_offset), token_stride, head_stride, tokens, heads, head_dim, positions.data_ptr(),
                        cache.data_ptr(), cache_stride, max_positions, rot_dim, gptj, _CODE[x.dtype],
                        _num_threads())  # fmt: skip


def silu_mul(out: torch.Tensor, out_stride: int, x: torch.Tensor, x_stride: int, rows: int, d: int,
             activation: str) -> None:
    """out [rows, d] <- act(x[:, :d]) * x[:, d:] for x [rows, 2 d], both one dtype; activation
    is a key of GATED_ACTIVATIONS ("silu_mul": SwiGLU, "gelu_tanh_mul": GeGLU-tanh)."""
    assert out.dtype is x.dtype  # the kernel takes one dtype code for both
    _C.silu_mul(out.data_ptr(), out_stride, x.data_ptr(), x_stride, rows, d, _CODE[x.dtype], _num_threads(),
                GATED_ACTIVATIONS[activation])  # fmt: skip


def linear(out: torch.Tensor, out_stride: int, x: torch.Tensor, x_stride: int, weight: torch.Tensor, w_stride: int,
           bias: torch.Tensor | None, m: int, n: int, k: int) -> None:
    """out [m, n] <- x [m, k] @ weight [n, k]^T + bias [n] (fp32 accumulation). x, out: float
    rows; weight float32 / bfloat16 rows; bias float or None. With k == 0 nothing is read
    from x and weight (out = bias, or 0)."""
    _C.linear(
        out.data_ptr(), out_stride, _CODE[out.dtype], x.data_ptr(), x_stride, _CODE[x.dtype],
        weight.data_ptr(), w_stride, _CODE[weight.dtype],
        0 if bias is None else bias.data_ptr(), 0 if bias is None else _CODE[bias.dtype], m, n, k, _num_threads(),
    )  # fmt: skip


def quantize_per_token(q: torch.Tensor, q_stride: int, scale: torch.Tensor, x: torch.Tensor, x_stride: int,
                       rows: int, k: int) -> None:
    """q [rows, k] int8 and scale [rows] float32 (contiguous) <- symmetric per-row
    quantization of x [rows, k] (float)."""
    assert q.dtype is torch.int8 and scale.dtype is torch.float32
    _C.quantize_per_token(q.data_ptr(), q_stride, scale.data_ptr(), x.data_ptr(), x_stride, rows, k, _CODE[x.dtype],
                          _num_threads())  # fmt: skip


def int8_packed_size(n: int, k: int) -> int:
    """Bytes of int8_pack_b's packed form of b [n, k]."""
    return _C.int8_packed_size(n, k)


def int8_pack_b(packed: torch.Tensor, b: torch.Tensor, b_stride: int, n: int, k: int) -> bool:
    """packed [int8_packed_size(n, k)] int8 <- b [n, k] int8 (rows b_stride apart) in the GEMM
    kernel's layout. Returns whether b holds -128 (int8_gemm_packed then needs b itself)."""
    assert packed.dtype is torch.int8 and b.dtype is torch.int8 and packed.numel() >= int8_packed_size(n, k)
    return bool(_C.int8_pack_b(packed.data_ptr(), b.data_ptr(), b_stride, n, k))


def int8_gemm_packed(out: torch.Tensor, out_stride: int, a: torch.Tensor, a_stride: int, packed: torch.Tensor,
                     b: torch.Tensor, b_stride: int, b_has_min: bool, a_scale: torch.Tensor | None,
                     b_scale: torch.Tensor | None, bias: torch.Tensor | None, m: int, n: int, k: int) -> None:
    """out [m, n] <- a [m, k] int8 @ b [n, k] int8^T in exact int32 (out int32), or scaled:
    a_scale [m][:, None] * b_scale [n] * acc + bias [n] (out float; scales and bias float32,
    contiguous). packed: int8_pack_b(b); b itself for the exact path when b holds -128."""
    assert a.dtype is torch.int8 and b.dtype is torch.int8
    assert (out.dtype is torch.int32) == (a_scale is None)  # a raw product has no scales
    _C.int8_gemm_packed(
        out.data_ptr(), out_stride, _CODE[out.dtype], a.data_ptr(), a_stride, packed.data_ptr(), b.data_ptr(),
        b_stride, b_has_min, 0 if a_scale is None else a_scale.data_ptr(), 0 if b_scale is None else b_scale.data_ptr(),
        0 if bias is None else bias.data_ptr(), m, n, k, _num_threads(),
    )  # fmt: skip


def int8_weight_only_linear(out: torch.Tensor, out_stride: int, x: torch.Tensor, x_stride: int, w: torch.Tensor,
                            w_stride: int, w_scale: torch.Tensor, scale_stride: int, group_size: int,
                            bias: torch.Tensor | None, m: int, n: int, k: int) -> None:
    """out [m, n] (float) <- x [m, k] float32 @ (w [n, k] int8 * scale)^T + bias [n] float32.
    group_size 0: w_scale [n] float32, one scale per row; else w_scale [n, ceil(k /
    group_size)] rows scale_stride apart, one scale per group_size columns."""
    _C.int8_weight_only_linear(
        out.data_ptr(), out_stride, _CODE[out.dtype], x.data_ptr(), x_stride, w.data_ptr(), w_stride,
        w_scale.data_ptr(), scale_stride, group_size, 0 if bias is None else bias.data_ptr(), m, n, k, _num_threads(),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Attention and the KV cache (csrc/cpu/attention.h). Strides are in elements, as tuples in
# the kernel's order; every head row has a unit inner stride; all float tensors of one call
# share q's (k's for write_kv) dtype. Integer tensors: cu_seqlens, block_table and seq_lens
# int32, slot_mapping int64, contiguous.


def attention(out: torch.Tensor, out_strides: tuple, lse: torch.Tensor | None, lse_strides: tuple, q: torch.Tensor,
              q_strides: tuple, k: torch.Tensor, k_strides: tuple, v: torch.Tensor, v_strides: tuple,
              cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, batch: int, seqlen_q: int,
              seqlen_k: int, num_q_heads: int, num_kv_heads: int, head_dim: int, causal: bool, scale: float,
              softcap: float, window: int) -> None:
    """out [B, Hq, Sq, D] <- softmax(scale * q k^T [softcapped] [causal] [windowed]) v, and
    lse [B, Hq, Sq] float32 (None: not written); k, v [B, Hkv, Sk, D]. Strides (batch, head,
    position). Varlen: cu_seqlens_q / cu_seqlens_k [B + 1] (both or neither), the batch
    strides 0 and seqlen_q / seqlen_k the packed lengths. softcap 0 / window 0: none."""
    assert (cu_seqlens_q is None) == (cu_seqlens_k is None)
    _C.attention(
        out.data_ptr(), *out_strides, 0 if lse is None else lse.data_ptr(), *lse_strides,
        q.data_ptr(), *q_strides, k.data_ptr(), *k_strides, v.data_ptr(), *v_strides,
        0 if cu_seqlens_q is None else cu_seqlens_q.data_ptr(), 0 if cu_seqlens_k is None else cu_seqlens_k.data_ptr(),
        batch, seqlen_q, seqlen_k, num_q_heads, num_kv_heads, head_dim, causal, scale, softcap, window,
        _CODE[q.dtype], _num_threads(),
    )  # fmt: skip


def decode_attention(out: torch.Tensor, out_strides: tuple, q: torch.Tensor, q_strides: tuple, k: torch.Tensor,
                     k_strides: tuple, v: torch.Tensor, v_strides: tuple, block_table: torch.Tensor | None,
                     bt_stride: int, max_blocks: int, block_size: int, num_blocks: int, seq_lens: torch.Tensor,
                     batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: float, softcap: float,
                     window: int, split_size: int, q_offset: int = 0) -> None:
    """out [B, Hq, D] <- attention of q [B, Hq, D] (strides (batch, head); starting q_offset
    elements into q) over the first seq_lens[b] keys of its cache, the last ``window`` of
    them with window > 0. Paged: k, v [num_blocks, Hkv, block_size, D] and block_table [B,
    max_blocks] (rows bt_stride apart); contiguous: k, v [B, Hkv, S_max, D], block_table
    None (block_size = S_max, max_blocks 1). Cache strides (block, head, position); keys are
    split split_size at a time (flash-decoding)."""
    _C.decode_attention(
        out.data_ptr(), *out_strides, _at(q, q_offset), *q_strides, k.data_ptr(), *k_strides, v.data_ptr(), *v_strides,
        0 if block_table is None else block_table.data_ptr(), bt_stride, max_blocks, block_size, num_blocks,
        seq_lens.data_ptr(), batch, num_q_heads, num_kv_heads, head_dim, scale, softcap, window, _CODE[q.dtype],
        split_size, _num_threads(),
    )  # fmt: skip


def write_kv(k_cache: torch.Tensor, k_cache_strides: tuple, v_cache: torch.Tensor, v_cache_strides: tuple,
             k: torch.Tensor, k_strides: tuple, v: torch.Tensor, v_strides: tuple, slot_mapping: torch.Tensor,
             tokens: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int, k_offset: int = 0,
             v_offset: int = 0) -> None:
    """Store k, v [tokens, Hkv, D] (strides (token, head); starting k_offset / v_offset
    elements in) into the caches [num_blocks, Hkv, block_size, D] (strides (block, head,
    position)): token t to slot slot_mapping[t] (block s // block_size, position s %
    block_size; -1 skips it). Row copies, on one thread."""
    assert k.dtype is k_cache.dtype and slot_mapping.dtype is torch.int64
    _C.write_kv(
        k_cache.data_ptr(), *k_cache_strides, v_cache.data_ptr(), *v_cache_strides, _at(k, k_offset), *k_strides,
        _at(v, v_offset), *v_strides, slot_mapping.data_ptr(), tokens, num_kv_heads, head_dim, num_blocks,
        block_size, _CODE[k.dtype],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Memory and machine-limit probes (csrc/cpu/memory.h, csrc/cpu/limits.h)


def advise_hugepages(t: torch.Tensor) -> int:
    """Ask for transparent huge pages under a fresh CPU tensor t (before it is first
    touched); returns the bytes advised."""
    return _C.advise_hugepages(t.data_ptr(), t.numel() * t.element_size())


def probe_copy(dst: torch.Tensor, src: torch.Tensor, nbytes: int, num_threads: int) -> None:
    """dst[:nbytes] <- src[:nbytes] (bytes), AVX2 loads and non-temporal stores."""
    assert dst.nbytes >= nbytes and src.nbytes >= nbytes
    _C.probe_copy(dst.data_ptr(), src.data_ptr(), nbytes, num_threads)


def probe_read(src: torch.Tensor, nbytes: int, num_threads: int) -> int:
    """Read nbytes of src; returns a checksum (the number of int32 read)."""
    assert src.nbytes >= nbytes
    return _C.probe_read(src.data_ptr(), nbytes, num_threads)


def probe_fma(iters: int, num_threads: int) -> float:
    """The fp32 FMA loop; returns a checksum."""
    return _C.probe_fma(iters, num_threads)


def probe_fma_flops_per_iter(num_threads: int) -> int:
    return _C.probe_fma_flops_per_iter(num_threads)


def probe_fma_lanes() -> int:
    """Lanes of probe_fma's chains: 16 at the avx512vnni level, 8 at avx2, 1 scalar."""
    return _C.probe_fma_lanes()


def probe_int8_dot(iters: int, num_threads: int) -> int:
    """The int8 dot loop on the int8 GEMM's path; returns the sum of all products."""
    return _C.probe_int8_dot(iters, num_threads)


def probe_int8_ops_per_iter(num_threads: int) -> int:
    return _C.probe_int8_ops_per_iter(num_threads)


# ---------------------------------------------------------------------------------------
# Ring all-reduce transports (csrc/cpu/allreduce.h, csrc/cuda/allreduce.h): handles are
# opaque ints; a run returns a status (0 ok; see ringfuse.distributed.allreduce).


def shm_ring_open(name: str, rank: int, world: int, create: bool, slot_bytes: int) -> int:
    return _C.shm_ring_open(name, rank, world, create, slot_bytes)


def shm_ring_unlink(name: str) -> None:
    _C.shm_ring_unlink(name)


def shm_ring_close(handle: int) -> None:
    _C.shm_ring_close(handle)


def shm_ring_run(handle: int, kind: int, data: torch.Tensor, op: int, timeout_ms: int, num_threads: int) -> int:
    """One collective in place on data (contiguous, CPU); returns the ring's status."""
    return _C.shm_ring_run(handle, kind, data.data_ptr(), data.numel(), _CODE[data.dtype], op, timeout_ms, num_threads)


def shm_ring_last_error(handle: int) -> str:
    return _C.shm_ring_last_error(handle)


def nccl_load(path: str) -> int:
    """Load libnccl.so.2 from path; returns its version code."""
    return _C.nccl_load(path)


def nccl_unique_id() -> bytes:
    return _C.nccl_unique_id()


def nccl_comm_open(unique_id: bytes, rank: int, world: int, device: int, piece_bytes: int, timeout_ms: int) -> int:
    return _C.nccl_comm_open(unique_id, rank, world, device, piece_bytes, timeout_ms)


def nccl_comm_close(handle: int, abort: bool) -> None:
    _C.nccl_comm_close(handle, abort)


def nccl_ring_run(handle: int, kind: int, data: torch.Tensor, op: int, timeout_ms: int) -> int:
    """One collective in place on data (contiguous, CUDA), on its device's current stream;
    returns the ring's status."""
    stream = torch.cuda.current_stream(data.device).cuda_stream
    return _C.nccl_ring_run(handle, kind, data.data_ptr(), data.numel(), _CODE[data.dtype], op, stream, timeout_ms)


def nccl_last_error(handle: int) -> str:
    return _C.nccl_last_error(handle)
