// Attention on CPU. See attention.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

// One new token per sequence over a KV cache, contiguous or paged (flash-decoding).
//   out, q:        [B, Hq, D], strides (batch, head) in elements, inner stride 1
//   k, v:          paged: [num_blocks, Hkv, block_size, D]; contiguous: [B, Hkv, S_max, D]
//                  (a contiguous cache is the paged one with block_size = S_max and
//                  sequence b in block b); strides (block, head, position), inner stride 1
//   block_table:   [B, max_blocks] int32 (row stride bt_stride), or 0 for contiguous
//   seq_lens:      [B] int32, each in [0, max_blocks * block_size]
// Values are re-checked here (seq_lens range, block ids in [0, num_blocks)) before any
// memory is read.
void decode_attention(std::uintptr_t out, int64_t out_sb, int64_t out_sh,  //
                      std::uintptr_t q, int64_t q_sb, int64_t q_sh,        //
                      std::uintptr_t k, int64_t k_sblk, int64_t k_sh, int64_t k_spos,
                      std::uintptr_t v, int64_t v_sblk, int64_t v_sh, int64_t v_spos,
                      std::uintptr_t block_table, int64_t bt_stride, int64_t max_blocks,
                      int64_t block_size, int64_t num_blocks, std::uintptr_t seq_lens, int64_t batch,
                      int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, double scale,
                      double softcap, int dtype, int64_t split_size, int num_threads);

}  // namespace ringfuse::cpu
