// Float linear y[M, N] = x[M, K] @ W[N, K]^T + bias[N] on CPU: a per-row kernel for small M
// (decode, below), and for M > kRowKernelMaxM = 16 (prefill) panel_gemm.h's compute-bound
// GEMM (run_gemm): ~2x torch's fp32 GEMM (MKL) from M = 17 to 256 with 16 lanes, 1.1-1.9x on
// the AVX2 path (Zen 5 VM, 2 threads, SmolLM2's layers and [4096, 4096]).
//
// At decode sizes the weights are the cost: every weight is used M <= 8 times, so the
// kernel should stream W from DRAM at the read bandwidth and hide the FMAs under it.
// Napkin math, SmolLM2 lm_head (N = 49152, K = 576), M = 1: W is N K sizeof(W) = 113 MB in
// fp32 (57 MB bf16) and 2 M N K = 57 MFLOP. At ~40 GB/s of DRAM read that is ~2.8 ms (fp32)
// / ~1.4 ms (bf16), while the FMAs alone need ~0.3 ms at the 2-core fp32 peak; M = 8 is
// still memory-bound (453 MFLOP, ~2.5 ms at peak, about the read time). torch's MKL sgemv
// path reads the same 113 MB at ~16 GB/s here (~7 ms). Measured (`ringfuse bench linear`,
// 2 threads, cold weights): M = 1 fp32 2.2-3.3 ms (35-52 GB/s, 80-99% of the DRAM read
// bandwidth of the same run), 2.3-3.3x F.linear; M = 8 fp32 3.6-4.3 ms.
//
// Design (AVX2 + FMA):
// - x is converted once per call to fp32 rows zero-padded to a multiple of 8 (M K floats,
//   L1/L2-resident for K up to ~8K), so every x load is a full vector.
// - Work item: a block of kBlock = 8 consecutive weight rows. Inside it, x is taken 4 rows
//   at a time (MR) against NR weight rows: MR x NR accumulators of 8 lanes (1 x 4, 2 x 4,
//   3 x 4, 4 x 3: 4-12 independent FMA chains; 1 x 4 only in the tail of M = 5 / 9 / 13,
//   as 1 x 8 spilled an accumulator to the stack). Each weight
//   vector is loaded (bf16: widened to fp32 in registers, vpmovzxwd + vpslld; int8:
//   vpmovsxbd + vcvtdq2ps, the row scale applied to the finished dot) once per MR rows of
//   x; for M > 4 the block's rows (8 K sizeof(W) bytes) are re-read from L1/L2, never from
//   DRAM.
// - M = 1 (every weight type) and M = 2-4 with fp32 / bf16 weights: the
//   block's rows one after another (dot_rows), each row's chunks walked in address order:
//   one sequential stream per thread. No software prefetch: the hardware stream
//   prefetchers alone keep a single sequential stream per core at the DRAM read bandwidth,
//   and prefetches of our own only took load-queue slots and bandwidth from them. On the
//   AVX-512 (Zen 4) host, AVX2 path, 2 threads, SmolLM2-135M's whole decode weight stream
//   (30 x qkv/o/gate_up/down + lm_head, 538 MB fp32, cold), interleaved in one process:
//   15.9-17.6 ms -> 14.0-15.3 ms per token against the 8 KiB-ahead L2 (T1) prefetch it had;
//   bf16 weights (269 MB) 10.1-10.7 -> 7.3-8.0 ms. int8 weights (134 MB) moved from the
//   8-row blocks to rows on 2026-12-07 (dot_rows' note). The 8-row blocks (M > 4, and int8
//   at M > 1) keep their next-block prefetch: without it M = 2 / 4 / 8 were 10-60 % slower.
// - Prefetch (blocks): while a block is computed, each cache line of its rows is matched by
//   a software prefetch of the same line of the next block's rows (8 rows further on), so
//   the next block's W is in flight during this block's FMAs; the hardware stream
//   prefetcher alone stops at 4 KiB page ends and misses the start of every row. Measured
//   against prefetching each row 1 KiB ahead: as fast or faster at M = 1, 1.4-2.5x faster
//   at M = 4 and 8, where the FMAs are long enough to hide a block.
// - OpenMP over blocks (schedule static: each thread streams one contiguous range of W).
// - AVX-512 hosts (avx512vnni ISA level and above): the blocks put two weight rows in one zmm
//   register (dot_block512), same bits. Sapphire Rapids VM, 2 threads, warm, [4096, 4096],
//   M = 8: int8 2.65 -> 1.74 ms, fp32 4.18 -> 2.71 ms, bf16 2.96 -> 2.09 ms; M = 4: int8
//   1.37 -> 0.91 ms; M = 1 (memory-bound) about as before.
//
// Reduction order, fixed per output element whatever the path, M, blocking or thread count
// (so a batch gives each row the bits it gets alone): 8 lanes (k = 8 i + lane, the K tail
// in a zero-padded last vector), each summed in chunks of kChunk = 64 k (8 terms per lane)
// that are then added in order, then the hsum tree ((l0 + l4) + (l2 + l6)) + ((l1 + l5) +
// (l3 + l7)), then (int8) * scale, + bias, one rounding to out's dtype. The chunks keep the
// longest chain of dependent adds at 8 + K / 64 instead of K / 8: with a single chain per
// lane the error at K = 4096 was 2.1-2.2x torch's (MKL blocks its sums too). The scalar
// fallback keeps the same order (with separate multiply and add).
#include "cpu/linear.h"

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

