// Internal to csrc/cpu/{int8_gemm,linear}.cpp: a register-blocked fp32 GEMM on weights packed
// once per call into column panels, out[m, n] = finish(sum_k x[m, k] w[n, k]). The w8a16
// linear packs int8 weights dequantized (int8_gemm.cpp), the float linear past decode sizes
// packs fp32 / bf16 weights (linear.cpp, pack_rows below).
//
// Each thread takes items of item_cols output columns, packs W's rows [n0, n0 + item_cols)
// into wp [K][item_cols] fp32 (one k's columns adjacent; K * item_cols * 4 bytes, L2-resident
// up to K ~ 8K with 16 columns), then runs register blocks over all rows of x:
//   AVX2: 6 rows x 16 columns, 12 ymm accumulators; per k 2 panel loads, 6 broadcasts of x
//         and 12 FMAs (RF_UNROLL keeps them in registers: without it GCC stored all 12 on
//         every k and the block ran at half the speed);
//   AVX-512 (avx512vnni ISA level and above): 12 rows x 32 columns (two panels), 24 zmm
//         accumulators; per k 2 panel loads, 12 broadcasts, 24 FMAs, so the FMA ports, not
//         the loads, set the pace (8 lanes: 2 + 6 loads per 12 FMAs).
// Each output sums its K products in the same order on both levels (chunks, see block): the
// same bits, and the same for any thread count. Packing costs ~1 / M of the FMAs.
// Napkin math, M = 256, K = N = 4096: 8.6 GFLOP, ~32 ms at the AVX2 FMA peak of 2 Zen 5
// cores (~270 GFLOP/s), ~16 ms at the AVX-512 one; W is read once (64 MB fp32, 16 MB int8).
// Measured (Zen 5 VM, 2 threads, warm, [4096, 4096], M = 17 / 64 / 256): w8a16 AVX2 174 /
// 231 / 255 GFLOP/s, AVX-512 233 / 390 / 461; fp32 weights AVX2 131 / - / 238, AVX-512 179 /
// 310 / 402 (torch's fp32 F.linear, MKL AVX-512: 69-75 / 119-130 / 174-182). On a Sapphire
// Rapids VM a 12 x 16 AVX-512 block (one panel) reached 118 / 163 / 196 where 12 x 32 gave
// 142 / 220 / 271.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/vec.h"

