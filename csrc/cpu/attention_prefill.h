// Internal to csrc/cpu/attention*.cpp: the prefill kernel's argument bundle and work items,
// shared by its AVX2 / scalar paths (attention.cpp) and its AMX path (attention_amx.cpp).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/vec.h"

namespace ringfuse::cpu {

constexpr int64_t kKeyTile = 64;  // keys per tile (columns of S)
constexpr int64_t kMaxRows = 64;  // rows per item: heads x queries

struct PrefillArgs {
  void* out;
  int64_t o_sb, o_sh, o_ss;
  float* lse;  // null: not returned
  int64_t l_sb, l_sh, l_ss;
  const void* q;
  int64_t q_sb, q_sh, q_ss;
  const void* k;
  int64_t k_sb, k_sh, k_ss;
  const void* v;
  int64_t v_sb, v_sh, v_ss;
  const int32_t* cu_q;  // null: every sequence has sq queries and sk keys
  const int32_t* cu_k;
  int64_t batch, sq, sk, hq, hkv, d, group;
  bool causal;
  float scale, softcap;
  int64_t window;  // > 0 (causal only): query i sees keys (i + diag - window, i + diag]
};

struct PrefillItem {
  int64_t b, kvh, g0, g1, i0, i1;  // query heads kvh * group + [g0, g1), queries [i0, i1)
};

// first row and length of sequence b's queries (cu = cu_q) or keys (cu = cu_k)
inline void seq_range(const int32_t* cu, int64_t fixed, int64_t b, int64_t& start, int64_t& len) {
  start = cu ? cu[b] : 0;
  len = cu ? cu[b + 1] - cu[b] : fixed;
}

// Keys [lo, hi) that some query of the item sees (diag = klen - qlen: query i sees key j iff
// j <= i + diag, and j > i + diag - window with a window).
inline void item_keys(const PrefillArgs& a, const PrefillItem& it, int64_t klen, int64_t diag, int64_t& lo,
                      int64_t& hi) {
  hi = a.causal ? std::clamp<int64_t>(it.i1 + diag, 0, klen) : klen;
  lo = a.window > 0 ? std::clamp<int64_t>(it.i0 + diag - a.window + 1, 0, klen) : 0;
}

// The keys of tile [j0, j0 + nk) that query i sees: [first, valid), relative to j0.
inline void row_keys(const PrefillArgs& a, int64_t i, int64_t diag, int64_t j0, int64_t nk, int64_t& first,
                     int64_t& valid) {
  valid = a.causal ? std::clamp<int64_t>(i + diag - j0 + 1, 0, nk) : nk;
  first = a.window > 0 ? std::clamp<int64_t>(i + diag - a.window + 1 - j0, 0, nk) : 0;
}

// tanh(x), within a few ulp of fp32 everywhere (the softcap multiplies its error back by
// softcap, so an absolute error of ~1e-7 near 0 would grow with the cap):
//   |x| >= 0.4: 1 - 2 / (e^(2x) + 1), exact limits +-1 (exp8 saturates), < 2 bits lost to
//               the subtraction since tanh(0.4) = 0.38;
//   |x| <  0.4: the Taylor series to x^13, x + x^3 * P(x^2) (the next term, 1.5e-3 x^15, is
//               < 2e-9 there).
RF_AVX2 RF_INLINE __m256 tanh8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 e = exp8(_mm256_add_ps(x, x));
  const __m256 far = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(21844.0f / 6081075.0f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1382.0f / 155925.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(62.0f / 2835.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-17.0f / 315.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.0f / 3.0f));
  const __m256 near = _mm256_fmadd_ps(_mm256_mul_ps(p, x2), x, x);
  const __m256 abs_x = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_blendv_ps(far, near, _mm256_cmp_ps(abs_x, _mm256_set1_ps(0.4f), _CMP_LT_OQ));
}

// The AMX path (attention_amx.cpp): bf16 inputs, head_dim a multiple of 32 up to 256 and
// scale > 0. amx_prefill_takes says whether it serves a call (false whenever the build or
// the CPU has no AMX, or the ISA choice excludes it); amx_prefill runs the items.
bool amx_prefill_takes(const PrefillArgs& a, int dtype);
void amx_prefill(const PrefillArgs& a, const std::vector<PrefillItem>& items, int num_threads);

}  // namespace ringfuse::cpu