#include "cpu/panel_gemm.h"
#include "cpu/vec.h"
#include "cpu/vec512.h"

namespace ringfuse::cpu {
namespace {

constexpr int64_t kBlock = 8;        // weight rows per work item
constexpr int kMaxRows = 4;          // rows of x per register block
constexpr int64_t kChunk = kDotChunk;  // k per partial sum (linear.h)
// kLinearRowKernelMaxM (linear.h), the per-row kernel's bound. Measured crossover (Zen 5 VM,
// 2 threads, fp32 weights, SmolLM2's layers and [4096, 4096]): at M = 12 the row kernel was
// still ahead; at 17 the GEMM was 1.1-1.4x it with 16 lanes and 1.0-1.2x on AVX2, at 33
// 1.4-1.8x / 1.2-1.8x; only a cold 113 MB LM head still favoured the row kernel at 17-33
// (1.4x / equal). The same bound as the w8a16 per-channel path (kWoLinearMaxRows).
constexpr int64_t kRowKernelMaxM = kLinearRowKernelMaxM;

// int8 weights (the per-channel w8a16 path of int8_weight_only_linear): widened to fp32 in
// registers (vpmovsxbd + vcvtdq2ps, 2 uops per 8 weights); the row scale is applied to the
// finished dot product in store_block.
struct I8 {
  using T = int8_t;
  static RF_INLINE float load(const T* p) { return float(*p); }
};

struct Args {
  void* out;
  int64_t out_stride;
  int out_dtype;
  const float* x;  // fp32 [m][kp], zero-padded
  int64_t kp;
  const void* w;
  int64_t w_stride;
  const void* bias;
  int bias_dtype;
  const float* w_scale;  // [n] per weight row (int8 weights), else null
  int64_t m, n, k;
};

inline float load_scalar(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case kBFloat16: return BF16::load(static_cast<const uint16_t*>(p) + i);
    case kFloat16: return F16::load(static_cast<const uint16_t*>(p) + i);
    default: return static_cast<const float*>(p)[i];
  }
}

// out[r, n0 + j] = v[j] for j < cols, rounded once to out's dtype
inline void store_row(const Args& a, int64_t r, int64_t n0, int64_t cols, const float* v) {
  const int64_t elem = a.out_dtype == kFloat32 ? 4 : 2;
  char* dst = static_cast<char*>(a.out) + (r * a.out_stride + n0) * elem;
  switch (a.out_dtype) {
    case kFloat32: std::memcpy(dst, v, size_t(cols) * 4); break;
    case kBFloat16:
      for (int64_t j = 0; j < cols; ++j) BF16::store(reinterpret_cast<uint16_t*>(dst) + j, v[j]);
      break;
    default:
      for (int64_t j = 0; j < cols; ++j) F16::store(reinterpret_cast<uint16_t*>(dst) + j, v[j]);
      break;
  }
}

// out[r0 + r, n0 + j] = dots[r][j] (* w_scale[n0 + j]) + bias[n0 + j] for r < rows, j < cols
inline void store_block(const Args& a, int64_t r0, int64_t rows, int64_t n0, int64_t cols,
                        const float dots[kMaxRows][kBlock]) {
  float bv[kBlock] = {}, sv[kBlock];
  for (int64_t j = 0; j < cols; ++j) {
    if (a.bias) bv[j] = load_scalar(a.bias, n0 + j, a.bias_dtype);
    sv[j] = a.w_scale ? a.w_scale[n0 + j] : 1.0f;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float v[kBlock];
    for (int64_t j = 0; j < cols; ++j) v[j] = a.w_scale ? dots[r][j] * sv[j] + bv[j] : dots[r][j] + bv[j];
    store_row(a, r0 + r, n0, cols, v);
  }
}

template <class E>
void to_f32(float* dst, int64_t kp, const typename E::T* src, int64_t stride, int64_t m, int64_t k) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) dst[r * kp + i] = E::load(src + r * stride + i);
}

