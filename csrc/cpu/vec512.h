// AVX-512 building blocks for the kernels' 16-lane paths (the avx512vnni ISA level and
// above, avx512_kernels()). Each one is its vec.h counterpart at twice the width with the
// same operations lane by lane, so a 16-lane kernel gives its 8-lane AVX2 kernel's bits.
#pragma once
#include "cpu/vec.h"

namespace ringfuse::cpu {

// 16 lanes of E as fp32 (loads), and fp32 rounded once to E (stores), as V8<E>.
template <class E>
struct V16;

template <>
struct V16<F32> {
  static RF_AVX512VNNI RF_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static RF_AVX512VNNI RF_INLINE void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

template <>
struct V16<BF16> {
  static RF_AVX512VNNI RF_INLINE __m512 load(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // round-to-nearest-even, NaN -> quiet NaN 0x7fc0 (f32x8_to_bf16_lanes)
  static RF_AVX512VNNI RF_INLINE void store(uint16_t* p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

template <>
struct V16<F16> {
  static RF_AVX512VNNI RF_INLINE __m512 load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static RF_AVX512VNNI RF_INLINE void store(uint16_t* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};

// [lo | hi]: two 8-lane vectors as one 16-lane vector, and v in both halves.
RF_AVX512VNNI RF_INLINE __m512 pair8x2(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}
RF_AVX512VNNI RF_INLINE __m512 broadcast8x2(__m256 v) {
  return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(v)));
}

// Two 8-element rows as one 16-lane vector: lanes 0-7 = V8<E>::load(lo), lanes 8-15 =
// V8<E>::load(hi) (the same fp32 values: widening is exact); 16-bit types widen once.
template <class E>
RF_AVX512VNNI RF_INLINE __m512 load_pair(const typename E::T* lo, const typename E::T* hi) {
  if constexpr (E::code == kFloat32) {
    return pair8x2(_mm256_loadu_ps(lo), _mm256_loadu_ps(hi));
  } else {
    const __m256i both = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
    if constexpr (E::code == kBFloat16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(both), 16));
    else
      return _mm512_cvtph_ps(both);
  }
}

// The lanes of `lanes` loaded from p as fp32, the others 0; masked lanes are not read.
template <class E>
RF_AVX512VNNI RF_INLINE __m512 load16_masked(const typename E::T* p, __mmask16 lanes) {
  if constexpr (E::code == kFloat32) {
    return _mm512_maskz_loadu_ps(lanes, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(lanes, p);
    if constexpr (E::code == kBFloat16)
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else
      return _mm512_cvtph_ps(h);
  }
}

// exp8 at 16 lanes: the same clamps, reduction, polynomial and 2^n, operation for operation.
RF_AVX512VNNI RF_INLINE __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.3762626647949f);
  const __mmask16 too_small = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(hi, _mm512_max_ps(lo, x));  // NaN kept, as in exp8
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  y = _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
  return _mm512_maskz_mov_ps(_knot_mask16(too_small), y);
}

}  // namespace ringfuse::cpu
