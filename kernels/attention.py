"""Attention forward in Triton: FlashAttention-2 prefill, split-K (flash-decoding) decode
over a contiguous KV cache, and the same decode over a paged (vLLM-style) KV cache.

Shared numerics: inputs fp32 / fp16 / bf16, all math in fp32, online softmax in base 2
(scores are multiplied by log2(e) once; lse is converted back to natural log). Scores are
s = scale * q.k, then (softcap) s = softcap * tanh(s / softcap) (Gemma-2). GQA: query head
h reads kv head h // (Hq // Hkv); nothing is repeated in memory. head_dim D <= 256 is
padded to a power-of-two BLOCK_D >= 32 with masks (80 and 96 run in the 128 bucket).

Kernels
- ``_flash_attn_fwd_kernel``: grid (cdiv(Sq, BLOCK_M), B * Hq). A program holds a
  [BLOCK_M, BLOCK_D] query tile and walks the keys in BLOCK_N tiles: S = Q K^T (tl.dot,
  fp32 accumulate), running max m / sum l / acc rescaled per tile, acc += P V with P
  rounded to the input dtype (as FlashAttention-2 does; fp32 inputs use IEEE fp32 dots,
  not tf32). Causal is bottom-right aligned (key j visible to query i iff j <= i + Sk - Sq);
  the key loop stops at the last visible key of the tile. A row with no visible key
  writes zeros and lse = -inf.
- ``_decode_attn_stage1_kernel`` / ``_paged_decode_attn_stage1_kernel``: grid
  (B * Hkv * cdiv(group, 16), num_splits). A program serves the query heads of one kv head
  (a GQA group, padded to 16 rows; a bigger group takes several programs), so each K/V tile
  is read once for the whole group. Sequence b's keys [0, len) are cut into num_splits
  ranges of split_len = round_up(cdiv(len, num_splits), BLOCK_N) keys; a program walks its
  range in BLOCK_N tiles with two tensor-core dots per tile (S = Q K^T on [16, D] x
  [D, BLOCK_N]; acc += P V with P rounded to the input dtype, as in the prefill kernel)
  and writes each head's unnormalized (m, l, acc) to fp32 scratch. The paged kernel
  differs only in how a tile's key addresses are formed (block_table gather per key); the
  tile math is the shared ``_decode_tile`` helper, the split boundaries and tiles are the
  same functions of (len, num_splits, BLOCK_N), so paged and contiguous results are
  bitwise identical. The default split count fills the GPU (``default_num_splits``).
- ``_decode_attn_stage2_kernel``: grid (B * Hq,). Merges the splits in index order
  (deterministic): out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M). len 0 -> zeros.

Napkin math (bf16, B*Hq = H heads, Hkv kv heads):
  prefill: flops ~ 4 * B * Hq * Sq * Sk * D (half with causal, Sq = Sk); bytes ~
           2 * B * Hq * Sq * D * 2 (q read, out write) + K/V re-read per query tile, mostly
           from L2. Compute-bound for Sq >= a few hundred: the target is the tensor-core
           peak (312 TFLOP/s A100 bf16 dense; FA2 reaches 50-70% of it).
  decode:  bytes ~ 2 * B * Hkv * len * D * 2 (K and V once, for the whole group) + scratch
           B * Hq * splits * (D + 2) * 4 * 2; flops ~ 4 * B * Hq * len * D: ~1 flop per byte
           per group member, memory-bound, the target is HBM bandwidth (2.0 TB/s A100-80G,
           3.35 TB/s H100 SXM, 4.8 TB/s H200). B 1, Llama-3-8B (32 / 8 heads, D 128), len
           4096: 16.8 MB of K/V, ~4 us at 4.2 TB/s; 16 splits of 256 keys, 128 programs,
           0.5 MB of scratch written and read back.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import device_errors
from ._launch import cdiv, is_aligned, launch

# the device_errors bits, as constants the kernels can name
_ERR_SEQ_LENS = device_errors.slot(device_errors.SEQ_LENS)
_ERR_BLOCK_TABLE = device_errors.slot(device_errors.BLOCK_TABLE)
_ERR_SLOT_MAPPING = device_errors.slot(device_errors.SLOT_MAPPING)
_ERR_CU_SEQLENS = device_errors.slot(device_errors.CU_SEQLENS)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
MAX_HEAD_DIM = 256
MIN_BLOCK_D = 32  # tl.dot needs K >= 16; 32 keeps one variant for the tiny head dims
BLOCK_D_BUCKETS = (32, 64, 128, 256)
# Decode: a program serves DECODE_HEADS query heads of one kv head (a GQA group, padded;
# a bigger group takes several programs), so it reads each K/V tile once for the group.
DECODE_HEADS = 16  # tl.dot's smallest M
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # 4-16 tiles: the pipeline's prologue and the partial's store amortized
DECODE_TARGET_PROGRAMS = 256  # ~2 per SM of an H100 / H200 (132 SMs), 2.4 of an A100 (108)


@triton.jit
def _tanh(x):
    """tanh in fp32: odd Taylor polynomial (to x^11) for |x| < 0.25, where 1 - e^(-2|x|)
    would cancel; (1 - t) / (1 + t) with t = e^(-2|x|) <= 0.61 elsewhere (no cancellation,
    no overflow). Relative error ~1e-7 (libdevice tanh is not available to the interpreter)."""
    a = tl.abs(x)
    t = tl.exp2(a * -2.8853900817779268)  # e^(-2|x|)
    big = (1.0 - t) / (1.0 + t)
    x2 = x * x
    poly = -0.0088632355299021966 * x2 + 0.021869488536155203  # -1382/155925, 62/2835
    poly = poly * x2 - 0.053968253968253971  # -17/315
    poly = poly * x2 + 0.13333333333333333  # 2/15
    poly = poly * x2 - 0.33333333333333333  # -1/3
    small = x + x * x2 * poly
    return tl.where(a < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _flash_attn_fwd_kernel(
    out_ptr,  # *dtype [B, Hq, Sq, D]: output
    o_sb, o_sh, o_sm,  # strides of out (inner stride 1)
    q_ptr,  # *dtype [B, Hq, Sq, D]: queries
    q_sb, q_sh, q_sm,  # strides of q
    k_ptr,  # *dtype [B, Hkv, Sk, D]: keys
    k_sb, k_sh, k_sn,  # strides of k
    v_ptr,  # *dtype [B, Hkv, Sk, D]: values
    v_sb, v_sh, v_sn,  # strides of v
    lse_ptr,  # *fp32 [B, Hq, Sq]: natural-log LSE of the scores (unused unless HAS_LSE)
    l_sb, l_sh, l_sm,  # strides of lse
    seqs_ptr,  # *i32 [B, 4]: VARLEN (q row, q rows, k row, k rows) per sequence, checked by _varlen_check_kernel
    Hq,  # query heads
    group,  # Hq // Hkv
    Sq,  # query length (unused with VARLEN)
    Sk,  # key length (unused with VARLEN)
    D,  # head dim (<= BLOCK_D)
    qk_scale,  # fp32: scale * log2(e), or scale / softcap with SOFTCAP
    softcap_log2,  # fp32: softcap * log2(e) (unused unless SOFTCAP)
    window,  # WINDOW: query i sees keys j > i + diag - window too (unused otherwise)
    CAUSAL: tl.constexpr,  # bottom-right aligned causal mask
    WINDOW: tl.constexpr,  # a sliding window (CAUSAL only): a flag so that other variants keep their registers
    SOFTCAP: tl.constexpr,  # s = softcap * tanh(s / softcap)
    HAS_LSE: tl.constexpr,  # write lse
    VARLEN: tl.constexpr,  # packed sequences: Sq / Sk and row offsets come from cu_q / cu_k
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (the interpreter's bf16 dot is wrong)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 32
):  # fmt: skip
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    kvh = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    q_base = q_ptr + b * q_sb + h * q_sh
    k_base = k_ptr + b * k_sb + kvh * k_sh
    v_base = v_ptr + b * v_sb + kvh * v_sh
    if VARLEN:  # the batch strides are 0; move the bases to the sequence's first row
        q_start = tl.load(seqs_ptr + b * 4).to(tl.int64)
        Sq = tl.load(seqs_ptr + b * 4 + 1)
        k_start = tl.load(seqs_ptr + b * 4 + 2).to(tl.int64)
        Sk = tl.load(seqs_ptr + b * 4 + 3)
        q_base += q_start * q_sm
        k_base += k_start * k_sn
        v_base += k_start * v_sn

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m_mask = offs_m < Sq
    q = tl.load(q_base + offs_m[:, None] * q_sm + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = Sk - Sq  # query i sees key j iff j <= i + diag (and j > i + diag - window)
    lo = 0
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Sk, start_m * BLOCK_M + BLOCK_M + diag), 0)
        if WINDOW:  # from the tile of the first key the first query sees
            lo = tl.maximum(start_m * BLOCK_M + diag - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = Sk
    if VARLEN:  # the grid covers the longest sequence: tiles past this one's end do nothing
        hi = tl.where(start_m * BLOCK_M < Sq, hi, 0)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_mask = offs_n < Sk
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * k_sn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * v_sn + offs_d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        if SOFTCAP:
            s = softcap_log2 * _tanh(qk * qk_scale)
        else:
            s = qk * qk_scale
        valid = n_mask[None, :]
        if CAUSAL:
            if WINDOW:  # 0 <= i + diag - j < window as one unsigned compare (as many registers as causal)
                dist = offs_m[:, None] + diag - offs_n[None, :]  # how far back key j is from query i
                valid = valid & (dist.to(tl.uint32) < window.to(tl.uint32))
            else:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: no NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        p_in = p.to(v_ptr.dtype.element_ty)
        if DOT_FP32:
            acc = tl.dot(p_in.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p_in, v, acc, input_precision="ieee")
        m_i = m_new

    has_any = l_i > 0.0
    l_safe = tl.where(has_any, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_base = out_ptr + b * o_sb + h * o_sh
    lse_base = lse_ptr + b * l_sb + h * l_sh
    if VARLEN:  # re-read rather than keep the offset live through the key loop (registers)
        q_start = tl.load(seqs_ptr + b * 4).to(tl.int64)
        o_base += q_start * o_sm
        lse_base += q_start * l_sm
    tl.store(o_base + offs_m[:, None] * o_sm + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])  # fmt: skip
    if HAS_LSE:
        lse = tl.where(has_any, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_base + offs_m * l_sm, lse, mask=m_mask)


@triton.jit
def _decode_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, softcap_log2, SOFTCAP: tl.constexpr,
                 DOT_FP32: tl.constexpr):  # fmt: skip
    """One BLOCK_N tile of online softmax for the BLOCK_H query heads of one kv head:
    q [BLOCK_H, BLOCK_D] (fp32 with DOT_FP32, else the input dtype; padding rows 0), k / v
    [BLOCK_N, BLOCK_D] (masked lanes 0), n_valid [BLOCK_N]; m_i / l_i [BLOCK_H] (base 2),
    acc [BLOCK_H, BLOCK_D] fp32. Both products are tensor-core dots (S = Q K^T, acc += P V
    with P rounded to the input dtype first, as FlashAttention-2's prefill does), so the
    tile is read once for the whole group and no cross-thread sum over D or over keys is
    left to do by hand."""
    if DOT_FP32:
        qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    if SOFTCAP:
        s = softcap_log2 * _tanh(qk * qk_scale)
    else:
        s = qk * qk_scale
    s = tl.where(n_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid key
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p_in = p.to(v.dtype)
    if DOT_FP32:
        acc = tl.dot(p_in.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p_in, v, acc, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _decode_heads(pid, Hq, group, BLOCK_H: tl.constexpr):
    """Program pid of grid dim 0 (B * Hkv * cdiv(group, BLOCK_H)): its sequence b, kv head,
    the BLOCK_H query heads it serves (kvh * group + member), which of them exist, and
    whether it is the sequence's first program."""
    head_blocks = tl.cdiv(group, BLOCK_H)
    hkv = Hq // group
    b = pid // (hkv * head_blocks)
    rest = pid % (hkv * head_blocks)
    kvh = rest // head_blocks
    member = (rest % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    return b, kvh, kvh * group + member, member < group, rest == 0


@triton.jit
def _load_q_heads(q_ptr, b, q_sb, q_sh, heads, h_mask, d_mask, DOT_FP32: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * q_sb + heads[:, None].to(tl.int64) * q_sh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
    if DOT_FP32:
        q = q.to(tl.float32)
    return q


@triton.jit
def _store_partials(mid_o_ptr, mid_ml_ptr, b, Hq, heads, h_mask, num_splits, split, m_i, l_i, acc,
                    BLOCK_D: tl.constexpr):  # fmt: skip
    """The (m, l, acc) of this split for each served head: row (b * Hq + h) * num_splits + split."""
    offs_d = tl.arange(0, BLOCK_D)
    row = ((b * Hq + heads).to(tl.int64)) * num_splits + split
    tl.store(mid_o_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=h_mask[:, None])
    tl.store(mid_ml_ptr + row * 2, m_i, mask=h_mask)
    tl.store(mid_ml_ptr + row * 2 + 1, l_i, mask=h_mask)


@triton.jit
def _split_range(seq_len, window, split, num_splits, BLOCK_N: tl.constexpr):
    """[start, end) of this split's keys, of the last min(len, window) ones: split_len =
    round_up(cdiv(keys, splits), BLOCK_N)."""
    first = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(tl.cdiv(seq_len - first, num_splits), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    return start, end


@triton.jit
def _checked_seq_len(ptr, capacity, err_ptr, reporter):
    """seq_lens[b], or 0 (a zero row) with the flag raised (by the reporter program) when
    it lies outside [0, capacity]."""
    seq_len = tl.load(ptr)
    bad = (seq_len < 0) | (seq_len > capacity)
    device_errors.raise_if(err_ptr, _ERR_SEQ_LENS, bad & reporter)
    return tl.where(bad, 0, seq_len)


@triton.jit
def _decode_attn_stage1_kernel(
    mid_o_ptr,  # *fp32 [B, Hq, num_splits, BLOCK_D]: unnormalized partial acc per split
    mid_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial (max in log2 units, sum) per split
    q_ptr,  # *dtype [B, Hq, D]: the new token's queries
    q_sb, q_sh,  # strides of q
    k_ptr,  # *dtype [B, Hkv, S_max, D]: key cache
    k_sb, k_sh, k_sn,  # strides of k_cache
    v_ptr,  # *dtype [B, Hkv, S_max, D]: value cache
    v_sb, v_sh, v_sn,  # strides of v_cache
    seq_lens_ptr,  # *i32 [B]: valid keys per sequence
    capacity,  # S_max: a seq_len outside [0, S_max] is refused
    err_ptr,  # *i32 [1]: device_errors flag
    Hq,  # query heads
    group,  # Hq // Hkv
    D,  # head dim
    num_splits,  # splits per sequence (grid dim 1)
    qk_scale,  # fp32: scale * log2(e), or scale / softcap with SOFTCAP
    softcap_log2,  # fp32: softcap * log2(e) (unused unless SOFTCAP)
    window,  # the token sees the last `window` keys (NO_WINDOW: all)
    SOFTCAP: tl.constexpr,  # s = softcap * tanh(s / softcap)
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (the interpreter's bf16 dot is wrong)
    BLOCK_H: tl.constexpr,  # query heads per program (one kv head's group, padded)
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 32
):  # fmt: skip
    split = tl.program_id(1)
    b, kvh, heads, h_mask, first = _decode_heads(tl.program_id(0), Hq, group, BLOCK_H)
    seq_len = _checked_seq_len(seq_lens_ptr + b, capacity, err_ptr, (split == 0) & first)
    b = b.to(tl.int64)
    kvh = kvh.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = _load_q_heads(q_ptr, b, q_sb, q_sh, heads, h_mask, d_mask, DOT_FP32, BLOCK_D)  # [BLOCK_H, BLOCK_D]
    k_base = k_ptr + b * k_sb + kvh * k_sh
    v_base = v_ptr + b * v_sb + kvh * v_sh
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    start, end = _split_range(seq_len, window, split, num_splits, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * k_sn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * v_sn + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _decode_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, softcap_log2, SOFTCAP, DOT_FP32)
    _store_partials(mid_o_ptr, mid_ml_ptr, b, Hq, heads, h_mask, num_splits, split, m_i, l_i, acc, BLOCK_D)


@triton.jit
def _paged_decode_attn_stage1_kernel(
    mid_o_ptr,  # *fp32 [B, Hq, num_splits, BLOCK_D]: unnormalized partial acc per split
    mid_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial (max in log2 units, sum) per split
    q_ptr,  # *dtype [B, Hq, D]: the new token's queries
    q_sb, q_sh,  # strides of q
    k_ptr,  # *dtype [num_blocks, Hkv, block_size, D]: key pages
    k_sblk, k_sh, k_sn,  # strides of k_pages
    v_ptr,  # *dtype [num_blocks, Hkv, block_size, D]: value pages
    v_sblk, v_sh, v_sn,  # strides of v_pages
    bt_ptr,  # *i32 [B, max_blocks]: physical block of logical block i of sequence b
    bt_sb,  # row stride of block_table (inner stride 1)
    seq_lens_ptr,  # *i32 [B]: valid keys per sequence, checked by _paged_check_kernel (0: a bad sequence)
    block_size,  # keys per page
    Hq,  # query heads
    group,  # Hq // Hkv
    D,  # head dim
    num_splits,  # splits per sequence (grid dim 1)
    qk_scale,  # fp32: scale * log2(e), or scale / softcap with SOFTCAP
    softcap_log2,  # fp32: softcap * log2(e) (unused unless SOFTCAP)
    window,  # the token sees the last `window` keys (NO_WINDOW: all)
    SOFTCAP: tl.constexpr,  # s = softcap * tanh(s / softcap)
    DOT_FP32: tl.constexpr,  # upcast dot operands to fp32 (the interpreter's bf16 dot is wrong)
    BLOCK_H: tl.constexpr,  # query heads per program (one kv head's group, padded)
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 32
):  # fmt: skip
    split = tl.program_id(1)
    b, kvh, heads, h_mask, _ = _decode_heads(tl.program_id(0), Hq, group, BLOCK_H)
    seq_len = tl.load(seq_lens_ptr + b)
    b = b.to(tl.int64)
    kvh = kvh.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = _load_q_heads(q_ptr, b, q_sb, q_sh, heads, h_mask, d_mask, DOT_FP32, BLOCK_D)  # [BLOCK_H, BLOCK_D]
    bt_row = bt_ptr + b * bt_sb
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    start, end = _split_range(seq_len, window, split, num_splits, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        phys = tl.load(bt_row + offs_n // block_size, mask=n_valid, other=0).to(tl.int64)
        slot = (offs_n % block_size).to(tl.int64)
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k_row = phys * k_sblk + kvh * k_sh + slot * k_sn
        v_row = phys * v_sblk + kvh * v_sh + slot * v_sn
        k = tl.load(k_ptr + k_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _decode_tile(q, k, v, n_valid, m_i, l_i, acc, qk_scale, softcap_log2, SOFTCAP, DOT_FP32)
    _store_partials(mid_o_ptr, mid_ml_ptr, b, Hq, heads, h_mask, num_splits, split, m_i, l_i, acc, BLOCK_D)


@triton.jit
def _paged_check_kernel(
    checked_ptr,  # *i32 [B]: out: seq_lens[b], or 0 where it or a block id it uses is out of range
    seq_lens_ptr,  # *i32 [B]
    bt_ptr,  # *i32 [B, max_blocks]
    bt_sb,  # row stride of block_table
    max_blocks,  # columns of block_table
    block_size,  # keys per page
    num_blocks,  # pages
    window,  # the keys read are the last `window` (NO_WINDOW: all)
    err_ptr,  # *i32 [device_errors.SLOTS]: the device's flag
    BLOCK: tl.constexpr,  # block ids per step
):  # fmt: skip
    """Grid (B,): the value checks of the paged decode, in their own kernel so that stage 1
    keeps its registers: the ids of the blocks stage 1 will read (those of keys [max(len -
    window, 0), len)) must lie in [0, num_blocks), len in [0, max_blocks * block_size]. A
    sequence that fails gets length 0 (a zero row) and raises the flag. Reads ~4 bytes per
    block_size keys: 1/1000 of the keys' bytes at block 16, D 128, bf16."""
    b = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + b)
    bad_len = (seq_len < 0) | (seq_len > max_blocks * block_size)
    device_errors.raise_if(err_ptr, _ERR_SEQ_LENS, bad_len)
    end = tl.where(bad_len, 0, tl.cdiv(seq_len, block_size))  # blocks [first, end) are read
    first = tl.maximum(seq_len - window, 0) // block_size
    row = bt_ptr + b.to(tl.int64) * bt_sb
    bad_ids = tl.zeros([BLOCK], dtype=tl.int32)
    for i0 in range(first, end, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ids = tl.load(row + offs, mask=offs < end, other=0)
        bad_ids = tl.maximum(bad_ids, ((offs < end) & (ids.to(tl.uint32) >= num_blocks)).to(tl.int32))
    bad_id = tl.max(bad_ids, 0) > 0
    device_errors.raise_if(err_ptr, _ERR_BLOCK_TABLE, bad_id)
    tl.store(checked_ptr + b, tl.where(bad_len | bad_id, 0, seq_len))


@triton.jit
def _varlen_check_kernel(
    seqs_ptr,  # *i32 [B, 4]: out: (q row, q rows, k row, k rows) per sequence; rows 0 where bad
    cu_q_ptr,  # *i32 [B + 1]: query offsets
    cu_k_ptr,  # *i32 [B + 1]: key offsets
    batch,  # B
    total_q,  # Tq: rows of q
    total_k,  # Tk: rows of k
    max_rows,  # query rows the flash grid covers per sequence
    err_ptr,  # *i32 [device_errors.SLOTS]: the device's flag
    BLOCK: tl.constexpr,  # sequences per program
):  # fmt: skip
    """Grid (cdiv(B, BLOCK),): cu_seqlens start at 0, never decrease, stay inside the packed
    tensors, and no query run is longer than the grid covers; a sequence that fails gets no
    rows (the flash kernel writes nothing for it) and raises the flag."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = b < batch
    q0 = tl.load(cu_q_ptr + b, mask=live, other=0)
    q1 = tl.load(cu_q_ptr + b + 1, mask=live, other=0)
    k0 = tl.load(cu_k_ptr + b, mask=live, other=0)
    k1 = tl.load(cu_k_ptr + b + 1, mask=live, other=0)
    bad = ((q0 < 0) | (q1 < q0) | (q1 > total_q) | (k0 < 0) | (k1 < k0) | (k1 > total_k) | (q1 - q0 > max_rows)
           | ((b == 0) & ((q0 != 0) | (k0 != 0))))  # fmt: skip
    bad = bad & live
    device_errors.raise_if(err_ptr, _ERR_CU_SEQLENS, tl.max(bad.to(tl.int32), 0) > 0)
    row = seqs_ptr + b * 4
    tl.store(row, q0, mask=live)
    tl.store(row + 1, tl.where(bad, 0, q1 - q0), mask=live)
    tl.store(row + 2, k0, mask=live)
    tl.store(row + 3, tl.where(bad, 0, k1 - k0), mask=live)


@triton.jit
def _decode_attn_stage2_kernel(
    out_ptr,  # *dtype [B, Hq, D]: output
    o_sb, o_sh,  # strides of out
    mid_o_ptr,  # *fp32 [B, Hq, num_splits, BLOCK_D]: partial acc per split
    mid_ml_ptr,  # *fp32 [B, Hq, num_splits, 2]: partial (max, sum) per split
    Hq,  # query heads
    D,  # head dim
    num_splits,  # splits per sequence
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 32
):  # fmt: skip
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    row0 = bh.to(tl.int64) * num_splits
    offs_d = tl.arange(0, BLOCK_D)
    m_max = tl.full([], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m_max = tl.maximum(m_max, tl.load(mid_ml_ptr + (row0 + s) * 2))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # len 0: every split empty
    l_sum = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):  # fixed order: deterministic
        m_s = tl.load(mid_ml_ptr + (row0 + s) * 2)
        l_s = tl.load(mid_ml_ptr + (row0 + s) * 2 + 1)
        w = tl.exp2(m_s - m_safe)  # empty split: m_s = -inf -> 0
        l_sum += l_s * w
        acc += tl.load(mid_o_ptr + (row0 + s) * BLOCK_D + offs_d) * w
    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptr + b * o_sb + h * o_sh + offs_d, o.to(out_ptr.dtype.element_ty), mask=offs_d < D)


# ---------------------------------------------------------------------------------------
# Config choice: shared by the launchers and SHIPPED_CONFIGS (what the compile test builds)

# Under TRITON_INTERPRET=1 @triton.jit gives interpreter objects; their bf16 tl.dot is wrong,
# so the prefill kernel upcasts its dot operands (P is still rounded to the input dtype first,
# as on the GPU). Compiled kernels never take this path.
INTERPRETING = not isinstance(_flash_attn_fwd_kernel, JITFunction)

# (BLOCK_M, BLOCK_N, num_warps) per (16-bit?, BLOCK_D). 16-bit: FA2's 128 x 64 tiles (8 warps
# at D 128); fp32 inputs halve BLOCK_M (q and acc tiles twice the registers) and the K/V
# tiles (shared memory: 3 pipeline stages of K and V must fit in sm_80's 163 KiB).
# Every tile must also pass compile_check's headroom reading (at most a few words of spills
# with ptxas held to 7/8 of the registers; tests/kernels/triton_helpers.py), but for the
# exemption tests/kernels/test_attention_compile.py lists with its reason (16-bit D 256).
_FLASH_TILES = {
    # 16-bit: also checked with ptxas -v; (128, 64, 4) at D 64 and (128, 64, 8) at D 128 spill.
    # D 256 spills 80-104 bytes in the headroom reading; the tile that passes it, (32, 32, 8),
    # halves K/V reuse and loses wgmma on sm_90: not taken. Known: on sm_90 the real compile
    # spills 8-64 bytes in the 4 non-causal variants without varlen (every flag combination
    # compiled, RINGFUSE_COMPILE_ALL=1); (64, 16, 8) spills in none of the 32 but rescales
    # acc every 16 keys.
    (True, 32): (128, 64, 4),
    (True, 64): (128, 64, 8),
    (True, 128): (64, 64, 8),
    (True, 256): (64, 32, 8),
    # fp32: checked with ptxas -v (every flag on, sm_80 and sm_90); (64, 64) at D 64 and
    # (64, 32) at D 128 spill. D 128 and 256 checked with all 16 flag combinations on both
    # archs: the earlier (32, 32, 4) at D 128 spilled ~1.1 KB on sm_90 with lse and no
    # softcap, (16, 32, 4) at D 256 230 B to 13.8 KB in 20 of 32 variants, and both 100-3600 B
    # in every headroom reading; (16, 32, 8) and (32, 16, 16) spill in none (headroom: 8 B in
    # the 4 causal lse-off variants of D 256 on sm_90; the other D 256 tiles tried spill
    # more, (32, 32, x) exceeds sm_80 smem). The trade: fp32 runs on FMA units (~20 TFLOP/s
    # A100), so L2 is not the limit at BLOCK_M 16 (8 flop per K/V byte; roughly 3 needed on
    # A100, 7 on H100), and more warps only split the same tile finer: at 74 / 98 KiB of
    # shared memory two / one CTAs fit an sm_80 SM, so 4 warps per CTA left it 8 / 4 warps
    # to hide latency with. D 256 doubles BLOCK_M (K/V reuse) for half the BLOCK_N (one acc
    # rescale per 16 keys, 1/64 of a tile's FMAs).
    (False, 32): (64, 32, 4),
    (False, 64): (32, 32, 4),
    (False, 128): (32, 16, 8),
    (False, 256): (32, 16, 16),
}


@triton.jit
def _write_kv_kernel(
    kc_ptr,  # *dtype [num_blocks, Hkv, block_size, D]: key cache
    kc_sblk, kc_sh, kc_spos,  # strides of the key cache
    vc_ptr,  # *dtype: value cache, same layout
    vc_sblk, vc_sh, vc_spos,  # strides of the value cache
    k_ptr,  # *dtype [T, Hkv, D]: new keys
    k_st, k_sh,  # strides of k
    v_ptr,  # *dtype [T, Hkv, D]: new values
    v_st, v_sh,  # strides of v
    slot_ptr,  # *i64 [T]: slot per token (block * block_size + position), -1 skips
    num_slots,  # num_blocks * block_size: a slot outside [-1, num_slots) is refused
    err_ptr,  # *i32 [1]: device_errors flag
    block_size,  # positions per block (S_max for a contiguous cache)
    Hkv,  # kv heads
    D,  # head dim
    BLOCK_H: tl.constexpr,  # kv heads per program
    BLOCK_D: tl.constexpr,  # next_pow2(D)
):  # fmt: skip
    """Grid (T, cdiv(Hkv, BLOCK_H)): a program copies BLOCK_H head rows of one token."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t)
    device_errors.raise_if(err_ptr, _ERR_SLOT_MAPPING, ((slot < -1) | (slot >= num_slots)) & (tl.program_id(1) == 0))
    blk = slot // block_size
    pos = slot % block_size
    mask = (slot >= 0) & (slot < num_slots) & (offs_h[:, None] < Hkv) & (offs_d[None, :] < D)
    hh = offs_h[:, None].to(tl.int64)
    k = tl.load(k_ptr + t * k_st + hh * k_sh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * v_st + hh * v_sh + offs_d[None, :], mask=mask)
    tl.store(kc_ptr + blk * kc_sblk + hh * kc_sh + pos * kc_spos + offs_d[None, :], k, mask=mask)
    tl.store(vc_ptr + blk * vc_sblk + hh * vc_sh + pos * vc_spos + offs_d[None, :], v, mask=mask)


def block_d_for(d: int) -> int:
    return max(MIN_BLOCK_D, triton.next_power_of_2(d))


# Decode stage 1: (BLOCK_N, num_warps) per (16-bit?, BLOCK_D). The loop's loads feed
# tl.dot, so Triton pipelines them with cp.async (num_stages 3: two K and V tiles in flight
# per program) when it knows D and the strides are multiples of 16 (the JIT's
# specialization of a real launch, D 64 / 128 / 256 with packed caches). The compile test
# also builds the variant without that knowledge (odd D or strides: scalar, unpipelined
# loads, many more registers), which sets the tiles. Registers unaligned / aligned, with
# and without softcap (sm_80 for 16-bit D 64 / 128, sm_90 for the rest), none spilling:
#   16-bit D 32 (64, 4): 151-182 / 63-64;  D 64 (32, 8): 98-110 / 58-64;
#          D 128 (16, 8): 100-110 / 73-80; D 256 (16, 8): 128 / 71-92;
#   fp32   D 32 (32, 8): 52 / 46-53;       D 64 (32, 8): 70-116 / 54-59;
#          D 128 (16, 8): 64-72 / 54-70;   D 256 (16, 8): 88-112 / 78-80.
# Spilling when tried: 16-bit (64, 4) at D 64 paged (76 B unaligned), (64, 8) at D 64 on
# sm_80 (8 B), (32, 8) at D 128 on sm_80 (8 B; 152-192 registers unaligned), (32, 4) and
# (64, x) at D 128 (72-596 B), (32, x) at D 256 (84-136 B); fp32 (32, x) at D 128 / 256
# (up to 1792 B).
_DECODE_TILES = {
    (True, 32): (64, 4),
    (True, 64): (32, 8),
    (True, 128): (16, 8),
    (True, 256): (16, 8),
    (False, 32): (32, 8),
    (False, 64): (32, 8),
    (False, 128): (16, 8),
    (False, 256): (16, 8),
}
# Launches whose D, q / cache strides and pointers are multiples of 16 (DECODE_ALIGNED_ARGS;
# D 64 / 128 with packed caches: what a model runs): bigger tiles at 4 warps, as vLLM's
# grouped Triton decode uses (32 keys, 4 warps). Registers sm_80 / sm_90, contiguous and
# paged, softcap on or off, none spilling: D 64 (64, 4) 72-80 / 72; D 128 (32, 4) 80-114 /
# 71-96, 21-37 KiB of shared memory (the cp.async pipeline). Also clean: (32, 4) at D 64,
# (64, 4) at D 128 (96-160 registers).
DECODE_ALIGNED_ARGS = ("q_ptr", "q_sb", "q_sh", "k_ptr", "k_sb", "k_sblk", "k_sh", "k_sn", "v_ptr", "v_sb", "v_sblk",
                       "v_sh", "v_sn", "D")  # fmt: skip
_DECODE_ALIGNED_TILES = {
    (True, 64): (64, 4),
    (True, 128): (32, 4),
}


def default_num_splits(s_max: int, programs_per_split: int = 1) -> int:
    """Splits per sequence: enough for DECODE_TARGET_PROGRAMS programs in all (B * Hkv *
    head blocks per split), no split under MIN_KEYS_PER_SPLIT keys, at most MAX_SPLITS.
    A sequence's split count, and so its bits, then depend on the batch's size (as in
    FlashInfer's and vLLM's split-KV decode); pass num_splits for batch-invariant bits."""
    by_fill = cdiv(DECODE_TARGET_PROGRAMS, max(programs_per_split, 1))
    by_len = cdiv(max(s_max, 1), MIN_KEYS_PER_SPLIT)
    return max(1, min(MAX_SPLITS, by_fill, by_len))


# Sliding-window variants (WINDOW) where the window's second bound pushed the tile into
# spills: fp32 D 128 (16, 32, 8) spilled 32 B on sm_80 with lse and varlen on, 16-bit D 256
# (64, 32, 8) 16-24 B on sm_90. Tried for fp32 D 128 (all 8 flag sets, both archs):
# (16, 16, 8) spills 16 B on sm_90, (16, 32, 4) 8-6380 B; (16, 16, 4) and (32, 16, 8) none,
# and (32, 16, 8) has twice the K/V reuse. Both keep one acc rescale per 16 keys.
_FLASH_WINDOW_TILES = {
    (False, 128): (32, 16, 8),
    (True, 256): (64, 16, 8),
}


# Launches whose head dim, q / k / v / out strides and pointers are all multiples of 16
# (FLASH_ALIGNED_ARGS; D 64 / 80 / 96 / 112 / 128 with packed layouts): the JIT then knows
# every row is 16-byte aligned, so the loads are vectorized and pipelined (cp.async) and
# take far fewer registers than the worst case _FLASH_TILES is sized for. 16-bit D 128 then
# takes FlashAttention-2's 128 x 64 tile at 8 warps, twice the K/V reuse of 64 x 64: sm_80
# 209-214 registers, sm_90 165-180, no spills and a clean headroom reading in the flag sets
# tried (all off; causal + softcap + lse + varlen; causal + window + lse + varlen), 96 /
# 128 KiB of shared memory; unaligned the same tile spills 96-252 B on sm_80. Tried and
# left: 16-bit D 256 (64, 64, 8) needs 168 KiB of shared memory on sm_80 (163 allowed);
# D 64 (128, 128, 8) reaches 255 registers on sm_90 with a window.
FLASH_ALIGNED_ARGS = ("out_ptr", "o_sb", "o_sh", "o_sm", "q_ptr", "q_sb", "q_sh", "q_sm", "k_ptr", "k_sb", "k_sh",
                      "k_sn", "v_ptr", "v_sb", "v_sh", "v_sn", "D")  # fmt: skip
_FLASH_ALIGNED_TILES = {
    (True, 128): (128, 64, 8),
}


def jit_aligned(d: int, tensors) -> bool:
    """Whether Triton's JIT will see D and every pointer and non-unit stride of tensors as
    multiples of 16 (FLASH_ALIGNED_ARGS / DECODE_ALIGNED_ARGS of a launch on them)."""
    return is_aligned(tensors, (d, *(st for t in tensors for st in t.stride()[:-1])))


def _int_sig(names):
    return {n: "i32" for n in names}


def _flash_spec(dtype, d: int, causal: bool, softcap: bool, has_lse: bool, varlen: bool = False,
                dot_fp32: bool = False, window: bool = False, aligned: bool = False):
    block_d = block_d_for(d)
    key = (dtype != torch.float32, block_d)
    if aligned and key in _FLASH_ALIGNED_TILES:
        block_m, block_n, nw = _FLASH_ALIGNED_TILES[key]
    elif window:
        block_m, block_n, nw = _FLASH_WINDOW_TILES.get(key, _FLASH_TILES[key])
    else:
        block_m, block_n, nw = _FLASH_TILES[key]
    t = TL_NAME[dtype]
    sig = {"out_ptr": f"*{t}", **_int_sig(["o_sb", "o_sh", "o_sm"]),
           "q_ptr": f"*{t}", **_int_sig(["q_sb", "q_sh", "q_sm"]),
           "k_ptr": f"*{t}", **_int_sig(["k_sb", "k_sh", "k_sn"]),
           "v_ptr": f"*{t}", **_int_sig(["v_sb", "v_sh", "v_sn"]),
           "lse_ptr": "*fp32", **_int_sig(["l_sb", "l_sh", "l_sm"]), "seqs_ptr": "*i32",
           **_int_sig(["Hq", "group", "Sq", "Sk", "D"]),
           "qk_scale": "fp32", "softcap_log2": "fp32", "window": "i32"}  # fmt: skip
    cexp = {"CAUSAL": bool(causal), "WINDOW": bool(window), "SOFTCAP": bool(softcap), "HAS_LSE": bool(has_lse),
            "VARLEN": bool(varlen), "DOT_FP32": bool(dot_fp32),
            "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}  # fmt: skip
    sig.update({k: "constexpr" for k in cexp})
    return _flash_attn_fwd_kernel, sig, cexp, nw


def _decode_spec(dtype, d: int, softcap: bool, paged: bool, dot_fp32: bool = False, aligned: bool = False):
    block_d = block_d_for(d)
    t = TL_NAME[dtype]
    sig = {"mid_o_ptr": "*fp32", "mid_ml_ptr": "*fp32", "q_ptr": f"*{t}", **_int_sig(["q_sb", "q_sh"])}
    if paged:
        sig.update({"k_ptr": f"*{t}", **_int_sig(["k_sblk", "k_sh", "k_sn"]),
                    "v_ptr": f"*{t}", **_int_sig(["v_sblk", "v_sh", "v_sn"]),
                    "bt_ptr": "*i32", "bt_sb": "i32", "seq_lens_ptr": "*i32", "block_size": "i32"})  # fmt: skip
        kernel = _paged_decode_attn_stage1_kernel
    else:
        sig.update({"k_ptr": f"*{t}", **_int_sig(["k_sb", "k_sh", "k_sn"]),
                    "v_ptr": f"*{t}", **_int_sig(["v_sb", "v_sh", "v_sn"]), "seq_lens_ptr": "*i32",
                    "capacity": "i32", "err_ptr": "*i32"})  # fmt: skip
        kernel = _decode_attn_stage1_kernel
    sig.update({**_int_sig(["Hq", "group", "D", "num_splits"]), "qk_scale": "fp32", "softcap_log2": "fp32",
                "window": "i32"})  # fmt: skip
    key = (dtype != torch.float32, block_d)
    block_n, num_warps = _DECODE_ALIGNED_TILES[key] if aligned and key in _DECODE_ALIGNED_TILES else _DECODE_TILES[key]
    cexp = {"SOFTCAP": bool(softcap), "DOT_FP32": bool(dot_fp32), "BLOCK_H": DECODE_HEADS, "BLOCK_N": block_n,
            "BLOCK_D": block_d}  # fmt: skip
    sig.update({k: "constexpr" for k in cexp})
    return kernel, sig, cexp, num_warps


def _stage2_spec(dtype, d: int):
    block_d = block_d_for(d)
    sig = {"out_ptr": f"*{TL_NAME[dtype]}", **_int_sig(["o_sb", "o_sh"]), "mid_o_ptr": "*fp32",
           "mid_ml_ptr": "*fp32", **_int_sig(["Hq", "D", "num_splits"]), "BLOCK_D": "constexpr"}  # fmt: skip
    return _decode_attn_stage2_kernel, sig, {"BLOCK_D": block_d}, 1


CHECK_BLOCK = 128  # block ids (paged) / sequences (varlen) per step of the check kernels


@functools.lru_cache(maxsize=None)
def _paged_check_spec():
    sig = {"checked_ptr": "*i32", "seq_lens_ptr": "*i32", "bt_ptr": "*i32",
           **_int_sig(["bt_sb", "max_blocks", "block_size", "num_blocks", "window"]), "err_ptr": "*i32",
           "BLOCK": "constexpr"}  # fmt: skip
    return _paged_check_kernel, sig, {"BLOCK": CHECK_BLOCK}, 4


@functools.lru_cache(maxsize=None)
def _varlen_check_spec():
    sig = {"seqs_ptr": "*i32", "cu_q_ptr": "*i32", "cu_k_ptr": "*i32",
           **_int_sig(["batch", "total_q", "total_k", "max_rows"]), "err_ptr": "*i32", "BLOCK": "constexpr"}  # fmt: skip
    return _varlen_check_kernel, sig, {"BLOCK": CHECK_BLOCK}, 4


WRITE_KV_HEADS = 4  # kv heads per write_kv program


@functools.lru_cache(maxsize=None)
def _write_kv_spec(dtype, d: int):
    t = TL_NAME[dtype]
    sig = {"kc_ptr": f"*{t}", **_int_sig(["kc_sblk", "kc_sh", "kc_spos"]),
           "vc_ptr": f"*{t}", **_int_sig(["vc_sblk", "vc_sh", "vc_spos"]),
           "k_ptr": f"*{t}", **_int_sig(["k_st", "k_sh"]), "v_ptr": f"*{t}", **_int_sig(["v_st", "v_sh"]),
           "slot_ptr": "*i64", "num_slots": "i32", "err_ptr": "*i32", **_int_sig(["block_size", "Hkv", "D"])}  # fmt: skip
    cexp = {"BLOCK_H": WRITE_KV_HEADS, "BLOCK_D": block_d_for(d)}
    sig.update({k: "constexpr" for k in cexp})
    return _write_kv_kernel, sig, cexp, 1

def shipped_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers can choose on a GPU,
    as dicts with an ``id`` (argument ints as i32; Triton's JIT also specializes ints == 1
    and multiples of 16, which changes attributes, not the variants listed here) and
    ``aligned_args``: the arguments a launch of that variant always has as multiples of 16
    (FLASH_ALIGNED_ARGS for the aligned prefill tiles, else none)."""
    configs, seen = [], set()

    def add(cid, spec):
        kernel, sig, cexp, nw = spec
        key = (kernel.__name__, tuple(sig.items()), tuple(cexp.items()), nw)
        if key not in seen:
            seen.add(key)
            aligned = () if not cid.endswith("-aligned") else FLASH_ALIGNED_ARGS if kernel is _flash_attn_fwd_kernel \
                else DECODE_ALIGNED_ARGS
            configs.append({"id": cid, "kernel": kernel, "signature": sig, "constexprs": cexp, "num_warps": nw,
                            "aligned_args": aligned})  # fmt: skip

    for dt in DTYPES:
        t = TL_NAME[dt]
        for bd in BLOCK_D_BUCKETS:
            for causal, win in ((False, False), (True, False), (True, True)):  # a window needs causal
                for sc in (False, True):
                    for lse in (False, True):
                        for vl in (False, True):
                            for al in (False, True):  # an aligned spec that is the unaligned one is not added
                                add(f"flash-{t}-D{bd}-c{int(causal)}{'w' if win else ''}-sc{int(sc)}-lse{int(lse)}"
                                    f"-vl{int(vl)}{'-aligned' if al else ''}",
                                    _flash_spec(dt, bd, causal, sc, lse, vl, window=win, aligned=al))  # fmt: skip
            for paged in (False, True):
                for sc in (False, True):
                    for al in (False, True):
                        add(f"{'paged' if paged else 'decode'}1-{t}-D{bd}-sc{int(sc)}{'-aligned' if al else ''}",
                            _decode_spec(dt, bd, sc, paged, aligned=al))  # fmt: skip
            add(f"decode2-{t}-D{bd}", _stage2_spec(dt, bd))
            add(f"write_kv-{t}-D{bd}", _write_kv_spec(dt, bd))
    add("paged_check", _paged_check_spec())
    add("varlen_check", _varlen_check_spec())
    return configs


SHIPPED_CONFIGS = shipped_configs()


@functools.lru_cache(maxsize=1024)
def _flash_plan(dtype, d, causal, softcap, has_lse, varlen=False, window=False, aligned=False):
    kernel, _, cexp, nw = _flash_spec(dtype, d, causal, softcap, has_lse, varlen, INTERPRETING, window, aligned)
    return kernel, cexp, nw


@functools.lru_cache(maxsize=1024)
def _decode_plan(dtype, d, softcap, paged, aligned=False):
    kernel, _, cexp, nw = _decode_spec(dtype, d, softcap, paged, INTERPRETING, aligned)
    k2, _, cexp2, nw2 = _stage2_spec(dtype, d)
    return kernel, cexp, nw, k2, cexp2, nw2


# ---------------------------------------------------------------------------------------
# Launchers


def _check(op: str, name: str, t: torch.Tensor, ndim: int, dtype) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} dtype must be {dtype}, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have inner stride 1, got strides {t.stride()}")


def _scales(scale: float, softcap):
    """(qk_scale, softcap_log2) kernel arguments."""
    if softcap is None:
        return float(scale) * LOG2E, 1.0
    if not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    return float(scale) / float(softcap), float(softcap) * LOG2E


NO_WINDOW = 2**30  # the kernels' window argument when there is none: more keys than any cache


def _window(op: str, window, causal: bool) -> int:
    """The kernels' window argument: window (an int >= 1; causal only) or NO_WINDOW."""
    if window is None:
        return NO_WINDOW
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{op}: window must be None or an int >= 1, got {window!r}")
    if not causal:
        raise ValueError(f"{op}: window needs causal=True")
    return min(window, NO_WINDOW)


def _check_heads(op: str, hq: int, hkv: int) -> int:
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"{op}: query heads {hq} must be a multiple of kv heads {hkv}")
    return hq // hkv


def _check_d(op: str, d: int) -> None:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim must be in [1, {MAX_HEAD_DIM}], got {d}")


def flash_attention_fwd(out, q, k, v, scale, causal, softcap=None, lse=None, window=None) -> None:
    """out = softmax(scale * q k^T [softcapped, causal-masked]) v, FlashAttention-2 style.

    q, out: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]; one dtype (fp32 / fp16 / bf16), inner
    stride 1, other strides arbitrary. Causal is bottom-right aligned (query i sees key j
    iff j <= i + Sk - Sq); window (causal only) also drops keys j <= i + Sk - Sq - window.
    A query with no visible key gets zeros (lse -inf). lse: None or fp32 [B, Hq, Sq]
    (natural log of the sum of exp of the final scores).
    """
    op = "flash_attention_fwd"
    if q.dtype not in DTYPES:
        raise ValueError(f"{op}: q dtype must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check(op, name, t, 4, q.dtype)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"{op}: out shape {list(out.shape)} != q shape {list(q.shape)}")
    if tuple(k.shape) != (B, Hkv, Sk, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{op}: k and v must be [B, Hkv, Sk, D] = {[B, Hkv, Sk, D]}, got "
                         f"{list(k.shape)} and {list(v.shape)}")  # fmt: skip
    group = _check_heads(op, Hq, Hkv)
    _check_d(op, D)
    if lse is not None:
        if lse.dtype != torch.float32 or tuple(lse.shape) != (B, Hq, Sq):
            raise ValueError(f"{op}: lse must be float32 {[B, Hq, Sq]}, got {lse.dtype} {list(lse.shape)}")
    qk_scale, softcap_log2 = _scales(scale, softcap)
    window = _window(op, window, causal)
    if B * Hq * Sq == 0:
        return
    kernel, cexp, nw = _flash_plan(q.dtype, D, bool(causal), softcap is not None, lse is not None, False,
                                   window != NO_WINDOW, jit_aligned(D, (q, k, v, out)))  # fmt: skip
    lse_t = lse if lse is not None else out  # dummy pointer, never touched
    ls = lse.stride() if lse is not None else (0, 0, 0)
    grid = (cdiv(Sq, cexp["BLOCK_M"]), B * Hq)
    launch(kernel, grid,
        out, out.stride(0), out.stride(1), out.stride(2),
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        lse_t, ls[0], ls[1], ls[2],
        out,  # the sequence table: unused without VARLEN
        Hq, group, Sq, Sk, D,
        qk_scale, softcap_log2, window,
        **cexp,
        num_warps=nw,
    )  # fmt: skip


def flash_attention_varlen_fwd(out, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, causal,
                               softcap=None, lse=None, window=None) -> None:
    """flash_attention_fwd over sequences packed along the token axis (flash-attn varlen).

    q, out: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q / cu_seqlens_k: int32 [B + 1]
    (sequence b: query rows cu_q[b]:cu_q[b + 1], key rows likewise); max_seqlen_q: the
    longest query run (sizes the grid), or None for Tq (no sync, more idle programs). lse:
    None or fp32 [Hq, Tq]. Rows past cu_q[B] are not written. The kernel checks the
    offsets: a sequence whose offsets decrease, leave the tensors or run longer than
    max_seqlen_q writes nothing and raises the device_errors flag.
    """
    op = "flash_attention_varlen_fwd"
    if q.dtype not in DTYPES:
        raise ValueError(f"{op}: q dtype must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check(op, name, t, 3, q.dtype)
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    if tuple(out.shape) != tuple(q.shape) or tuple(v.shape) != tuple(k.shape) or k.shape[2] != D:
        raise ValueError(f"{op}: shapes must be out = q [Tq, Hq, D], k = v [Tk, Hkv, D]; got out {list(out.shape)}, "
                         f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")  # fmt: skip
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(f"{op}: {name} must be int32 [B + 1] on {q.device}, got {cu.dtype} {list(cu.shape)}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must both be [B + 1]")
    group = _check_heads(op, Hq, Hkv)
    _check_d(op, D)
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (Hq, Tq)):
        raise ValueError(f"{op}: lse must be float32 {[Hq, Tq]}, got {lse.dtype} {list(lse.shape)}")
    qk_scale, softcap_log2 = _scales(scale, softcap)
    window = _window(op, window, causal)
    batch = cu_seqlens_q.shape[0] - 1
    if max_seqlen_q is None:
        max_seqlen_q = Tq
    if batch <= 0 or Hq * D == 0:
        return
    kernel, cexp, nw = _flash_plan(q.dtype, D, bool(causal), softcap is not None, lse is not None, True,
                                   window != NO_WINDOW, jit_aligned(D, (q, k, v, out)))  # fmt: skip
    lse_t = lse if lse is not None else out
    l_sh, l_sm = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    grid = (cdiv(max(max_seqlen_q, 0), cexp["BLOCK_M"]), batch * Hq)
    seqs = torch.empty((batch, 4), dtype=torch.int32, device=q.device)  # [B, (q row, q rows, k row, k rows)]
    check, _, check_cexp, check_nw = _varlen_check_spec()
    launch(check, (cdiv(batch, CHECK_BLOCK),), seqs, cu_seqlens_q, cu_seqlens_k, batch, Tq, k.shape[0],
           grid[0] * cexp["BLOCK_M"], device_errors.flag(q.device), **check_cexp, num_warps=check_nw)  # fmt: skip
    if grid[0] == 0:  # max_seqlen_q 0: no query row is computed (a run with rows is flagged above)
        return
    launch(kernel, grid,
        out, 0, out.stride(1), out.stride(0),
        q, 0, q.stride(1), q.stride(0),
        k, 0, k.stride(1), k.stride(0),
        v, 0, v.stride(1), v.stride(0),
        lse_t, 0, l_sh, l_sm,
        seqs,
        Hq, group, max_seqlen_q, 0, D,
        qk_scale, softcap_log2, window,
        **cexp,
        num_warps=nw,
    )  # fmt: skip


def _check_decode(op, out, q, k, v, seq_lens, kv_shape_desc):
    if q.dtype not in DTYPES:
        raise ValueError(f"{op}: q dtype must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("out", out)):
        _check(op, name, t, 3, q.dtype)
    for name, t in (("k", k), ("v", v)):
        _check(op, name, t, 4, q.dtype)
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"{op}: out shape {list(out.shape)} != q shape {list(q.shape)}")
    if tuple(v.shape) != tuple(k.shape) or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k and v must be {kv_shape_desc} with q's D, got {list(k.shape)}, {list(v.shape)}")
    B = q.shape[0]
    if seq_lens.dim() != 1 or seq_lens.shape[0] != B or seq_lens.dtype != torch.int32:
        raise ValueError(f"{op}: seq_lens must be int32 [{B}], got {seq_lens.dtype} {list(seq_lens.shape)}")
    _check_d(op, q.shape[-1])
    return _check_heads(op, q.shape[1], k.shape[1])


def _decode_launch(out, q, k, v, seq_lens, scale, softcap, num_splits, s_max, paged_args, window):
    B, Hq, D = q.shape
    qk_scale, softcap_log2 = _scales(scale, softcap)
    window = _window("decode attention", window, True)
    group = Hq // k.shape[1]
    programs = B * k.shape[1] * cdiv(group, DECODE_HEADS)  # per split
    if num_splits is None:
        num_splits = default_num_splits(s_max, programs)
    num_splits = int(num_splits)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if B * Hq == 0:
        return
    k1, cexp1, nw1, k2, cexp2, nw2 = _decode_plan(q.dtype, D, softcap is not None, paged_args is not None,
                                                  jit_aligned(D, (q, k, v)))  # fmt: skip
    block_d = cexp1["BLOCK_D"]
    mid_o = torch.empty((B, Hq, num_splits, block_d), dtype=torch.float32, device=q.device)
    mid_ml = torch.empty((B, Hq, num_splits, 2), dtype=torch.float32, device=q.device)
    err = device_errors.flag(q.device)
    if paged_args is None:  # contiguous: capacity S_max
        kv_args = (k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2), seq_lens,
                   k.shape[2], err)  # fmt: skip
    else:  # the lengths a separate kernel checked with the block ids they use
        block_table, block_size = paged_args
        checked = torch.empty_like(seq_lens)
        check, _, check_cexp, check_nw = _paged_check_spec()
        launch(check, (B,), checked, seq_lens, block_table, block_table.stride(0), block_table.shape[1], block_size,
               k.shape[0], window, err, **check_cexp, num_warps=check_nw)  # fmt: skip
        kv_args = (k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2),
                   block_table, block_table.stride(0), checked, block_size)  # fmt: skip
    launch(k1, (programs, num_splits),
        mid_o, mid_ml, q, q.stride(0), q.stride(1), *kv_args,
        Hq, group, D, num_splits, qk_scale, softcap_log2, window,
        **cexp1, num_warps=nw1,
    )  # fmt: skip
    launch(k2, (B * Hq,), out, out.stride(0), out.stride(1), mid_o, mid_ml, Hq, D, num_splits, **cexp2,
           num_warps=nw2)  # fmt: skip


def decode_attention_fwd(out, q, k_cache, v_cache, seq_lens, scale, softcap=None, num_splits=None,
                         window=None) -> None:  # fmt: skip
    """One new token per sequence against a contiguous KV cache, split-K over the length.

    q, out: [B, Hq, D]; k_cache, v_cache: [B, Hkv, S_max, D]; seq_lens: int32 [B] with
    0 <= len <= S_max (len 0 -> zeros; a len outside gives zeros and raises the
    device_errors flag); window: the token sees only the last ``window`` keys. num_splits
    None: default_num_splits (enough programs to fill the GPU; it depends on B, so pass
    num_splits for bits that do not depend on the batch).
    Deterministic: the splits are merged in a fixed order.
    """
    op = "decode_attention_fwd"
    _check_decode(op, out, q, k_cache, v_cache, seq_lens, "[B, Hkv, S_max, D]")
    if k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k_cache batch {k_cache.shape[0]} != q batch {q.shape[0]}")
    decode_attention_unchecked(out, q, k_cache, v_cache, seq_lens, scale, softcap, num_splits, window)


def decode_attention_unchecked(out, q, k_cache, v_cache, seq_lens, scale, softcap=None, num_splits=None,
                               window=None) -> None:  # fmt: skip
    """decode_attention_fwd without its checks, for ringfuse.ops, which has checked
    everything."""
    s_max = k_cache.shape[2] if window is None else min(k_cache.shape[2], window)  # keys read
    _decode_launch(out, q, k_cache, v_cache, seq_lens, scale, softcap, num_splits, s_max, None, window)


def paged_decode_attention_fwd(out, q, k_pages, v_pages, block_table, seq_lens, scale, softcap=None,
                               num_splits=None, window=None) -> None:  # fmt: skip
    """decode_attention_fwd over a paged KV cache (vLLM layout).

    k_pages, v_pages: [num_blocks, Hkv, block_size, D]; block_table: int32 [B, max_blocks]
    (logical block i of sequence b is physical block block_table[b, i]; entries past
    cdiv(len, block_size), or before the block of a window's first key, are never read);
    seq_lens: int32 [B], len <= max_blocks * block_size. A sequence whose len or a block id
    it reads is out of range gets zeros and raises the device_errors flag (a small kernel
    checks them first). Same splits and tiles as decode_attention_fwd: bitwise identical to it on
    the same data laid out contiguously with the same num_splits.
    """
    op = "paged_decode_attention_fwd"
    _check_decode(op, out, q, k_pages, v_pages, seq_lens, "[num_blocks, Hkv, block_size, D]")
    B = q.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype != torch.int32:
        raise ValueError(f"{op}: block_table must be int32 [{B}, max_blocks], got "
                         f"{block_table.dtype} {list(block_table.shape)}")  # fmt: skip
    if block_table.shape[1] > 1 and block_table.stride(1) != 1:
        raise ValueError(f"{op}: block_table must have inner stride 1, got strides {block_table.stride()}")
    if k_pages.shape[2] < 1:
        raise ValueError(f"{op}: block_size must be >= 1")
    paged_decode_attention_unchecked(out, q, k_pages, v_pages, block_table, seq_lens, scale, softcap, num_splits,
                                     window)  # fmt: skip


def paged_decode_attention_unchecked(out, q, k_pages, v_pages, block_table, seq_lens, scale, softcap=None,
                                     num_splits=None, window=None) -> None:  # fmt: skip
    """paged_decode_attention_fwd without its checks, for ringfuse.ops, which has checked
    everything."""
    block_size = k_pages.shape[2]
    s_max = block_table.shape[1] * block_size
    if window is not None:
        s_max = min(s_max, window)  # keys read
    _decode_launch(out, q, k_pages, v_pages, seq_lens, scale, softcap, num_splits, s_max, (block_table, block_size),
                   window)  # fmt: skip


def write_kv_fwd(k_cache, v_cache, k, v, slot_mapping, block_size: int) -> None:
    """Store k, v [T, Hkv, D] into caches viewed as [num_blocks, Hkv, block_size, D] (a
    contiguous [B, Hkv, S_max, D] cache is block_size = S_max): token t goes to block
    slot // block_size, position slot % block_size; slot -1 skips it. A slot outside [-1,
    num_blocks * block_size) skips its token too and raises the device_errors flag."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    num_slots = k_cache.shape[0] * block_size
    kernel, _, cexp, nw = _write_kv_spec(k.dtype, D)
    grid = (T, cdiv(Hkv, cexp["BLOCK_H"]))
    launch(kernel, grid,
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
        slot_mapping, num_slots, device_errors.flag(k.device), block_size, Hkv, D,
        **cexp,
        num_warps=nw,
    )  # fmt: skip
