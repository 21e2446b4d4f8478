// LayerNorm, optionally fused with the residual add, on CPU: AVX2/FMA/F16C with a scalar
// fallback, OpenMP over rows.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype)
//                        mean = sum(s) / H;  var = sum((s - mean)^2) / H   (two passes:
//                        no cancellation when |mean| >> std, unlike E[s^2] - E[s]^2)
//                        y = (s - mean) * rstd * w + b, rounded once
// Three passes over the row; only the first reads memory (x and r are converted and added
// once into an fp32 scratch row, and the rounded sum goes to residual_out there, or for
// bf16 -> bf16 in the last pass: kDeferredSum, norm_common.h), the rest re-read that row
// from L1/L2. fp32 x without a residual needs no scratch copy: the later passes
// re-read x's row itself (a copy would add a store per element, which made the in-cache
// [2048, 576] fp32 case 0.78-0.89x torch's AVX-512 kernel on a Sapphire Rapids host).
// Napkin math, [4096, 4096] fp32: reads 64 MiB, writes 64 MiB -> ~6 ms at 22 GB/s;
// ~8 flops per element: memory-bound.
#include "cpu/norm_common.h"
#include "cpu/norms.h"

namespace ringfuse::cpu {
namespace {

template <class TX, class TW, class TO>
struct LayerNormKernel {
  // (s - mean) * rstd * w + b for 8 lanes. 16-bit outputs take torch's form,
  // s * rstd + (-mean * rstd), as one fma: its cancellation error (|mean| * rstd * 2^-24)
  // is far below their rounding; fp32 outputs subtract the mean first.
  static RF_AVX2 RF_INLINE __m256 affine(__m256 s, __m256 mean, __m256 rstd, __m256 neg_mean_rstd, __m256 w,
                                         __m256 b) {
    __m256 n;
    if constexpr (TO::code == kFloat32)
      n = _mm256_mul_ps(_mm256_sub_ps(s, mean), rstd);
    else
      n = _mm256_fmadd_ps(s, rstd, neg_mean_rstd);
    return _mm256_fmadd_ps(n, w, b);
  }

  static RF_AVX2 void avx2(const NormArgs& a, int64_t begin, int64_t end) {
    float* bufs[2] = {scratch_row(0, a.hidden), scratch_row(3, a.hidden)};  // s in fp32 per row in flight
    const float* w = norm_params<TX, TW, TO>(a.weight, a.hidden, 1, 1.0f);      // fp32, ones when null
    const float* b = norm_params<TX, TW, TO>(a.bias, a.hidden, 2, 0.0f);        // fp32, zeros when null
    if (a.residual)
      a.stream ? rows<true, true>(a, begin, end, bufs, w, b) : rows<true, false>(a, begin, end, bufs, w, b);
    else
      a.stream ? rows<false, true>(a, begin, end, bufs, w, b) : rows<false, false>(a, begin, end, bufs, w, b);
  }

  template <bool kRes, bool kStream>
  static RF_AVX2 void rows(const NormArgs& a, int64_t begin, int64_t end, float* const* bufs, const float* w,
                           const float* bias) {
    int64_t row = begin;
    for (; row + 2 <= end; row += 2) row_group<2, kRes, kStream>(a, row, end, bufs, w, bias);
    if (row < end) row_group<1, kRes, kStream>(a, row, end, bufs, w, bias);
    if constexpr (kStream) _mm_sfence();
  }

