// LayerNorm, optionally fused with the residual add, on CPU: AVX2/FMA/F16C with a scalar
// fallback, OpenMP over rows.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype)
//                        mean = sum(s) / H;  var = sum((s - mean)^2) / H   (two passes:
//                        no cancellation when |mean| >> std, unlike E[s^2] - E[s]^2)
//                        y = (s - mean) * rstd * w + b, rounded once
// Three passes over the row; only the first touches memory, the rest hit L1/L2.
// Napkin math, [4096, 4096] fp32: reads 64 MiB, writes 64 MiB -> ~6 ms at 22 GB/s;
// ~8 flops per element: memory-bound.
#include "cpu/norm_common.h"
#include "cpu/norms.h"

namespace ringfuse::cpu {
namespace {

template <class TX, class TW, class TO>
struct LayerNormKernel {
  static RF_AVX2 RF_INLINE __m256 sum_pass(const RowPtrs<TX, TW, TO>& p, int64_t H, __m256 shift,
                                           bool square) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    int64_t i = 0;
    // square=false: sum(s); square=true: sum((s - shift)^2). Tail lanes are zero-filled and
    // masked so they add nothing.
    for (; i + 32 <= H; i += 32) {
      __m256 s0 = _mm256_sub_ps(load_s8<TX>(p.x, p.res, i), shift);
      __m256 s1 = _mm256_sub_ps(load_s8<TX>(p.x, p.res, i + 8), shift);
      __m256 s2 = _mm256_sub_ps(load_s8<TX>(p.x, p.res, i + 16), shift);
      __m256 s3 = _mm256_sub_ps(load_s8<TX>(p.x, p.res, i + 24), shift);
      if (square) {
        acc0 = _mm256_fmadd_ps(s0, s0, acc0);
        acc1 = _mm256_fmadd_ps(s1, s1, acc1);
        acc2 = _mm256_fmadd_ps(s2, s2, acc2);
        acc3 = _mm256_fmadd_ps(s3, s3, acc3);
      } else {
        acc0 = _mm256_add_ps(s0, acc0);
        acc1 = _mm256_add_ps(s1, acc1);
        acc2 = _mm256_add_ps(s2, acc2);
        acc3 = _mm256_add_ps(s3, acc3);
      }
    }
    for (; i + 8 <= H; i += 8) {
      const __m256 s = _mm256_sub_ps(load_s8<TX>(p.x, p.res, i), shift);
      acc0 = square ? _mm256_fmadd_ps(s, s, acc0) : _mm256_add_ps(s, acc0);
    }
    if (i < H) {
      const int64_t n = H - i;
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lane));
      const __m256 s = _mm256_and_ps(_mm256_sub_ps(load_s_tail<TX>(p.x, p.res, i, n), shift), live);
      acc1 = square ? _mm256_fmadd_ps(s, s, acc1) : _mm256_add_ps(s, acc1);
    }
    return _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
  }

  static RF_AVX2 void avx2(const NormArgs& a, int64_t begin, int64_t end) {
    const int64_t H = a.hidden;
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    for (int64_t row = begin; row < end; ++row) {
      const RowPtrs<TX, TW, TO> p(a, row);
      const float mean = hsum(sum_pass(p, H, zero, false)) / float(H);
      const __m256 vmean = _mm256_set1_ps(mean);
      const float var = hsum(sum_pass(p, H, vmean, true)) / float(H);
      const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(var + a.eps));
      int64_t i = 0;
      for (; i + 8 <= H; i += 8) {
        const __m256 s = load_s8<TX>(p.x, p.res, i);
        if (p.res_out) store8<TX>(p.res_out + i, s, a.stream);
        const __m256 w = p.w ? V8<TW>::load(p.w + i) : one;
        const __m256 b = p.b ? V8<TW>::load(p.b + i) : zero;
        const __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(s, vmean), rstd), w, b);
        store8<TO>(p.out + i, y, a.stream);
      }
      if (i < H) {
        const int64_t n = H - i;
        const __m256 s = load_s_tail<TX>(p.x, p.res, i, n);
        if (p.res_out) store_tail<TX>(p.res_out + i, s, n);
        const __m256 w = p.w ? load_tail<TW>(p.w + i, n) : one;
        const __m256 b = p.b ? load_tail<TW>(p.b + i, n) : zero;
        const __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(s, vmean), rstd), w, b);
        store_tail<TO>(p.out + i, y, n);
      }
    }
    if (a.stream) _mm_sfence();
  }

  static void scalar(const NormArgs& a, int64_t begin, int64_t end) {
    const int64_t H = a.hidden;
    for (int64_t row = begin; row < end; ++row) {
      const RowPtrs<TX, TW, TO> p(a, row);
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < H; ++i) acc[i & 3] += p.s(i);
      const float mean = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / float(H);
      float sq[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < H; ++i) {
        const float d = p.s(i) - mean;
        sq[i & 3] += d * d;
      }
      const float var = ((sq[0] + sq[1]) + (sq[2] + sq[3])) / float(H);
      const float rstd = 1.0f / std::sqrt(var + a.eps);
      for (int64_t i = 0; i < H; ++i) {
        const float s = p.s(i);
        if (p.res_out) TX::store(p.res_out + i, s);
        const float w = p.w ? TW::load(p.w + i) : 1.0f;
        const float b = p.b ? TW::load(p.b + i) : 0.0f;
        TO::store(p.out + i, (s - mean) * rstd * w + b);
      }
    }
  }
};

}  // namespace

void layer_norm(std::uintptr_t out, int64_t out_stride, std::uintptr_t residual_out,
                int64_t residual_out_stride, std::uintptr_t x, int64_t x_stride,
                std::uintptr_t residual, int64_t residual_stride, std::uintptr_t weight,
                std::uintptr_t bias, int64_t rows, int64_t hidden, double eps, int x_dtype,
                int w_dtype, int out_dtype, int num_threads) {
  NormArgs a{reinterpret_cast<void*>(out),
             out_stride,
             reinterpret_cast<void*>(residual_out),
             residual_out_stride,
             reinterpret_cast<const void*>(x),
             x_stride,
             reinterpret_cast<const void*>(residual),
             residual_stride,
             reinterpret_cast<const void*>(weight),
             reinterpret_cast<const void*>(bias),
             rows,
             hidden,
             float(eps),
             false,
             false};
  check_norm_args("layer_norm", a, x_dtype, w_dtype, out_dtype);
  if (rows == 0) return;
  const int x_size = x_dtype == kFloat32 ? 4 : 2, out_size = out_dtype == kFloat32 ? 4 : 2;
  const Isa isa = active_isa();
  a.stream = isa == Isa::kAvx2 && want_stream(a, out_size, out_size == 4 ? 32 : 16, x_size);
  const RowsFn fn = pick_kernel<LayerNormKernel>(x_dtype, w_dtype, out_dtype, isa);
  parallel_rows(rows, hidden, num_threads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace ringfuse::cpu
