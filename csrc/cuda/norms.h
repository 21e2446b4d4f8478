// Fused RMSNorm / LayerNorm on CUDA (optionally with the residual add fused in).
//
// Tensors are [rows, hidden] with a row stride (elements) and unit inner stride; pointers
// are raw device addresses, `stream` is a cudaStream_t (0: the legacy default stream).
// residual == 0: plain norm. Otherwise s = round_x(x + residual) is written to residual_out
// and the norm is applied to s. out / residual_out may alias x / residual (in place).
// weight == 0 / bias == 0: none. w_dtype (also bias's) is x_dtype or float32; out_dtype is
// x_dtype or float32. Throws std::invalid_argument (-> ValueError) on bad arguments and on
// a failed launch. Kernels launch on the current device: the caller selects the device of
// the tensors.
//
// Declarations only (included by bindings.cpp, compiled by the host compiler); the shared
// device code of both kernels is in norm_common.cuh.
#pragma once
#include <cstdint>

namespace ringfuse::cuda {

void rms_norm(std::uintptr_t out, int64_t out_stride,                    // [rows, hidden]
              std::uintptr_t residual_out, int64_t residual_out_stride,  // [rows, hidden] or 0
              std::uintptr_t x, int64_t x_stride,                        // [rows, hidden]
              std::uintptr_t residual, int64_t residual_stride,          // [rows, hidden] or 0
              std::uintptr_t weight,                                     // [hidden] or 0
              int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
              bool llama_cast, std::uintptr_t stream);

void layer_norm(std::uintptr_t out, int64_t out_stride,                    // [rows, hidden]
                std::uintptr_t residual_out, int64_t residual_out_stride,  // [rows, hidden] or 0
                std::uintptr_t x, int64_t x_stride,                        // [rows, hidden]
                std::uintptr_t residual, int64_t residual_stride,          // [rows, hidden] or 0
                std::uintptr_t weight, std::uintptr_t bias,                // [hidden] or 0
                int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
                std::uintptr_t stream);

}  // namespace ringfuse::cuda
