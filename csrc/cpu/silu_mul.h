// Gated MLP activations (SwiGLU, GeGLU-tanh) on CPU. See silu_mul.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

enum GatedActivation : int { kSilu = 0, kGeluTanh = 1 };

// out[r, i] = act(x[r, i]) * x[r, d + i] for r < rows, i < d: x [rows, 2 d] with row
// stride x_stride, out [rows, d] with row stride out_stride (elements, unit inner stride),
// both of `dtype` (fp32 / bf16 / fp16); act = silu (activation 0) or GELU's tanh
// approximation (1). fp32 math, one rounding.
void silu_mul(std::uintptr_t out, int64_t out_stride, std::uintptr_t x, int64_t x_stride, int64_t rows, int64_t d,
              int dtype, int num_threads, int activation = kSilu);

}  // namespace ringfuse::cpu
