// Kernels with the bugs the emulator must catch (tests/test_cuda_emulated.py), in the
// same CUDA source style as csrc/cuda, compiled by build.py with the same rewrites.
// Each sums 64 floats with one block of 64 threads (two warps): out[0] = the sum.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>

namespace {

__device__ __forceinline__ float warp_sum(float v) {
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// mode 0: correct; 1: no barrier between the smem write and the read (a race);
// 2: __syncthreads in divergent code; 3: a shuffle only half a warp reaches.
__global__ void block_sum(const float* x, float* out, int mode) {
  __shared__ float partial[2];
  const int t = threadIdx.x;
  float v = x[t];
  if (mode == 3 && t % 32 >= 16) {
    // these lanes skip the shuffles
  } else {
    v = warp_sum(v);
  }
  if (t % 32 == 0) partial[t / 32] = v;
  if (mode == 0) __syncthreads();
  if (mode == 2 && t < 32) __syncthreads();
  if (t == 0) out[0] = partial[0] + partial[1];
}

}  // namespace

extern "C" int emu_selftest_block_sum(std::uintptr_t x, std::uintptr_t out, int mode, char* err,
                                      int err_len) {
  try {
    block_sum<<<1, 64, 0, 0>>>(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out),
                               mode);
  } catch (const std::exception& e) {
    std::snprintf(err, size_t(err_len), "%s", e.what());
    return 2;
  }
  return 0;
}
