// LayerNorm, optionally fused with the residual add, on CPU: AVX2/FMA/F16C with a scalar
// fallback, OpenMP over rows.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype)
//                        mean = sum(s) / H;  var = sum((s - mean)^2) / H   (two passes:
//                        no cancellation when |mean| >> std, unlike E[s^2] - E[s]^2)
//                        y = (s - mean) * rstd * w + b, rounded once
// Three passes over the row; only the first touches memory (x and r are converted and added
// once into an fp32 scratch row, and the rounded sum goes to residual_out), the rest re-read
// that row from L1/L2.
// Napkin math, [4096, 4096] fp32: reads 64 MiB, writes 64 MiB -> ~6 ms at 22 GB/s;
// ~8 flops per element: memory-bound.
#include "cpu/norm_common.h"
#include "cpu/norms.h"

namespace ringfuse::cpu {
namespace {

template <class TX, class TW, class TO>
struct LayerNormKernel {
  // (s - mean) * rstd * w + b for the 8 lanes at column i (w / b fp32 or null)
  static RF_AVX2 RF_INLINE __m256 affine(__m256 s, __m256 mean, __m256 rstd, const float* w, const float* b,
                                         int64_t i) {
    const __m256 n = _mm256_mul_ps(_mm256_sub_ps(s, mean), rstd);
    const __m256 wv = w ? _mm256_loadu_ps(w + i) : _mm256_set1_ps(1.0f);
    return b ? _mm256_fmadd_ps(n, wv, _mm256_loadu_ps(b + i)) : _mm256_mul_ps(n, wv);
  }

  static RF_AVX2 void avx2(const NormArgs& a, int64_t begin, int64_t end) {
    const int64_t H = a.hidden, tail = H % 8, Hv = H - tail;
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    const __m256 live = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(tail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    float* buf = scratch_row(0, H);                   // s in fp32, re-read by passes 2 and 3
    const float* w = params_f32<TW>(a.weight, H, 1);  // weight and bias in fp32, or null
    const float* bias = params_f32<TW>(a.bias, H, 2);
    for (int64_t row = begin; row < end; ++row) {
      const RowPtrs<TX, TW, TO> p(a, row);
      // pass 1: s = x (+ r) into buf, sum(s)
      __m256 acc0 = zero, acc1 = zero, acc2 = zero, acc3 = zero;
      int64_t i = 0;
      for (; i + 32 <= H; i += 32) {
        __m256 s0, s1, s2, s3;
        p.s16(i, a.stream, s0, s1);
        p.s16(i + 16, a.stream, s2, s3);
        _mm256_storeu_ps(buf + i, s0);
        _mm256_storeu_ps(buf + i + 8, s1);
        _mm256_storeu_ps(buf + i + 16, s2);
        _mm256_storeu_ps(buf + i + 24, s3);
        acc0 = _mm256_add_ps(acc0, s0);
        acc1 = _mm256_add_ps(acc1, s1);
        acc2 = _mm256_add_ps(acc2, s2);
        acc3 = _mm256_add_ps(acc3, s3);
      }
      for (; i < Hv; i += 8) {
        const __m256 s = p.s8(i, a.stream);
        _mm256_storeu_ps(buf + i, s);
        acc0 = _mm256_add_ps(acc0, s);
      }
      if (tail) {  // zero-filled lanes
        const __m256 s = p.s_tail(Hv, tail);
        _mm256_storeu_ps(buf + Hv, s);
        acc1 = _mm256_add_ps(acc1, s);
      }
      const float mean =
          hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) / float(H);
      const __m256 vmean = _mm256_set1_ps(mean);

      // pass 2: sum((s - mean)^2) from buf (two passes: no cancellation when |mean| >> std)
      acc0 = acc1 = acc2 = acc3 = zero;
      for (i = 0; i + 32 <= H; i += 32) {
        const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(buf + i), vmean);
        const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(buf + i + 8), vmean);
        const __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(buf + i + 16), vmean);
        const __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(buf + i + 24), vmean);
        acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        acc1 = _mm256_fmadd_ps(d1, d1, acc1);
        acc2 = _mm256_fmadd_ps(d2, d2, acc2);
        acc3 = _mm256_fmadd_ps(d3, d3, acc3);
      }
      for (; i < Hv; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(buf + i), vmean);
        acc0 = _mm256_fmadd_ps(d, d, acc0);
      }
      if (tail) {
        const __m256 d = _mm256_and_ps(_mm256_sub_ps(_mm256_loadu_ps(buf + Hv), vmean), live);
        acc1 = _mm256_fmadd_ps(d, d, acc1);
      }
      const float var =
          hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3))) / float(H);
      const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(var + a.eps));

      // pass 3: y = (s - mean) * rstd * w + b; x / r are no longer read, so out may alias them
      for (i = 0; i + 16 <= H; i += 16) {  // 16 lanes: one pack per 16-bit store
        prefetch_next<TX>(a, row + 1, end, i);
        const __m256 s0 = _mm256_loadu_ps(buf + i), s1 = _mm256_loadu_ps(buf + i + 8);
        V8<TO>::store2(p.out + i, affine(s0, vmean, rstd, w, bias, i), affine(s1, vmean, rstd, w, bias, i + 8),
                       a.stream);
      }
      if (i < Hv) {
        const __m256 s = _mm256_loadu_ps(buf + i);
        store8<TO>(p.out + i, affine(s, vmean, rstd, w, bias, i), a.stream);
        i += 8;
      }
      if (tail) {
        const __m256 s = _mm256_loadu_ps(buf + Hv);
        const __m256 wt = w ? load_tail<F32>(w + Hv, tail) : one;
        const __m256 bt = bias ? load_tail<F32>(bias + Hv, tail) : zero;
        store_tail<TO>(p.out + Hv, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(s, vmean), rstd), wt, bt), tail);
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
  a.stream = isa == Isa::kAvx2 && want_stream(a, out_size, x_size);
  const RowsFn fn = pick_kernel<LayerNormKernel>(x_dtype, w_dtype, out_dtype, isa);
  parallel_rows(rows, hidden, num_threads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace ringfuse::cpu
