// Float linear on CPU: a per-row kernel for decode-sized M, a packed-panel GEMM above. See
// linear.cpp.
#pragma once
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

// The same kernel on int8 weights with one fp32 scale per weight row (w8a16, per channel):
// out[m, n] = (sum_k x[m, k] w[n, k]) * w_scale[n] + bias[n]; x and bias fp32 (bias may be
// 0), out fp32 / bf16 / fp16. int8_weight_only_linear takes it for m <= 8.
void linear_int8_per_channel(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x,
                             int64_t x_stride, std::uintptr_t w, int64_t w_stride, std::uintptr_t w_scale,
                             std::uintptr_t bias, int64_t m, int64_t n, int64_t k, int num_threads);

}  // namespace ringfuse::cpu
