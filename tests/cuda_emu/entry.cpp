// C entry points of the emulated CUDA norms for ctypes (tests/cuda_emu/build.py): the
// arguments of ringfuse._C.rms_norm_cuda / layer_norm_cuda, plus a buffer that receives
// the message of a thrown check (return value 1) or emulation error (2).
#include <cstring>
#include <stdexcept>
#include <string>

#include <cuda_runtime_api.h>
#include <vector_functions.h>

#include "emu.h"

#include "cuda/norms.h"

// emu.h's fiber switch (x86-64 System V): push the callee-saved registers, swap stacks,
// pop the other side's registers and return where it left off.
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
)");

// The runtime calls the kernels' host code makes (declared by cuda_runtime_api.h).
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
const char* cudaGetErrorString(cudaError_t) { return "no error"; }

namespace {
int report(const std::exception& e, char* err, int err_len, int code) {
  std::strncpy(err, e.what(), size_t(err_len) - 1);
  err[err_len - 1] = '\0';
  return code;
}
}  // namespace

// Seeds the scheduler's choice of warp (the interleaving of the next launches).
extern "C" void emu_seed(unsigned seed) { ::emu::state().rng.seed(seed); }

extern "C" int emu_rms_norm(std::uintptr_t out, int64_t out_stride, std::uintptr_t residual_out,
                            int64_t residual_out_stride, std::uintptr_t x, int64_t x_stride,
                            std::uintptr_t residual, int64_t residual_stride,
                            std::uintptr_t weight, int64_t rows, int64_t hidden, double eps,
                            int x_dtype, int w_dtype, int out_dtype, bool llama_cast,
                            std::uintptr_t stream, char* err, int err_len) {
  try {
    ringfuse::cuda::rms_norm(out, out_stride, residual_out, residual_out_stride, x, x_stride,
                             residual, residual_stride, weight, rows, hidden, eps, x_dtype,
                             w_dtype, out_dtype, llama_cast, stream);
  } catch (const std::invalid_argument& e) {
    return report(e, err, err_len, 1);
  } catch (const std::exception& e) {
    return report(e, err, err_len, 2);
  }
  return 0;
}

extern "C" int emu_layer_norm(std::uintptr_t out, int64_t out_stride,
                              std::uintptr_t residual_out, int64_t residual_out_stride,
                              std::uintptr_t x, int64_t x_stride, std::uintptr_t residual,
                              int64_t residual_stride, std::uintptr_t weight,
                              std::uintptr_t bias, int64_t rows, int64_t hidden, double eps,
                              int x_dtype, int w_dtype, int out_dtype, std::uintptr_t stream,
                              char* err, int err_len) {
  try {
    ringfuse::cuda::layer_norm(out, out_stride, residual_out, residual_out_stride, x, x_stride,
                               residual, residual_stride, weight, bias, rows, hidden, eps,
                               x_dtype, w_dtype, out_dtype, stream);
  } catch (const std::invalid_argument& e) {
    return report(e, err, err_len, 1);
  } catch (const std::exception& e) {
    return report(e, err, err_len, 2);
  }
  return 0;
}