  // Rows [row0, row0 + N) in lockstep. Each pass is a chain of dependent adds or fmas ending
  // in a horizontal sum, a division or a square root, and the next pass waits for it; at
  // hidden = 576 those latencies, not the arithmetic, set the pace of one row. Two rows in
  // flight give the core two independent chains to overlap.
  template <int N, bool kRes, bool kStream>
  static RF_AVX2 RF_INLINE void row_group(const NormArgs& a, int64_t row0, int64_t end, float* const* bufs,
                                          const float* w, const float* bias) {
    const int64_t H = a.hidden, tail = H % 8, Hv = H - tail;
    const __m256 zero = _mm256_setzero_ps();
    const __m256 live = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(int(tail)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    using Ptrs = RowPtrs<TX, TW, TO>;
    const Ptrs p[2] = {Ptrs(a, row0), Ptrs(a, row0 + N - 1)};  // with N = 1 only p[0] is used
    constexpr int kAcc = 4;  // per row, paired or alone: a row's bits do not depend on its pairing
    constexpr bool kDefer = kDeferredSum<TX, TO, kRes>;  // residual_out stored in pass 3

    // pass 1: s = x (+ r) into buf, sum(s)
    float sum[N];
    first_pass_sums<N, kAcc, false, kRes, kStream>(p, bufs, H, sum);
    const float* s[2] = {s_row<TX, kRes>(p[0], bufs[0]), s_row<TX, kRes>(p[N - 1], bufs[N - 1])};
    int64_t i = 0;
    float mean[N];
    __m256 vmean[N];
    RF_UNROLL for (int r = 0; r < N; ++r) {
      mean[r] = sum[r] / float(H);
      vmean[r] = _mm256_set1_ps(mean[r]);
    }

    // pass 2: sum((s - mean)^2) from buf (two passes: no cancellation when |mean| >> std)
    __m256 acc[N][kAcc];
    RF_UNROLL for (auto& row_acc : acc)
      RF_UNROLL for (__m256& v : row_acc) v = zero;
    for (i = 0; i + 8 * kAcc <= H; i += 8 * kAcc) {
      RF_UNROLL for (int r = 0; r < N; ++r) {
        RF_UNROLL for (int k = 0; k < kAcc; ++k) {
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(s[r] + i + 8 * k), vmean[r]);
          acc[r][k] = _mm256_fmadd_ps(d, d, acc[r][k]);
        }
      }
    }
    for (; i < Hv; i += 8) {
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(s[r] + i), vmean[r]);
        acc[r][0] = _mm256_fmadd_ps(d, d, acc[r][0]);
      }
    }
    if (tail) {
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 d = _mm256_and_ps(_mm256_sub_ps(load_tail<F32>(s[r] + Hv, tail), vmean[r]), live);
        acc[r][1] = _mm256_fmadd_ps(d, d, acc[r][1]);
      }
    }
    __m256 rstd[N], neg_mean_rstd[N];
    RF_UNROLL for (int r = 0; r < N; ++r) {
      const float rs = 1.0f / std::sqrt(hsum_n<kAcc>(acc[r]) / float(H) + a.eps);
      rstd[r] = _mm256_set1_ps(rs);
      neg_mean_rstd[r] = _mm256_set1_ps(-mean[r] * rs);
    }

    // pass 3: y = (s - mean) * rstd * w + b (and deferred residual sums); x / r are no longer
    // read, so out and residual_out may alias them
    const NextRowPrefetch<TX, kRes> next0(a, row0 + N, end), next1(a, row0 + 2 * N - 1, end);
    for (i = 0; i + 16 <= H; i += 16) {  // 16 lanes: one pack per 16-bit store
      next0.at(i);
      if constexpr (N == 2) next1.at(i);
      const __m256 w0 = _mm256_loadu_ps(w + i), w1 = _mm256_loadu_ps(w + i + 8);
      const __m256 b0 = _mm256_loadu_ps(bias + i), b1 = _mm256_loadu_ps(bias + i + 8);
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 s0 = _mm256_loadu_ps(s[r] + i), s1 = _mm256_loadu_ps(s[r] + i + 8);
        if constexpr (kDefer) store_sum16<kStream>(p[r], i, s0, s1);
        store16<TO, kStream, kEvenOdd<TX, TO>>(p[r].out + i, affine(s0, vmean[r], rstd[r], neg_mean_rstd[r], w0, b0),
                                               affine(s1, vmean[r], rstd[r], neg_mean_rstd[r], w1, b1));
      }
    }
    if (i < Hv) {
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 s8 = _mm256_loadu_ps(s[r] + i);
        if constexpr (kDefer) store8<TX, kStream>(p[r].res_out + i, s8);
        store8<TO, kStream>(p[r].out + i, affine(s8, vmean[r], rstd[r], neg_mean_rstd[r], _mm256_loadu_ps(w + i),
                                                 _mm256_loadu_ps(bias + i)));
      }
      i += 8;
    }
    if (tail) {
      const __m256 wt = load_tail<F32>(w + Hv, tail), bt = load_tail<F32>(bias + Hv, tail);
      RF_UNROLL for (int r = 0; r < N; ++r) {
        const __m256 st = load_tail<F32>(s[r] + Hv, tail);
        if constexpr (kDefer) store_tail<TX>(p[r].res_out + Hv, st, tail);
        store_tail<TO>(p[r].out + Hv, affine(st, vmean[r], rstd[r], neg_mean_rstd[r], wt, bt), tail);
      }
    }
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
