// int8 on CPU: dynamic per-token quantization of activations (the first half of a W8A8
// linear layer). AVX2 with a scalar fallback, OpenMP over rows.
//
// Napkin math: quantize_per_token reads x once from memory (the row stays in L1/L2 for its
// second pass) and writes 1 byte per element + 4 per row: for bf16 x, 3 bytes moved per
// element, memory-bound; 2 passes of ~3 vector instructions per 8 elements.
#include "cpu/int8_gemm.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <string>

#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

template <class E>
struct QuantizeKernel {
  using T = typename E::T;

  // round(v / s) clamped to [-127, 127] as int32; cvtps rounds half to even (the default
  // MXCSR mode), as torch.round does
  static RF_AVX2 RF_INLINE __m256i quant(__m256 vs, __m256 v) {
    const __m256 y = _mm256_div_ps(v, vs);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), y)));
  }

  // returns false (and writes q = 0, scale = NaN) when the row holds inf or NaN
  static RF_AVX2 bool row_avx2(int8_t* q, float* scale, const T* x, int64_t k) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    // maxps drops a NaN operand, so finiteness is tracked apart: x * 0 is 0 for finite x and
    // NaN for inf and NaN, and a NaN sticks in the sum
    __m256 vmax = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i < k; i += 8) {
      const __m256 v = i + 8 <= k ? V8<E>::load(x + i) : load_tail<E>(x + i, k - i);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
      nonfinite = _mm256_add_ps(nonfinite, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    if (hsum(nonfinite) != 0.0f) return fail(q, scale, k);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.0f;
    for (float v : lanes) amax = std::max(amax, v);
    const float s = amax / 127.0f;
    *scale = s;
    if (amax == 0.0f) {
      std::fill(q, q + k, int8_t(0));
      return true;
    }
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    i = 0;
    for (; i + 32 <= k; i += 32) {  // 4 x 8 int32 -> 32 int8 in order
      const __m256i a = quant(vs, V8<E>::load(x + i)), b = quant(vs, V8<E>::load(x + i + 8));
      const __m256i c = quant(vs, V8<E>::load(x + i + 16)), d = quant(vs, V8<E>::load(x + i + 24));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(packed, order));
    }
    for (; i < k; ++i) q[i] = int8_t(std::nearbyint(std::min(127.0f, std::max(-127.0f, E::load(x + i) / s))));
    return true;
  }

  static bool fail(int8_t* q, float* scale, int64_t k) {
    std::fill(q, q + k, int8_t(0));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }

  static bool row_scalar(int8_t* q, float* scale, const T* x, int64_t k) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      const float v = E::load(x + i);
      if (!std::isfinite(v)) return fail(q, scale, k);
      amax = std::max(amax, std::fabs(v));
    }
    const float s = amax / 127.0f;
    *scale = s;
    for (int64_t i = 0; i < k; ++i)
      q[i] = amax == 0.0f ? int8_t(0) : int8_t(std::nearbyint(std::min(127.0f, std::max(-127.0f, E::load(x + i) / s))));
    return true;
  }

  static int64_t run(int8_t* q, int64_t q_stride, float* scale, const T* x, int64_t x_stride, int64_t rows,
                     int64_t k, Isa isa, int num_threads) {
    std::atomic<int64_t> bad{0};
    parallel_rows(rows, k, num_threads, [&](int64_t r0, int64_t r1) {
      int64_t local = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const bool ok = isa == Isa::kAvx2 ? row_avx2(q + r * q_stride, scale + r, x + r * x_stride, k)
                                          : row_scalar(q + r * q_stride, scale + r, x + r * x_stride, k);
        local += ok ? 0 : 1;
      }
      bad += local;
    });
    return bad.load();
  }
};

}  // namespace

void quantize_per_token(std::uintptr_t q, int64_t q_stride, std::uintptr_t scale, std::uintptr_t x,
                        int64_t x_stride, int64_t rows, int64_t k, int dtype, int num_threads) {
  const std::string p = "quantize_per_token: ";
  RINGFUSE_CHECK(rows >= 0 && k >= 1, p + "rows must be >= 0 and k >= 1");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "x must be float32, float16 or bfloat16");
  if (rows == 0) return;
  RINGFUSE_CHECK(q && scale && x, p + "null pointer");
  RINGFUSE_CHECK(q_stride >= k && x_stride >= k, p + "row strides must be >= k");
  const Isa isa = active_isa();
  auto* qp = reinterpret_cast<int8_t*>(q);
  auto* sp = reinterpret_cast<float*>(scale);
  int64_t bad = 0;
  switch (dtype) {
    case kFloat16: bad = QuantizeKernel<F16>::run(qp, q_stride, sp, reinterpret_cast<const uint16_t*>(x), x_stride, rows, k, isa, num_threads); break;
    case kBFloat16: bad = QuantizeKernel<BF16>::run(qp, q_stride, sp, reinterpret_cast<const uint16_t*>(x), x_stride, rows, k, isa, num_threads); break;
    default: bad = QuantizeKernel<F32>::run(qp, q_stride, sp, reinterpret_cast<const float*>(x), x_stride, rows, k, isa, num_threads); break;
  }
  RINGFUSE_CHECK(bad == 0, p + "x holds inf or NaN in " + std::to_string(bad) + " row(s); int8 cannot represent them");
}

}  // namespace ringfuse::cpu
