// Float linear on CPU: a per-row kernel for decode-sized M, a packed-panel GEMM above. See
// linear.cpp.
#pragma once
#include <algorithm>
#include <cstdint>

namespace ringfuse::cpu {

// Rows up to which linear() runs the per-row kernel (each row its alone bits); more take the
// packed-panel GEMM (the crossover is measured in linear.cpp). Bound to Python as
// _C.LINEAR_ROW_KERNEL_MAX_M (ops.linear.ROW_KERNEL_MAX_M).
constexpr int64_t kLinearRowKernelMaxM = 16;

// out[m, n] = sum_k x[m, k] w[n, k] + bias[n], fp32 accumulation, one rounding to out's
// dtype at the end. x: [m, k] fp32 / bf16 / fp16 (x_dtype), rows x_stride apart;
// w: [n, k] fp32 or bf16 (w_dtype), rows w_stride apart, unit inner stride;
// bias: [n] fp32 / bf16 / fp16 (bias_dtype) or 0; out: [m, n] fp32 / bf16 / fp16
// (out_dtype), rows out_stride apart. Up to kLinearRowKernelMaxM rows, where reading w is
// the cost, each weight row is read from memory once for all m rows of x and each row gets
// the bits it gets alone. More rows take a packed-panel GEMM (panel_gemm.h), whose outputs
// sum their k products in chunks, in k order. The result does not depend on num_threads.
void linear(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x, int64_t x_stride, int x_dtype,
            std::uintptr_t w, int64_t w_stride, int w_dtype, std::uintptr_t bias, int bias_dtype, int64_t m,
            int64_t n, int64_t k, int num_threads);

// k per partial sum of the per-row kernels' dot products (a multiple of 64: whole cache lines)
constexpr int64_t kDotChunk = 64;

// sum over i < k of term(i) in the per-row kernels' reduction order, for their scalar
// fallbacks (and int8_gemm.cpp's weight-only one): 8 lanes (k = 8 i + lane), each summed in
// chunks of kDotChunk k that are then added in order, then the hsum tree
// ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
template <class Term>
inline float chunked_dot(int64_t k, Term term) {
  float lane[8] = {};
  for (int64_t c0 = 0; c0 < k; c0 += kDotChunk) {
    float part[8] = {};
    const int64_t cend = std::min(k, c0 + kDotChunk);
    for (int64_t i = c0; i < cend; ++i) part[i & 7] += term(i);
    for (int l = 0; l < 8; ++l) lane[l] += part[l];
  }
  return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

// The same kernel on int8 weights with one fp32 scale per weight row (w8a16, per channel):
// out[m, n] = (sum_k x[m, k] w[n, k]) * w_scale[n] + bias[n]; x and bias fp32 (bias may be
// 0), out fp32 / bf16 / fp16. int8_weight_only_linear takes it for m <= 16 (kWoLinearMaxRows).
void linear_int8_per_channel(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x,
                             int64_t x_stride, std::uintptr_t w, int64_t w_stride, std::uintptr_t w_scale,
                             std::uintptr_t bias, int64_t m, int64_t n, int64_t k, int num_threads);

}  // namespace ringfuse::cpu