// ---------------------------------------------------------------------------------------
// AVX2

template <class W>
struct WLoad {  // 8 weights as fp32
  static RF_AVX2 RF_INLINE __m256 load(const typename W::T* p) { return V8<W>::load(p); }
};
template <>
struct WLoad<I8> {
  static RF_AVX2 RF_INLINE __m256 load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

template <class W>
RF_AVX2 RF_INLINE __m256 wload_tail(const typename W::T* p, int64_t n) {
  typename W::T buf[8] = {};
  std::memcpy(buf, p, size_t(n) * sizeof(typename W::T));
  return WLoad<W>::load(buf);
}

// acc[r][j] += x[r, i : i + 8] * wv[j]
template <int MR, int NR>
RF_AVX2 RF_INLINE void fma_step(__m256 acc[MR][NR], const float* x, int64_t kp, int64_t i, const __m256 wv[NR]) {
  for (int r = 0; r < MR; ++r) {
    const __m256 xv = _mm256_loadu_ps(x + r * kp + i);
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
  }
}

// dots[r * kBlock + j] = x[r] . w[j] for MR rows of x (kp apart) and NR weight rows wr[j];
// prefetches the same lines of the rows `ahead` bytes further on (the next block's).
template <class W, int MR, int NR>
RF_AVX2 void dot_block(const float* x, int64_t kp, const typename W::T* const* wr, int64_t k, float* dots,
                       int64_t ahead) {
  using T = typename W::T;
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line: 16 fp32, 32 bf16, 64 int8
  __m256 acc[MR][NR];                        // sums of the finished chunks
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  const T* w[NR];
  for (int j = 0; j < NR; ++j) w[j] = wr[j];
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t cend = std::min(k, c0 + kChunk);
    __m256 part[MR][NR];  // this chunk
    for (auto& row : part)
      for (auto& v : row) v = _mm256_setzero_ps();
    int64_t i = c0;
    for (; i + kLine <= cend; i += kLine) {
      if (ahead)
        for (int j = 0; j < NR; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(w[j] + i) + ahead, _MM_HINT_T0);
      for (int64_t u = 0; u < kLine; u += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j) wv[j] = WLoad<W>::load(w[j] + i + u);
        fma_step<MR, NR>(part, x, kp, i + u, wv);
      }
    }
    for (; i + 8 <= cend; i += 8) {
      __m256 wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = WLoad<W>::load(w[j] + i);
      fma_step<MR, NR>(part, x, kp, i, wv);
    }
    if (i < cend) {  // last partial vector: w lanes past k read as 0, x is zero-padded
      __m256 wv[NR];
      for (int j = 0; j < NR; ++j) wv[j] = wload_tail<W>(w[j] + i, cend - i);
      fma_step<MR, NR>(part, x, kp, i, wv);
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_add_ps(acc[r][j], part[r][j]);
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) dots[r * kBlock + j] = hsum(acc[r][j]);
}

