// RMSNorm, optionally fused with the residual add, on CPU: AVX2/FMA/F16C with a scalar
// fallback, OpenMP over rows.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype)
//                        rstd = 1 / sqrt(mean(s^2) + eps)
//                        y = s * rstd * w            (torch order, one rounding)
//                        y = round_x(s * rstd) * w   (HF LlamaRMSNorm order, llama_cast)
// Two passes over the row: the first reads x (and r) from memory, converts and adds them
// once, writes the rounded sum to residual_out and keeps s in an fp32 scratch row; the
// second re-reads s from L1 and writes out while the next row is prefetched. Memory traffic
// is one read of each input and one write of each output. bf16/fp16 rows are bound by the
// AVX2 conversions (no native bf16 instructions here), fp32 rows by memory.
// Napkin math, [4096, 4096] fp32 with residual: reads 2 x 64 MiB, writes 2 x 64 MiB ->
// ~12 ms at 22 GB/s; flops (~6 per element) are far below the FMA peak: memory-bound.
// [1, 576]: 2.3 KiB, ~100 ns of work; the Python call around it dominates.
#include "cpu/norms.h"

#include "cpu/norm_common.h"

namespace ringfuse::cpu {
namespace {

template <class TX, class TW, class TO>
struct RmsKernel {
  // y = s * rstd * w, or round_x(s * rstd) * w in the HF order
  static RF_AVX2 RF_INLINE __m256 scale(__m256 s, __m256 rstd, __m256 w, bool llama_cast) {
    __m256 y = _mm256_mul_ps(s, rstd);
    if (llama_cast) y = V8<TX>::round(y);
    return _mm256_mul_ps(y, w);
  }

  static RF_AVX2 void avx2(const NormArgs& a, int64_t begin, int64_t end) {
    const int64_t H = a.hidden;
    const __m256 inv_h = _mm256_set1_ps(1.0f / float(H));
    float* buf = scratch_row(0, H);                        // s in fp32, re-read by pass 2
    const float* w = params_f32<TW>(a.weight, H, 1);       // weight in fp32, or null
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t row = begin; row < end; ++row) {
      const RowPtrs<TX, TW, TO> p(a, row);
      // pass 1: s = x (+ r), kept in buf; sum of squares with 4 independent accumulators
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      int64_t i = 0;
      for (; i + 32 <= H; i += 32) {
        __m256 s0, s1, s2, s3;
        p.s16(i, a.stream, s0, s1);
        p.s16(i + 16, a.stream, s2, s3);
        _mm256_storeu_ps(buf + i, s0);
        _mm256_storeu_ps(buf + i + 8, s1);
        _mm256_storeu_ps(buf + i + 16, s2);
        _mm256_storeu_ps(buf + i + 24, s3);
        acc0 = _mm256_fmadd_ps(s0, s0, acc0);
        acc1 = _mm256_fmadd_ps(s1, s1, acc1);
        acc2 = _mm256_fmadd_ps(s2, s2, acc2);
        acc3 = _mm256_fmadd_ps(s3, s3, acc3);
      }
      for (; i + 8 <= H; i += 8) {
        const __m256 s = p.s8(i, a.stream);
        _mm256_storeu_ps(buf + i, s);
        acc0 = _mm256_fmadd_ps(s, s, acc0);
      }
      if (i < H) {  // zero-filled tail lanes add nothing
        const __m256 s = p.s_tail(i, H - i);
        _mm256_storeu_ps(buf + i, s);
        acc1 = _mm256_fmadd_ps(s, s, acc1);
      }
      const __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
      const float mean_sq = hsum(_mm256_mul_ps(acc, inv_h));
      const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(mean_sq + a.eps));

      // pass 2: normalize from buf; x and r are not read again, so out may alias them
      for (i = 0; i + 16 <= H; i += 16) {  // 16 lanes: one pack per 16-bit store
        prefetch_next<TX>(a, row + 1, end, i);
        const __m256 s0 = _mm256_loadu_ps(buf + i), s1 = _mm256_loadu_ps(buf + i + 8);
        const __m256 w0 = w ? _mm256_loadu_ps(w + i) : one, w1 = w ? _mm256_loadu_ps(w + i + 8) : one;
        V8<TO>::store2(p.out + i, scale(s0, rstd, w0, a.llama_cast), scale(s1, rstd, w1, a.llama_cast),
                       a.stream);
      }
      if (i + 8 <= H) {
        const __m256 s = _mm256_loadu_ps(buf + i);
        store8<TO>(p.out + i, scale(s, rstd, w ? _mm256_loadu_ps(w + i) : one, a.llama_cast), a.stream);
        i += 8;
      }
      if (i < H) {
        const __m256 s = _mm256_loadu_ps(buf + i);
        const __m256 wt = w ? load_tail<F32>(w + i, H - i) : one;
        store_tail<TO>(p.out + i, scale(s, rstd, wt, a.llama_cast), H - i);
      }
    }
    if (a.stream) _mm_sfence();
  }

  static void scalar(const NormArgs& a, int64_t begin, int64_t end) {
    const int64_t H = a.hidden;
    for (int64_t row = begin; row < end; ++row) {
      const RowPtrs<TX, TW, TO> p(a, row);
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t i = 0; i < H; ++i) {
        const float s = p.s(i);
        acc[i & 3] += s * s;
      }
      const float mean_sq = ((acc[0] + acc[1]) + (acc[2] + acc[3])) / float(H);
      const float rstd = 1.0f / std::sqrt(mean_sq + a.eps);
      for (int64_t i = 0; i < H; ++i) {
        const float s = p.s(i);
        if (p.res_out) TX::store(p.res_out + i, s);
        float y = s * rstd;
        if (a.llama_cast) y = TX::round(y);
        if (p.w) y *= TW::load(p.w + i);
        TO::store(p.out + i, y);
      }
    }
  }
};

}  // namespace

void rms_norm(std::uintptr_t out, int64_t out_stride, std::uintptr_t residual_out,
              int64_t residual_out_stride, std::uintptr_t x, int64_t x_stride,
              std::uintptr_t residual, int64_t residual_stride, std::uintptr_t weight,
              int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
              bool llama_cast, int num_threads) {
  NormArgs a{reinterpret_cast<void*>(out),
             out_stride,
             reinterpret_cast<void*>(residual_out),
             residual_out_stride,
             reinterpret_cast<const void*>(x),
             x_stride,
             reinterpret_cast<const void*>(residual),
             residual_stride,
             reinterpret_cast<const void*>(weight),
             nullptr,
             rows,
             hidden,
             float(eps),
             llama_cast,
             false};
  check_norm_args("rms_norm", a, x_dtype, w_dtype, out_dtype);
  if (rows == 0) return;
  const int x_size = x_dtype == kFloat32 ? 4 : 2, out_size = out_dtype == kFloat32 ? 4 : 2;
  const Isa isa = active_isa();
  a.stream = isa == Isa::kAvx2 && want_stream(a, out_size, x_size);
  const RowsFn fn = pick_kernel<RmsKernel>(x_dtype, w_dtype, out_dtype, isa);
  parallel_rows(rows, hidden, num_threads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace ringfuse::cpu