namespace ringfuse::cpu::panel_gemm {

constexpr int64_t kPanel = 16;          // columns per packed panel (AVX2 item)
constexpr int kRows = 6;                // AVX2 block rows
constexpr int64_t kCols512 = 2 * kPanel;  // AVX-512 item: two panels
constexpr int kRows512 = 12;            // AVX-512 block rows

// Each output sums its k products in chunks of kChunk k, each chunk from zero in k order,
// the chunks added in order into `out` (the first one stored as it is): the longest chain of
// dependent adds is kChunk + K / kChunk instead of K (one chain per output over K = 1000 had
// 4x torch's rounding error; the per-row kernel of linear.cpp chunks its sums the same way).
constexpr int64_t kChunk = 64;

template <int MR>
RF_AVX2 void block(const float* x, int64_t x_stride, const float* wp, int64_t k, float out[][kPanel]) {
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t cend = std::min(k, c0 + kChunk);
    __m256 acc[MR][2];
    RF_UNROLL for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
    for (int64_t kk = c0; kk < cend; ++kk) {
      const __m256 w0 = _mm256_loadu_ps(wp + kk * kPanel), w1 = _mm256_loadu_ps(wp + kk * kPanel + 8);
      RF_UNROLL for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_broadcast_ss(x + r * x_stride + kk);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
    RF_UNROLL for (int r = 0; r < MR; ++r)
      RF_UNROLL for (int h = 0; h < 2; ++h) {
        float* o = out[r] + 8 * h;
        _mm256_storeu_ps(o, c0 == 0 ? acc[r][h] : _mm256_add_ps(_mm256_loadu_ps(o), acc[r][h]));
      }
  }
}

template <int MR>
RF_AVX512VNNI void block512(const float* x, int64_t x_stride, const float* wp, int64_t k, float out[][kCols512]) {
  for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
    const int64_t cend = std::min(k, c0 + kChunk);
    __m512 acc[MR][2];
    RF_UNROLL for (auto& a : acc) a[0] = a[1] = _mm512_setzero_ps();
    for (int64_t kk = c0; kk < cend; ++kk) {
      const __m512 w0 = _mm512_load_ps(wp + kk * kCols512), w1 = _mm512_load_ps(wp + kk * kCols512 + 16);
      RF_UNROLL for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(x[r * x_stride + kk]);
        acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
    RF_UNROLL for (int r = 0; r < MR; ++r)
      RF_UNROLL for (int h = 0; h < 2; ++h) {
        float* o = out[r] + 16 * h;
        _mm512_storeu_ps(o, c0 == 0 ? acc[r][h] : _mm512_add_ps(_mm512_loadu_ps(o), acc[r][h]));
      }
  }
}

// Block functions by row count: kBlocks[rows - 1].
using Block = void (*)(const float*, int64_t, const float*, int64_t, float (*)[kPanel]);
using Block512 = void (*)(const float*, int64_t, const float*, int64_t, float (*)[kCols512]);
inline constexpr Block kBlocks[kRows] = {&block<1>, &block<2>, &block<3>, &block<4>, &block<5>, &block<6>};
inline constexpr Block512 kBlocks512[kRows512] = {&block512<1>, &block512<2>,  &block512<3>,  &block512<4>,
                                                  &block512<5>, &block512<6>,  &block512<7>,  &block512<8>,
                                                  &block512<9>, &block512<10>, &block512<11>, &block512<12>};

// out[m, n] = finish(x @ W^T) for x fp32 [m, k] (rows x_stride apart), k >= 1. The weights come
// through pack(n0, ncols, wp, wp_stride), which writes W's rows [n0, n0 + ncols) (ncols <=
// kPanel) transposed, wp[kk * wp_stride + j] = W[n0 + j, kk], zeros for ncols <= j < kPanel.
// finish(r, n0, ncols, sums) takes row r's sums for columns [n0, n0 + ncols).
template <class Pack, class Finish>
RF_AVX2 void run(int64_t m, int64_t n, int64_t k, const float* x, int64_t x_stride, const Pack& pack,
                 const Finish& finish, int num_threads) {
  const bool wide = avx512_kernels();
  const int64_t item_cols = wide ? kCols512 : kPanel, block_rows = wide ? kRows512 : kRows;
  const int64_t items = (n + item_cols - 1) / item_cols;
#pragma omp parallel num_threads(num_threads) if (items > 1)
  {
    // [K][item_cols], this thread's packed columns, 64-byte aligned (whole-line loads)
    std::vector<float> wp_buf(size_t(k) * item_cols + 16);
    float* wp = wp_buf.data() + (16 - reinterpret_cast<std::uintptr_t>(wp_buf.data()) / sizeof(float) % 16) % 16;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t n0 = item * item_cols, ncols = std::min(item_cols, n - n0);
      for (int64_t c = 0; c < item_cols; c += kPanel)  // a missing second panel is zeros
        pack(n0 + c, std::clamp<int64_t>(ncols - c, 0, kPanel), wp + c, item_cols);
      for (int64_t r0 = 0; r0 < m; r0 += block_rows) {
        const int64_t rows = std::min<int64_t>(block_rows, m - r0);
        alignas(64) float out[kRows512][kCols512];
        if (wide)
          kBlocks512[rows - 1](x + r0 * x_stride, x_stride, wp, k, out);
        else
          kBlocks[rows - 1](x + r0 * x_stride, x_stride, wp, k, reinterpret_cast<float (*)[kPanel]>(out));
        for (int64_t r = 0; r < rows; ++r)
          finish(r0 + r, n0, ncols, wide ? out[r] : out[0] + kPanel * r);  // rows of 32 or 16 floats
      }
    }
  }
}

// A pack for run(): W's rows [0, ncols) (ncols <= kPanel; elements of type T, rows w_stride
// apart) into wp [k][kPanel] (rows wp_stride apart), zeros past ncols, by 8 x 8 transposes.
// load8(col, kk) gives row col's elements [kk, kk + 8) as fp32, load1(col, kk) one element
// (the K tail): a float copy or widening, or an int8 dequantization. Cold weights: each of
// the 16 row streams is prefetched 1 KiB ahead, once per cache line (the hardware
// prefetcher stops at page ends).
template <class T, class Load8, class Load1>
RF_AVX2 RF_INLINE void pack_panel(const T* w, int64_t w_stride, int64_t ncols, int64_t k, float* wp,
                                  int64_t wp_stride, const Load8& load8, const Load1& load1) {
  constexpr int64_t kAhead = 1024 / int64_t(sizeof(T));
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    if ((kk * int64_t(sizeof(T))) % 64 == 0)
      for (int64_t j = 0; j < ncols; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * w_stride + kk + kAhead), _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j) {
        const int64_t col = 8 * h + j;
        r[j] = col < ncols ? load8(col, kk) : _mm256_setzero_ps();
      }
      transpose8(r);  // r[i] = w[8h .. 8h + 8][kk + i]
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(wp + (kk + i) * wp_stride + 8 * h, r[i]);
    }
  }
  for (; kk < k; ++kk)
    for (int64_t j = 0; j < kPanel; ++j) wp[kk * wp_stride + j] = j < ncols ? load1(j, kk) : 0.0f;
}

// pack_panel for float weights (E: F32 or BF16)
template <class E>
RF_AVX2 void pack_rows(const typename E::T* w, int64_t w_stride, int64_t ncols, int64_t k, float* wp,
                       int64_t wp_stride) {
  pack_panel(
      w, w_stride, ncols, k, wp, wp_stride,
      [&](int64_t col, int64_t kk) RF_AVX2 { return V8<E>::load(w + col * w_stride + kk); },
      [&](int64_t col, int64_t kk) { return E::load(w + col * w_stride + kk); });
}

}  // namespace ringfuse::cpu::panel_gemm