// AVX-512 (avx512vnni ISA level and above), M > 1 and int8 M = 1: dot_block with two weight
// rows per zmm register, row j in lanes 0-7 and row j + 1 in lanes 8-15, against x's 8
// lanes broadcast to both halves. Every lane sums exactly the products, chunks and order of
// its AVX2 lane, and the halves are summed by the same hsum: the AVX2 bits, with half the
// FMAs and (int8) half the widening instructions. NP pairs cover the 8 rows of a block, and
// the MR x NP chunk sums fit in the 32 zmm registers.
template <class W>
struct WPair {  // weights [i, i + 8) of rows a and b as one 16-lane vector (a low, b high);
                // bf16 widens once, after joining the two rows (3 uops instead of 5)
  static RF_AVX512VNNI RF_INLINE __m512 load(const typename W::T* a, const typename W::T* b) {
    return load_pair<W>(a, b);
  }
};
template <>
struct WPair<I8> {  // one 16-byte vector, widened once
  static RF_AVX512VNNI RF_INLINE __m512 load(const int8_t* a, const int8_t* b) {
    const __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a));
    const __m128i both = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), reinterpret_cast<const double*>(b)));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(both));
  }
};

template <class W>
RF_AVX512VNNI RF_INLINE __m512 wpair_tail(const typename W::T* a, const typename W::T* b, int64_t n) {
  typename W::T buf[2][8] = {};
  std::memcpy(buf[0], a, size_t(n) * sizeof(typename W::T));
  std::memcpy(buf[1], b, size_t(n) * sizeof(typename W::T));
  return WPair<W>::load(buf[0], buf[1]);
}

template <int MR, int NP>
RF_AVX512VNNI RF_INLINE void fma_step512(__m512 acc[MR][NP], const float* x, int64_t kp, int64_t i,
                                         const __m512 wv[NP]) {
  for (int r = 0; r < MR; ++r) {
    const __m512 xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(x + r * kp + i))));
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_fmadd_ps(xv, wv[q], acc[r][q]);
  }
}

// dot_block for MR rows of x and the 2 NP weight rows wr[0 .. 2 NP).
template <class W, int MR, int NP>
RF_AVX512VNNI void dot_block512(const float* x, int64_t kp, const typename W::T* const* wr, int64_t k, float* dots,
                                int64_t ahead) {
  using T = typename W::T;
  constexpr int64_t kLine = 64 / sizeof(T);
  __m512 acc[MR][NP];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t cend = std::min(k, c0 + kChunk);
    __m512 part[MR][NP];
    for (auto& row : part)
      for (auto& v : row) v = _mm512_setzero_ps();
    int64_t i = c0;
    for (; i + kLine <= cend; i += kLine) {
      if (ahead)
        for (int j = 0; j < 2 * NP; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + i) + ahead, _MM_HINT_T0);
      for (int64_t u = 0; u < kLine; u += 8) {
        __m512 wv[NP];
        for (int q = 0; q < NP; ++q) wv[q] = WPair<W>::load(wr[2 * q] + i + u, wr[2 * q + 1] + i + u);
        fma_step512<MR, NP>(part, x, kp, i + u, wv);
      }
    }
    for (; i + 8 <= cend; i += 8) {
      __m512 wv[NP];
      for (int q = 0; q < NP; ++q) wv[q] = WPair<W>::load(wr[2 * q] + i, wr[2 * q + 1] + i);
      fma_step512<MR, NP>(part, x, kp, i, wv);
    }
    if (i < cend) {
      __m512 wv[NP];
      for (int q = 0; q < NP; ++q) wv[q] = wpair_tail<W>(wr[2 * q] + i, wr[2 * q + 1] + i, cend - i);
      fma_step512<MR, NP>(part, x, kp, i, wv);
    }
    for (int r = 0; r < MR; ++r)
      for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_add_ps(acc[r][q], part[r][q]);
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NP; ++q) {
      dots[r * kBlock + 2 * q] = hsum(_mm512_castps512_ps256(acc[r][q]));
      dots[r * kBlock + 2 * q + 1] = hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][q]), 1)));
    }
}

// One 8-row block for `rows` (1 .. 4) rows of x, all 8 weight rows at once.
template <class W>
RF_AVX512VNNI void block_avx512(int64_t rows, const float* x, int64_t kp, const typename W::T* const* wr, int64_t k,
                                float* d, int64_t ahead) {
  switch (rows) {
    case 1: dot_block512<W, 1, 4>(x, kp, wr, k, d, ahead); break;
    case 2: dot_block512<W, 2, 4>(x, kp, wr, k, d, ahead); break;
    case 3: dot_block512<W, 3, 4>(x, kp, wr, k, d, ahead); break;
    default: dot_block512<W, 4, 4>(x, kp, wr, k, d, ahead); break;
  }
}

