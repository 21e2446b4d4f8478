// Gated activations of an MLP, out = act(gate) * up for x = [gate | up] rows, on CPU: AVX2
// (16 lanes on AVX-512 hosts, same bits) with a scalar fallback, OpenMP over rows.
// - SwiGLU (vLLM's silu_and_mul): silu(a) = a / (1 + exp(-a));
// - GeGLU with GELU's tanh approximation (Gemma's gelu_pytorch_tanh, vLLM's
//   gelu_tanh_and_mul): 0.5 a (1 + tanh(u)), u = sqrt(2 / pi) (a + 0.044715 a^3), which is
//   a / (1 + exp(-2 u)) (1 + tanh(u) = 2 sigmoid(2 u)): the same kernel with exp(-2 u) for
//   exp(-a), and no cancellation in 1 + tanh(u) for negative a.
// In fp32 (exp8: ~2 ulp), times up, one rounding to the dtype.
// exp(-a) must overflow to +inf for a < -88.7 (exp8 alone saturates at 88.38: lanes past
// that take exp(-a / 2)^2), so silu gives -0 there and NaN at a = -inf, as torch's F.silu
// does; NaN propagates.
// Napkin math: reads 2 d and writes d elements per row, ~20 vector ops per 8 outputs
// (exp8 and a division): at decode (one row of d = 1536) ~0.3 us, memory-bound only for
// large T. torch needs two passes (silu, then mul_) and a temporary. The 16-lane rows
// halve the instruction count: SPR VM, 2 threads, silu_mul bf16 [512, 2 x 22016]
// 1.15x -> 1.88x torch, [512, 2 x 3072] 1.23x -> 1.75x.
#include "cpu/silu_mul.h"

#include <cmath>
#include <string>

#include "cpu/vec.h"
#include "cpu/vec512.h"

namespace ringfuse::cpu {
namespace {

constexpr float kGeluK = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

// The exponent's argument z with act(a) = a / (1 + exp(-z)): z = a (SiLU) or 2 u (GeLU-tanh).
template <bool kGelu>
inline float act_arg(float a) {
  return kGelu ? kGeluK * (a + kGeluC * a * a * a) : a;
}

template <bool kGelu>
inline float act_scalar(float a) {
  return a / (1.0f + std::exp(-act_arg<kGelu>(a)));
}

template <class E, bool kGelu>
struct GatedActKernel {
  using T = typename E::T;

