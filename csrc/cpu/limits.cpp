// Machine-limit probes for `ringfuse bench limits`: the copy bandwidth and fp32 FMA peak
// that every bench divides by to print "% of limit". Python times these calls.
#include "cpu/limits.h"

#include <algorithm>
#include <cstring>

#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

// Copy n bytes with AVX2 loads and non-temporal stores (what a tuned memcpy does beyond the
// cache sizes); alignment of dst is handled with a plain head copy.
RF_AVX2 void copy_avx2(char* dst, const char* src, int64_t n) {
  int64_t head = (32 - int64_t(reinterpret_cast<std::uintptr_t>(dst) % 32)) % 32;
  if (head > n) head = n;
  std::memcpy(dst, src, size_t(head));
  int64_t i = head;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  std::memcpy(dst + i, src + i, size_t(n - i));
  _mm_sfence();
}

// Sum n / 4 int32 with 4 independent AVX2 accumulators: a read-only stream (what decode
// attention does with its KV cache).
RF_AVX2 int64_t read_avx2(const char* src, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi32(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    a1 = _mm256_add_epi32(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32)));
    a2 = _mm256_add_epi32(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64)));
    a3 = _mm256_add_epi32(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96)));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
  int64_t total = 0;
  for (int k = 0; k < 8; ++k) total += lanes[k];
  for (; i < n; ++i) total += src[i];
  return total;
}

// 10 independent FMA chains of 8 lanes: enough to cover FMA latency x 2 pipes on Zen 3.
RF_AVX2 float fma_avx2(int64_t iters) {
  __m256 acc[10];
  for (int k = 0; k < 10; ++k) acc[k] = _mm256_set1_ps(0.001f * float(k));
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 10
    for (int k = 0; k < 10; ++k) acc[k] = _mm256_fmadd_ps(acc[k], m, c);
  }
  __m256 s = acc[0];
  for (int k = 1; k < 10; ++k) s = _mm256_add_ps(s, acc[k]);
  return hsum(s);
}

// The same at 16 lanes: the peak of the kernels' AVX-512 paths (avx512vnni level), which
// is 2x the 8-lane one where the core has 512-bit FMA units (Zen 5, Sapphire Rapids).
RF_AVX512VNNI float fma_avx512(int64_t iters) {
  __m512 acc[10];
  for (int k = 0; k < 10; ++k) acc[k] = _mm512_set1_ps(0.001f * float(k));
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
    for (int k = 0; k < 10; ++k) acc[k] = _mm512_fmadd_ps(acc[k], m, c);
  }
  __m512 s = acc[0];
  for (int k = 1; k < 10; ++k) s = _mm512_add_ps(s, acc[k]);
  return _mm512_reduce_add_ps(s);
}

float fma_scalar(int64_t iters) {
  float acc[10];
  for (int k = 0; k < 10; ++k) acc[k] = 0.001f * float(k);
  for (int64_t it = 0; it < iters; ++it)
    for (int k = 0; k < 10; ++k) acc[k] = acc[k] * 0.999999f + 1e-7f;
  float s = 0.f;
  for (int k = 0; k < 10; ++k) s += acc[k];
  return s;
}

}  // namespace

void probe_copy(std::uintptr_t dst, std::uintptr_t src, int64_t nbytes, int num_threads) {
  RINGFUSE_CHECK(nbytes >= 0, "probe_copy: nbytes must be >= 0");
  if (nbytes == 0) return;
  RINGFUSE_CHECK(dst && src, "probe_copy: null pointer");
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  // NT stores only beyond the caches (as a tuned memcpy): within L2/L3 they would bypass
  // the cache the copy is measuring.
  const bool avx2 = active_isa() == Isa::kAvx2 && nbytes >= (int64_t(16) << 20);
  const int64_t block = 1 << 16;  // split in 64 KiB blocks over threads
  const int64_t blocks = (nbytes + block - 1) / block;
  parallel_rows(blocks, block, num_threads, [&](int64_t b, int64_t e) {
    const int64_t lo = b * block, hi = std::min(nbytes, e * block);
    if (avx2)
      copy_avx2(d + lo, s + lo, hi - lo);
    else
      std::memcpy(d + lo, s + lo, size_t(hi - lo));
  });
}