// x[r] . w for MR (1 .. 4) rows of x (kp apart) and one weight row, in dot_block's order:
// each chunk of kChunk k summed by its own chain from 0 (the weight vector loaded once and
// used MR times), the chunks added to the total in order. d[r * d_stride] = x[r] . w.
// Weight rows are walked one after another and each row in address order (one sequential
// stream per thread, left to the hardware prefetchers; the out-of-order core overlaps the
// chains of consecutive chunks). Zen 5 VM, 2 threads, SmolLM2's linears, cold, interleaved
// A/B (2026-12-07, ms per pass over the weights):
// - M = 1, every weight type: int8 9.2 -> 6.1-7.1 against the 8-row blocks (whose four rows
//   576 bytes apart kept the DRAM read at half the plain-read rate, software prefetch or
//   not); fp32 rows read with four chunk chains stepping through four places at once ran
//   at ~90 % of the plain-read rate, in address order at ~100 %; a 4-chunk unrolled form of
//   M = 1 measured the same as this loop.
// - M = 2 .. 4, fp32 / bf16 weights (kRowsPath): AVX2 fp32 M = 2 / 4 22.3 / 24.9 -> 17.4 /
//   21.5, bf16 15.6 / 15.1 -> 9.9 / 13.8 against the 8-row blocks; against the 16-lane
//   blocks fp32 M = 2 / 3 / 4 20.7 / 21.3 / 22.2 -> 18.2 / 19.4 / 22.0, bf16 14.3 / 14.6 /
//   15.8 -> 9.4 / 11.7 / 14.1. At M = 8 / 16 the blocks stay ahead (AVX2 fp32 27.9 / 47
//   against 29.8 / 52 ms), as they do for int8 weights from M = 3 (the converts make them
//   compute-bound: M = 4 10.7 against 12.5 ms).
template <class W>
constexpr bool kRowsPath = !std::is_same_v<W, I8>;

template <class W, int MR>
RF_AVX2 void dot_rows(const float* x, int64_t kp, const typename W::T* w, int64_t k, float* d, int64_t d_stride) {
  __m256 acc[MR];
  RF_UNROLL for (auto& v : acc) v = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t cend = std::min(k, c0 + kChunk);
    __m256 part[MR];
    RF_UNROLL for (auto& v : part) v = _mm256_setzero_ps();
    int64_t i = c0;
    for (; i + 8 <= cend; i += 8) {
      const __m256 wv = WLoad<W>::load(w + i);
      RF_UNROLL for (int r = 0; r < MR; ++r) part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * kp + i), wv, part[r]);
    }
    if (i < cend) {
      const __m256 wv = wload_tail<W>(w + i, cend - i);
      RF_UNROLL for (int r = 0; r < MR; ++r) part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * kp + i), wv, part[r]);
    }
    RF_UNROLL for (int r = 0; r < MR; ++r) acc[r] = _mm256_add_ps(acc[r], part[r]);
  }
  RF_UNROLL for (int r = 0; r < MR; ++r) d[r * d_stride] = hsum(acc[r]);
}

