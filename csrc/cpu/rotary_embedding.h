// Rotary position embedding on CPU, in place. See rotary_embedding.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

// x: [tokens, heads, head_dim] with token / head strides (elements), inner stride 1;
// positions: [tokens] int64, each in [0, max_positions); cache: fp32 [max_positions,
// rot_dim] rows (cos for the first rot_dim / 2 columns, sin for the rest), row stride
// cache_stride. gptj: interleaved pairs, else neox "rotate half".
void rotary_embedding(std::uintptr_t x, int64_t x_st, int64_t x_sh, int64_t tokens, int64_t heads,
                      int64_t head_dim, std::uintptr_t positions, std::uintptr_t cache, int64_t cache_stride,
                      int64_t max_positions, int64_t rot_dim, bool gptj, int dtype, int num_threads);

}  // namespace ringfuse::cpu