int64_t probe_read(std::uintptr_t src, int64_t nbytes, int num_threads) {
  RINGFUSE_CHECK(nbytes >= 0, "probe_read: nbytes must be >= 0");
  if (nbytes == 0) return 0;
  RINGFUSE_CHECK(src, "probe_read: null pointer");
  const char* s = reinterpret_cast<const char*>(src);
  const bool avx2 = active_isa() == Isa::kAvx2;
  const int64_t block = 1 << 16;
  const int64_t blocks = (nbytes + block - 1) / block;
  const int threads = num_threads < 1 ? 1 : num_threads;
  int64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * block, n = std::min(nbytes, lo + block) - lo;
    if (avx2) {
      total += read_avx2(s + lo, n);
    } else {
      for (int64_t i = 0; i < n; ++i) total += s[lo + i];
    }
  }
  return total;
}

double probe_fma(int64_t iters, int num_threads) {
  RINGFUSE_CHECK(iters >= 0, "probe_fma: iters must be >= 0");
  const int lanes = probe_fma_lanes();
  const int threads = num_threads < 1 ? 1 : num_threads;
  double total = 0.0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static, 1)
  for (int t = 0; t < threads; ++t)
    total += lanes == 16 ? fma_avx512(iters) : lanes == 8 ? fma_avx2(iters) : fma_scalar(iters);
  return total;
}

int probe_fma_lanes() {
  if (active_isa() != Isa::kAvx2) return 1;
  return avx512_kernels() ? 16 : 8;
}

int64_t probe_fma_flops_per_iter(int num_threads) {
  const int threads = num_threads < 1 ? 1 : num_threads;
  const int lanes = probe_fma_lanes();
  return int64_t(threads) * 10 * lanes * 2;  // 10 chains x lanes x (mul + add)
}

// int8 dot-product peak on the int8 GEMM's path (vec.h: int8_use_vnni): 12 independent
// chains of vpdpbusd zmm (64 multiply-adds each), or 10 of vpmaddubsw + vpmaddwd + vpaddd
// ymm (32 each), or scalar integer multiply-adds.
namespace {
constexpr int kInt8Chains = 12;

RF_AVX512VNNI int64_t int8_vnni(int64_t iters) {
  __m512i acc[kInt8Chains];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);
  for (int64_t i = 0; i < iters; ++i)
    for (auto& a : acc) asm volatile("vpdpbusd %2, %1, %0" : "+v"(a) : "v"(u), "v"(s));
  int64_t total = 0;
  for (auto& a : acc) total += _mm512_reduce_add_epi32(a);
  return total;
}

RF_AVX2 int64_t int8_avx2(int64_t iters) {
  __m256i acc[kInt8Chains];
  for (auto& a : acc) a = _mm256_setzero_si256();
  const __m256i u = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
  __m256i s = _mm256_set1_epi8(1);
  for (int64_t i = 0; i < iters; ++i) {
    for (auto& a : acc) a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
    asm volatile("" : "+x"(s));  // keep the products inside the loop
  }
  alignas(32) int32_t lanes[8];
  int64_t total = 0;
  for (auto& a : acc) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
    for (int32_t v : lanes) total += v;
  }
  return total;
}

int64_t int8_scalar(int64_t iters) {
  volatile int32_t x = 1;
  int32_t acc[kInt8Chains] = {};
  for (int64_t i = 0; i < iters; ++i)
    for (auto& a : acc) a += x * x;
  int64_t total = 0;
  for (int32_t a : acc) total += a;
  return total;
}
}  // namespace

int64_t probe_int8_dot(int64_t iters, int num_threads) {
  RINGFUSE_CHECK(iters >= 0, "probe_int8_dot: iters must be >= 0");
  const int threads = num_threads < 1 ? 1 : num_threads;
  const bool avx2 = active_isa() == Isa::kAvx2, vnni = avx2 && int8_use_vnni();
  int64_t total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static, 1)
  for (int t = 0; t < threads; ++t) total += vnni ? int8_vnni(iters) : avx2 ? int8_avx2(iters) : int8_scalar(iters);
  return total;
}

int64_t probe_int8_ops_per_iter(int num_threads) {
  const int threads = num_threads < 1 ? 1 : num_threads;
  const bool avx2 = active_isa() == Isa::kAvx2;
  const int macs = avx2 && int8_use_vnni() ? 64 : avx2 ? 32 : 1;
  return int64_t(threads) * kInt8Chains * macs * 2;  // multiply + add
}

}  // namespace ringfuse::cpu
