// Attention on CPU. See attention.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

// Prefill / forward attention (FlashAttention-2 style, no [Sq, Sk] matrix).
//   out, q:   [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D]; strides (batch, head, position) in
//             elements, inner stride 1. Varlen: cu_seqlens_q / cu_seqlens_k [B + 1] int32
//             (both or neither); sequence b owns rows [cu[b], cu[b + 1]) of the position
//             axis, the batch strides are 0 and seqlen_q / seqlen_k are the total rows.
//   lse:      fp32 [B, Hq, Sq] (strides l_*) or 0: natural log of the softmax denominator.
// causal is bottom-right aligned: query i of a sequence sees key j iff j <= i + Sk - Sq;
// window > 0 (causal only) also drops keys j <= i + Sk - Sq - window (a sliding window of
// `window` keys, the query's own included; 0: none). A query that sees no key gets zeros
// (lse -inf). cu_seqlens values are re-checked here.
void attention(std::uintptr_t out, int64_t o_sb, int64_t o_sh, int64_t o_ss,  //
               std::uintptr_t lse, int64_t l_sb, int64_t l_sh, int64_t l_ss,   //
               std::uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_ss,     //
               std::uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_ss,     //
               std::uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_ss,     //
               std::uintptr_t cu_seqlens_q, std::uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q,
               int64_t seqlen_k, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, bool causal,
               double scale, double softcap, int64_t window, int dtype, int num_threads);

// One new token per sequence over a KV cache, contiguous or paged (flash-decoding).
//   out, q:        [B, Hq, D], strides (batch, head) in elements, inner stride 1
//   k, v:          paged: [num_blocks, Hkv, block_size, D]; contiguous: [B, Hkv, S_max, D]
//                  (a contiguous cache is the paged one with block_size = S_max and
//                  sequence b in block b); strides (block, head, position), inner stride 1
//   block_table:   [B, max_blocks] int32 (row stride bt_stride), or 0 for contiguous
//   seq_lens:      [B] int32, each in [0, max_blocks * block_size]
//   window:        > 0: the token (at position seq_len - 1) sees only the last `window` keys;
//                  0: all of them
// Values are re-checked here (seq_lens range, the ids of the blocks read in [0,
// num_blocks)) before any memory is read.
void decode_attention(std::uintptr_t out, int64_t out_sb, int64_t out_sh,  //
                      std::uintptr_t q, int64_t q_sb, int64_t q_sh,        //
                      std::uintptr_t k, int64_t k_sblk, int64_t k_sh, int64_t k_spos,
                      std::uintptr_t v, int64_t v_sblk, int64_t v_sh, int64_t v_spos,
                      std::uintptr_t block_table, int64_t bt_stride, int64_t max_blocks,
                      int64_t block_size, int64_t num_blocks, std::uintptr_t seq_lens, int64_t batch,
                      int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                      double softcap, int64_t window, int dtype, int64_t split_size, int num_threads);

// Store new K/V rows into a cache: k, v [tokens, Hkv, D] (strides token, head); the caches
// [num_blocks, Hkv, block_size, D] (strides block, head, position; a contiguous cache
// [B, Hkv, S_max, D] is block_size = S_max). slot_mapping: [tokens] int64, slot s goes to
// block s / block_size, position s % block_size; -1 skips the token. Slots are re-checked.
void write_kv(std::uintptr_t k_cache, int64_t kc_sblk, int64_t kc_sh, int64_t kc_spos,  //
              std::uintptr_t v_cache, int64_t vc_sblk, int64_t vc_sh, int64_t vc_spos,  //
              std::uintptr_t k, int64_t k_st, int64_t k_sh, std::uintptr_t v, int64_t v_st, int64_t v_sh,
              std::uintptr_t slot_mapping, int64_t tokens, int64_t num_kv_heads, int64_t head_dim,
              int64_t num_blocks, int64_t block_size, int dtype);

}  // namespace ringfuse::cpu