template <class W>
RF_AVX2 void run_avx2(const Args& a, int threads) {
  using T = typename W::T;
  const int64_t blocks = (a.n + kBlock - 1) / kBlock;
  const int64_t ahead = kBlock * a.w_stride * int64_t(sizeof(T));
  const bool parallel = threads > 1 && blocks > 1 && a.n * a.k * std::min<int64_t>(a.m, 4) >= (int64_t(1) << 16);
  const bool wide = avx512_kernels();
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * kBlock, cols = std::min(kBlock, a.n - n0);
    const T* wr[kBlock];  // rows past n repeat the last one (computed, not stored)
    for (int64_t j = 0; j < kBlock; ++j)
      wr[j] = static_cast<const T*>(a.w) + (n0 + std::min(j, cols - 1)) * a.w_stride;
    if (a.m == 1 || (kRowsPath<W> && a.m <= kMaxRows)) {  // weight row by weight row
      float dots[kMaxRows][kBlock];
      for (int64_t j = 0; j < cols; ++j) switch (a.m) {
          case 1: dot_rows<W, 1>(a.x, a.kp, wr[j], a.k, &dots[0][j], kBlock); break;
          case 2: dot_rows<W, 2>(a.x, a.kp, wr[j], a.k, &dots[0][j], kBlock); break;
          case 3: dot_rows<W, 3>(a.x, a.kp, wr[j], a.k, &dots[0][j], kBlock); break;
          default: dot_rows<W, 4>(a.x, a.kp, wr[j], a.k, &dots[0][j], kBlock); break;
        }
      store_block(a, 0, a.m, n0, cols, dots);
      continue;
    }
    for (int64_t r0 = 0; r0 < a.m; r0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, a.m - r0);
      const float* x = a.x + r0 * a.kp;
      float dots[kMaxRows][kBlock];
      float* d = &dots[0][0];
      if (wide) {
        block_avx512<W>(rows, x, a.kp, wr, a.k, d, ahead);
        store_block(a, r0, rows, n0, cols, dots);
        continue;
      }
      switch (rows) {
        case 1:  // 1 x 4 twice: 1 x 8 needs 16 accumulators (chunk sums and totals), and
                 // the 16 ymm registers spilled one, a chain through the stack on every FMA
          for (int64_t j0 = 0; j0 < cols; j0 += 4) dot_block<W, 1, 4>(x, a.kp, wr + j0, a.k, d + j0, ahead);
          break;
        case 2:
          for (int64_t j0 = 0; j0 < cols; j0 += 4) dot_block<W, 2, 4>(x, a.kp, wr + j0, a.k, d + j0, ahead);
          break;
        case 3:
          for (int64_t j0 = 0; j0 < cols; j0 += 4) dot_block<W, 3, 4>(x, a.kp, wr + j0, a.k, d + j0, ahead);
          break;
        default:  // 4 x 3, 4 x 3, 4 x 2 (12 chains; 4 x 2 everywhere measured ~10% slower at M = 4, 8)
          dot_block<W, 4, 3>(x, a.kp, wr, a.k, d, ahead);
          if (cols > 3) dot_block<W, 4, 3>(x, a.kp, wr + 3, a.k, d + 3, ahead);
          if (cols > 6) dot_block<W, 4, 2>(x, a.kp, wr + 6, a.k, d + 6, ahead);
          break;
      }
      store_block(a, r0, rows, n0, cols, dots);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Scalar fallback: the same reduction order, separate multiply and add.

template <class W>
void run_scalar(const Args& a, int threads) {
  using T = typename W::T;
  const bool parallel = threads > 1 && a.n > 1 && a.n * a.k * a.m >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t col = 0; col < a.n; ++col) {
    const T* w = static_cast<const T*>(a.w) + col * a.w_stride;
    for (int64_t r = 0; r < a.m; ++r) {
      const float* x = a.x + r * a.kp;
      float dots[kMaxRows][kBlock];
      dots[0][0] = chunked_dot(a.k, [&](int64_t i) { return x[i] * W::load(w + i); });
      store_block(a, r, 1, col, 1, dots);
    }
  }
}

}  // namespace

