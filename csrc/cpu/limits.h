// Machine-limit probes (copy and read bandwidth, fp32 FMA and int8 dot peaks); see limits.cpp.
#pragma once
#include <cstdint>

namespace ringfuse::cpu {

void probe_copy(std::uintptr_t dst, std::uintptr_t src, int64_t nbytes, int num_threads);
int64_t probe_read(std::uintptr_t src, int64_t nbytes, int num_threads);  // returns a checksum
double probe_fma(int64_t iters, int num_threads);  // returns a checksum (keeps the loop alive)
int64_t probe_fma_flops_per_iter(int num_threads);
int probe_fma_lanes();  // 16 at the avx512vnni level, 8 at avx2, 1 scalar
int64_t probe_int8_dot(int64_t iters, int num_threads);  // int8 GEMM's path; returns the sum of all products
int64_t probe_int8_ops_per_iter(int num_threads);

}  // namespace ringfuse::cpu
