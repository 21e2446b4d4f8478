// Fused LayerNorm / RMSNorm on CPU (optionally with the residual add fused in).
//
// Tensors are [rows, hidden] with a row stride (elements) and unit inner stride.
// residual == 0: plain norm. Otherwise s = round_x(x + residual) is written to residual_out
// and the norm is applied to s. out / residual_out may alias x / residual (in place).
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

void rms_norm(std::uintptr_t out, int64_t out_stride,                    // [rows, hidden]
              std::uintptr_t residual_out, int64_t residual_out_stride,  // [rows, hidden] or 0
              std::uintptr_t x, int64_t x_stride,                        // [rows, hidden]
              std::uintptr_t residual, int64_t residual_stride,          // [rows, hidden] or 0
              std::uintptr_t weight,                                     // [hidden] or 0
              int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
              bool llama_cast, int num_threads);

void layer_norm(std::uintptr_t out, int64_t out_stride,                    // [rows, hidden]
                std::uintptr_t residual_out, int64_t residual_out_stride,  // [rows, hidden] or 0
                std::uintptr_t x, int64_t x_stride,                        // [rows, hidden]
                std::uintptr_t residual, int64_t residual_stride,          // [rows, hidden] or 0
                std::uintptr_t weight, std::uintptr_t bias,                // [hidden] or 0
                int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
                int num_threads);

}  // namespace ringfuse::cpu