namespace {

// x as fp32 rows zero-padded to kp = 8 ceil(k / 8): M K floats, small next to W
std::vector<float> padded_x(std::uintptr_t x, int64_t x_stride, int x_dtype, int64_t m, int64_t k, int64_t kp) {
  std::vector<float> xf(size_t(m * kp), 0.0f);
  switch (x_dtype) {
    case kBFloat16: to_f32<BF16>(xf.data(), kp, reinterpret_cast<const uint16_t*>(x), x_stride, m, k); break;
    case kFloat16: to_f32<F16>(xf.data(), kp, reinterpret_cast<const uint16_t*>(x), x_stride, m, k); break;
    default: to_f32<F32>(xf.data(), kp, reinterpret_cast<const float*>(x), x_stride, m, k); break;
  }
  return xf;
}

// M past kRowKernelMaxM: panel_gemm.h's GEMM on the weights packed once per call (fp32
// copied, bf16 widened into [K][16] panels), + bias, one rounding to out's dtype.
template <class W>
RF_AVX2 void run_gemm(const Args& a, int threads) {
  using T = typename W::T;
  const auto pack = [&](int64_t n0, int64_t ncols, float* wp, int64_t wp_stride) {
    panel_gemm::pack_rows<W>(static_cast<const T*>(a.w) + n0 * a.w_stride, a.w_stride, ncols, a.k, wp, wp_stride);
  };
  const auto finish = [&](int64_t r, int64_t n0, int64_t ncols, const float* sums) {
    float v[panel_gemm::kCols512];
    for (int64_t j = 0; j < ncols; ++j) v[j] = sums[j] + (a.bias ? load_scalar(a.bias, n0 + j, a.bias_dtype) : 0.0f);
    store_row(a, r, n0, ncols, v);
  };
  panel_gemm::run(a.m, a.n, a.k, a.x, a.kp, pack, finish, threads);
}

template <class W>
void run(const Args& a, int threads) {
  if (active_isa() != Isa::kAvx2) {
    run_scalar<W>(a, threads);
    return;
  }
  if constexpr (!std::is_same_v<W, I8>)  // int8_weight_only_linear sends at most 16 rows here
    if (a.m > kRowKernelMaxM && a.k > 0) {
      run_gemm<W>(a, threads);
      return;
    }
  run_avx2<W>(a, threads);
}

}  // namespace

void linear(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x, int64_t x_stride, int x_dtype,
            std::uintptr_t w, int64_t w_stride, int w_dtype, std::uintptr_t bias, int bias_dtype, int64_t m,
            int64_t n, int64_t k, int num_threads) {
  const std::string p = "linear: ";
  auto is_float = [](int d) { return d == kFloat32 || d == kBFloat16 || d == kFloat16; };
  RINGFUSE_CHECK(m >= 0 && n >= 0 && k >= 0, p + "sizes m, n, k must be >= 0");
  RINGFUSE_CHECK(is_float(out_dtype) && is_float(x_dtype), p + "x and out must be float32, bfloat16 or float16");
  RINGFUSE_CHECK(w_dtype == kFloat32 || w_dtype == kBFloat16, p + "w must be float32 or bfloat16");
  RINGFUSE_CHECK(!bias || is_float(bias_dtype), p + "bias must be float32, bfloat16 or float16");
  if (m == 0 || n == 0) return;
  RINGFUSE_CHECK(out && out_stride >= n, p + "null out or out_stride < n");
  RINGFUSE_CHECK(k == 0 || (x && w && x_stride >= k && w_stride >= k), p + "null x / w or row stride < k");
  const int64_t kp = (k + 7) / 8 * 8;
  const std::vector<float> xf = padded_x(x, x_stride, x_dtype, m, k, kp);
  const Args a{reinterpret_cast<void*>(out), out_stride, out_dtype, xf.data(), kp,
               reinterpret_cast<const void*>(w), w_stride, reinterpret_cast<const void*>(bias), bias_dtype,
               nullptr, m, n, k};
  const int threads = std::max(1, num_threads);
  if (w_dtype == kBFloat16)
    run<BF16>(a, threads);
  else
    run<F32>(a, threads);
}

void linear_int8_per_channel(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x,
                             int64_t x_stride, std::uintptr_t w, int64_t w_stride, std::uintptr_t w_scale,
                             std::uintptr_t bias, int64_t m, int64_t n, int64_t k, int num_threads) {
  RINGFUSE_CHECK(m >= 0 && n >= 0 && k >= 1, "linear_int8_per_channel: sizes must be m, n >= 0 and k >= 1");
  if (m == 0 || n == 0) return;
  RINGFUSE_CHECK(out && x && w && w_scale && out_stride >= n && x_stride >= k && w_stride >= k,
                 "linear_int8_per_channel: bad pointers or strides");
  const int64_t kp = (k + 7) / 8 * 8;
  const std::vector<float> xf = padded_x(x, x_stride, kFloat32, m, k, kp);
  const Args a{reinterpret_cast<void*>(out), out_stride, out_dtype, xf.data(), kp,
               reinterpret_cast<const void*>(w), w_stride, reinterpret_cast<const void*>(bias), kFloat32,
               reinterpret_cast<const float*>(w_scale), m, n, k};
  run<I8>(a, std::max(1, num_threads));
}

}  // namespace ringfuse::cpu
