// RMSNorm, optionally fused with the residual add, on CPU: AVX2/FMA/F16C with a scalar
// fallback, OpenMP over rows.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype)
//                        rstd = 1 / sqrt(mean(s^2) + eps)
//                        y = s * rstd * w            (torch order, one rounding)
//                        y = round_x(s * rstd) * w   (HF LlamaRMSNorm order, llama_cast)
// Two passes over the row: the first reads x (and r) from memory, converts and adds them
// once and keeps the rounded sum s in an fp32 scratch row (fp32 x without a residual is s
// already: the second pass re-reads x's row); the second re-reads s from L1 and writes out
// while the next row is prefetched. The rounded sum goes to residual_out in the first pass,
// or for bf16 -> bf16 in the second (kDeferredSum, norm_common.h). Memory traffic
// is one read of each input and one write of each output. bf16/fp16 rows are bound by the
// AVX2 conversions (no native bf16 instructions here; bf16 rows are kept in even/odd order
// to make them cheap, see norm_common.h), fp32 rows by memory.
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
  template <bool kLlamaCast>
  static RF_AVX2 RF_INLINE __m256 scale(__m256 s, __m256 rstd, __m256 w) {
    __m256 y = _mm256_mul_ps(s, rstd);
    if constexpr (kLlamaCast) y = round8<TX>(y);
    return _mm256_mul_ps(y, w);
  }

  static RF_AVX2 void avx2(const NormArgs& a, int64_t begin, int64_t end) {
    float* bufs[2] = {scratch_row(0, a.hidden), scratch_row(3, a.hidden)};  // s in fp32 per row in flight
    const float* w = norm_params<TX, TW, TO>(a.weight, a.hidden, 1, 1.0f);      // fp32, ones when null
    if (a.residual) {
      if (a.llama_cast)
        a.stream ? rows<true, true, true>(a, begin, end, bufs, w) : rows<true, false, true>(a, begin, end, bufs, w);
      else
        a.stream ? rows<true, true, false>(a, begin, end, bufs, w) : rows<true, false, false>(a, begin, end, bufs, w);
    } else {
      if (a.llama_cast)
        a.stream ? rows<false, true, true>(a, begin, end, bufs, w) : rows<false, false, true>(a, begin, end, bufs, w);
      else
        a.stream ? rows<false, true, false>(a, begin, end, bufs, w)
                 : rows<false, false, false>(a, begin, end, bufs, w);
    }
  }

  template <bool kRes, bool kStream, bool kLlamaCast>
  static RF_AVX2 void rows(const NormArgs& a, int64_t begin, int64_t end, float* const* bufs, const float* w) {
    int64_t row = begin;
    for (; row + 2 <= end; row += 2) row_group<2, kRes, kStream, kLlamaCast>(a, row, end, bufs, w);
    if (row < end) row_group<1, kRes, kStream, kLlamaCast>(a, row, end, bufs, w);
    if constexpr (kStream) _mm_sfence();
  }

  // Rows [row0, row0 + N) in lockstep: the sum-of-squares chain, its horizontal sum and the
  // square root are latencies that one 576-wide row cannot hide; two rows give the core two
  // independent chains (as in layer_norm.cpp).
  template <int N, bool kRes, bool kStream, bool kLlamaCast>
  static RF_AVX2 RF_INLINE void row_group(const NormArgs& a, int64_t row0, int64_t end, float* const* bufs,
                                          const float* w) {
    const int64_t H = a.hidden;
    using Ptrs = RowPtrs<TX, TW, TO>;
    const Ptrs p[2] = {Ptrs(a, row0), Ptrs(a, row0 + N - 1)};  // with N = 1 only p[0] is used
    // 4 accumulators per row whether paired or alone: a row's bits must not depend on which
    // row it was paired with (the thread split and the batch decide that)
    constexpr int kAcc = 4;
    constexpr bool kDefer = kDeferredSum<TX, TO, kRes>;           // residual_out stored in pass 2

    // pass 1: s = x (+ r), kept in buf; sum of squares
    float sum_sq[N];
    first_pass_sums<N, kAcc, true, kRes, kStream>(p, bufs, H, sum_sq);
    const float* s[2] = {s_row<TX, kRes>(p[0], bufs[0]), s_row<TX, kRes>(p[N - 1], bufs[N - 1])};
    __m256 rstd[N];
    RF_UNROLL for (int r = 0; r < N; ++r)
      rstd[r] = _mm256_set1_ps(1.0f / std::sqrt(sum_sq[r] * (1.0f / float(H)) + a.eps));

    // pass 2: normalize from buf (and store deferred residual sums); x and r are not read
    // again, so out and residual_out may alias them
    const NextRowPrefetch<TX, kRes> next0(a, row0 + N, end), next1(a, row0 + 2 * N - 1, end);
    int64_t i = 0;
    for (; i + 16 <= H; i += 16) {  // 16 lanes: one pack per 16-bit store
      next0.at(i);
      if constexpr (N == 2) next1.at(i);
      const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 s0 = _mm256_loadu_ps(s[r] + i), s1 = _mm256_loadu_ps(s[r] + i + 8);
        if constexpr (kDefer) store_sum16<kStream>(p[r], i, s0, s1);
        store16<TO, kStream, kEvenOdd<TX, TO>>(p[r].out + i, scale<kLlamaCast>(s0, rstd[r], w0),
                                               scale<kLlamaCast>(s1, rstd[r], w1));
      }
    }
    if (i + 8 <= H) {
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 s8 = _mm256_loadu_ps(s[r] + i);
        if constexpr (kDefer) store8<TX, kStream>(p[r].res_out + i, s8);
        store8<TO, kStream>(p[r].out + i, scale<kLlamaCast>(s8, rstd[r], _mm256_loadu_ps(w + i)));
      }
      i += 8;
    }
    if (i < H) {
      const __m256 wt = load_tail<F32>(w + i, H - i);
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 st = load_tail<F32>(s[r] + i, H - i);
        if constexpr (kDefer) store_tail<TX>(p[r].res_out + i, st, H - i);
        store_tail<TO>(p[r].out + i, scale<kLlamaCast>(st, rstd[r], wt), H - i);
      }
    }
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
