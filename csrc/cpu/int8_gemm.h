// int8 quantization and GEMM on CPU. See int8_gemm.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

// Dynamic symmetric per-token (per-row) int8 quantization, one read of x:
//   scale[r] = max_k |x[r, k]| / 127,  q[r, k] = round_half_even(x[r, k] / scale[r])
// (a zero row gets scale 0 and q 0). x: [rows, k] float (dtype code), rows x_stride apart;
// q: int8 rows q_stride apart; scale: fp32 [rows]. Throws if a row holds inf or NaN (after
// the whole call; such rows are left as q = 0, scale = NaN).
void quantize_per_token(std::uintptr_t q, int64_t q_stride, std::uintptr_t scale, std::uintptr_t x,
                        int64_t x_stride, int64_t rows, int64_t k, int dtype, int num_threads);

}  // namespace ringfuse::cpu
