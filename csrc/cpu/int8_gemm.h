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

namespace ringfuse::cpu {

// Bytes of the packed form of b [n, k] int8 (see int8_pack_b).
int64_t int8_packed_size(int64_t n, int64_t k);

// Pack b [n, k] int8 (rows b_stride apart) for int8_gemm_packed: panels of 16 rows (output
// columns), K in groups of 4, zero-padded: packed[panel][k / 4][16][4]. Returns whether b
// holds -128 (the fast kernel then cannot be used: its sign trick needs b in [-127, 127]).
bool int8_pack_b(std::uintptr_t packed, std::uintptr_t b, int64_t b_stride, int64_t n, int64_t k);

// out[m, n] = sum_k a[m, k] * b[n, k] (exact int32), then either stored as int32
// (out_dtype = int32 code) or as a_scale[m] * b_scale[n] * acc + bias[n] in fp32 / bf16 /
// fp16. a: int8 rows a_stride apart; packed: int8_pack_b(b); b_raw: b itself, for the
// exact fallback when b holds -128 (b_has_min). bias may be 0 (else fp32 [n]).
void int8_gemm_packed(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t a, int64_t a_stride,
                      std::uintptr_t packed, std::uintptr_t b_raw, int64_t b_stride, bool b_has_min,
                      std::uintptr_t a_scale, std::uintptr_t b_scale, std::uintptr_t bias, int64_t m, int64_t n,
                      int64_t k, int num_threads);

}  // namespace ringfuse::cpu

namespace ringfuse::cpu {

// Weight-only int8 linear (W8A16 / W8A32): out[m, n] = sum_k x[m, k] w[n, k] s(n, k)
// + bias[n], weights dequantized on the fly, fp32 accumulation. Scales: group_size 0 gives
// s(n, k) = w_scale[n]; else s(n, k) = w_scale[n * scale_stride + k / group_size] (group_size
// a multiple of 16, ceil(k / group_size) scales per row). x: fp32 rows x_stride
// apart; w: int8 [n, k] rows w_stride apart; out: out_dtype (fp32 / bf16 / fp16) rows
// out_stride apart; bias: fp32 [n] or 0. Made for small M (decode), where the weight bytes
// are the cost: each weight row is read once per block of 4 rows of x.
void int8_weight_only_linear(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x,
                             int64_t x_stride, std::uintptr_t w, int64_t w_stride, std::uintptr_t w_scale,
                             int64_t scale_stride, int64_t group_size, std::uintptr_t bias, int64_t m, int64_t n,
                             int64_t k, int num_threads);

}  // namespace ringfuse::cpu