  // act(a) * b for 8 lanes
  static RF_AVX2 RF_INLINE __m256 act8(__m256 a, __m256 b) {
    const __m256 half = _mm256_set1_ps(0.5f), clamp = _mm256_set1_ps(-88.3762626647949f);
    __m256 z = a;
    if constexpr (kGelu)
      z = _mm256_mul_ps(_mm256_set1_ps(kGeluK),
                        _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluC), a), _mm256_mul_ps(a, a), a));
    const __m256 neg = _mm256_xor_ps(z, _mm256_set1_ps(-0.0f));
    __m256 e = exp8(neg);  // exp(-z); exp8 saturates above 88.38
    const __m256 big = _mm256_cmp_ps(z, clamp, _CMP_LT_OQ);
    if (_mm256_movemask_ps(big)) {  // rare: exp(-z / 2)^2, which overflows to +inf past 88.72
      const __m256 h = exp8(_mm256_mul_ps(neg, half));
      e = _mm256_blendv_ps(e, _mm256_mul_ps(h, h), big);
    }
    return _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), b);
  }

  static RF_AVX2 void row_avx2(T* out, const T* x, int64_t d, int64_t i = 0) {
    for (; i + 8 <= d; i += 8) V8<E>::store(out + i, act8(V8<E>::load(x + i), V8<E>::load(x + d + i)));
    for (; i < d; ++i) E::store(out + i, act_scalar<kGelu>(E::load(x + i)) * E::load(x + d + i));
  }

  // act8 at 16 lanes, operation for operation (exp16 is exp8 at 16 lanes): the AVX2 row's
  // bits, with the last d % 16 elements left to it. Halves the instructions of the
  // compute-bound bf16 / fp16 rows.
  static RF_AVX512VNNI void row_avx512(T* out, const T* x, int64_t d) {
    const __m512 half = _mm512_set1_ps(0.5f), clamp = _mm512_set1_ps(-88.3762626647949f);
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
      const __m512 a = V16<E>::load(x + i), b = V16<E>::load(x + d + i);
      __m512 z = a;
      if constexpr (kGelu)
        z = _mm512_mul_ps(_mm512_set1_ps(kGeluK),
                          _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluC), a), _mm512_mul_ps(a, a), a));
      const __m512 neg = _mm512_castsi512_ps(
          _mm512_xor_si512(_mm512_castps_si512(z), _mm512_set1_epi32(int(0x80000000u))));
      __m512 e = exp16(neg);
      const __mmask16 big = _mm512_cmp_ps_mask(z, clamp, _CMP_LT_OQ);
      if (big) {
        const __m512 h = exp16(_mm512_mul_ps(neg, half));
        e = _mm512_mask_blend_ps(big, e, _mm512_mul_ps(h, h));
      }
      V16<E>::store(out + i, _mm512_mul_ps(_mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), b));
    }
    row_avx2(out, x, d, i);
  }

  static void row_scalar(T* out, const T* x, int64_t d) {
    for (int64_t i = 0; i < d; ++i) E::store(out + i, act_scalar<kGelu>(E::load(x + i)) * E::load(x + d + i));
  }

  static void run(T* out, int64_t out_stride, const T* x, int64_t x_stride, int64_t rows, int64_t d, int threads) {
    const bool avx2 = active_isa() == Isa::kAvx2, wide = avx2 && avx512_kernels();
    parallel_rows(rows, 3 * d, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (wide)
          row_avx512(out + r * out_stride, x + r * x_stride, d);
        else if (avx2)
          row_avx2(out + r * out_stride, x + r * x_stride, d);
        else
          row_scalar(out + r * out_stride, x + r * x_stride, d);
      }
    });
  }
};

}  // namespace

namespace {

template <bool kGelu>
void run_act(std::uintptr_t out, int64_t out_stride, std::uintptr_t x, int64_t x_stride, int64_t rows, int64_t d,
             int dtype, int num_threads) {
  switch (dtype) {
    case kFloat16:
      GatedActKernel<F16, kGelu>::run(reinterpret_cast<uint16_t*>(out), out_stride,
                                      reinterpret_cast<const uint16_t*>(x), x_stride, rows, d, num_threads);
      break;
    case kBFloat16:
      GatedActKernel<BF16, kGelu>::run(reinterpret_cast<uint16_t*>(out), out_stride,
                                       reinterpret_cast<const uint16_t*>(x), x_stride, rows, d, num_threads);
      break;
    default:
      GatedActKernel<F32, kGelu>::run(reinterpret_cast<float*>(out), out_stride, reinterpret_cast<const float*>(x),
                                      x_stride, rows, d, num_threads);
      break;
  }
}

}  // namespace

void silu_mul(std::uintptr_t out, int64_t out_stride, std::uintptr_t x, int64_t x_stride, int64_t rows, int64_t d,
              int dtype, int num_threads, int activation) {
  const std::string p = "silu_mul: ";
  RINGFUSE_CHECK(rows >= 0 && d >= 1, p + "sizes must be rows >= 0 and d >= 1");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "dtype must be float32, float16 or bfloat16");
  RINGFUSE_CHECK(activation == kSilu || activation == kGeluTanh, p + "activation must be 0 (silu) or 1 (gelu_tanh)");
  if (rows == 0) return;
  RINGFUSE_CHECK(out && x, p + "null pointer");
  RINGFUSE_CHECK(x_stride >= 2 * d && out_stride >= d, p + "row strides must be >= 2 d (x) and >= d (out)");
  if (activation == kGeluTanh)
    run_act<true>(out, out_stride, x, x_stride, rows, d, dtype, num_threads);
  else
    run_act<false>(out, out_stride, x, x_stride, rows, d, dtype, num_threads);
}

}  // namespace ringfuse::cpu
