// CPU building blocks shared by the kernels in csrc/cpu: dtype conversions (scalar and
// AVX2/F16C), run-time ISA selection and the OpenMP row splitter.
//
// AVX2 code is compiled with function-level target attributes (RF_AVX2) rather than
// -mavx2 for the whole file, so one binary carries both paths and picks one at run time.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#define RF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define RF_AVX512VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define RF_INLINE inline __attribute__((always_inline))
// Before a loop over an array of registers with a compile-time trip count (accumulators of
// a register block): GCC 12 unrolls such loops only after it has decided the array lives
// on the stack, and then stores every accumulator to memory on every iteration of the loop
// around them (12 stores per k in the 6 x 16 w8a16 GEMM block). Unrolling first keeps the
// array in registers; the operations and their order are the same, so are the bits. Zen 5
// VM, AVX2 path, w8a16 [4096, 4096] at M = 256: 127 -> 234 GFLOP/s (47 -> 87 % of the
// 2-core FMA peak).
#define RF_UNROLL _Pragma("GCC unroll 32")

namespace ringfuse::cpu {

// ---------------------------------------------------------------------------------------
// Run-time ISA choice. "avx2" needs AVX2 + FMA + F16C; "scalar" runs anywhere. Tests force
// "scalar" to exercise the fallback on this machine. "avx512vnni" is "avx2" plus the int8
// GEMM's AVX-512 VNNI kernel (hosts that have it: auto picks it there); "avx2" alone keeps
// the int8 GEMM on its AVX2 kernel, so tests can run both (the fp32 prefill attention's
// AVX-512 products follow the same choice). "amx" is "avx512vnni" plus the
// bf16 prefill attention on AMX tiles (Sapphire Rapids and later; auto picks it there).
enum class Isa : int { kScalar = 0, kAvx2 = 1 };
bool cpu_has_avx2();         // AVX2 + FMA + F16C present
bool cpu_has_avx512_vnni();  // AVX-512 F/BW/VL + VNNI present
bool cpu_has_avx512_bf16();  // AVX-512 VNNI level + AVX-512 BF16 (vdpbf16ps: native bf16 dot products)
bool cpu_has_amx();          // AMX-TILE + AMX-BF16, enabled by the OS for this process (and built in)
Isa active_isa();
bool int8_use_vnni();            // the int8 GEMM takes its AVX-512 VNNI kernel
bool avx512_kernels();           // the same ISA level: kernels with AVX-512 parts take them (prefill products)
bool attention_use_amx();        // bf16 prefill attention takes its AMX kernel
void set_isa(const char* name);  // "auto" | "amx" | "avx512vnni" | "avx2" | "scalar"; throws on unknown / unsupported
const char* isa_name(Isa isa);

// ---------------------------------------------------------------------------------------
// Scalar conversions. bf16: round-to-nearest-even, NaN -> quiet NaN (as c10::BFloat16).
// fp16: IEEE binary16 with round-to-nearest-even (as F16C's _MM_FROUND_TO_NEAREST_INT).
RF_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

RF_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while (!(man & 0x400u));
      u = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // rounds to inf (>= 65520)
  if (u < 0x38800000u) {                        // result is subnormal or zero
    // value = u_float; subnormal unit is 2^-24. Round-to-nearest-even of f * 2^24.
    float a;
    std::memcpy(&a, &u, 4);
    float scaled = a * 16777216.0f;  // exact: power-of-two scaling, no overflow here
    float r = std::nearbyint(scaled);  // default rounding mode: nearest-even
    return sign | uint16_t(r);
  }
  // normal: rebias exponent, round mantissa from 23 to 10 bits (nearest-even)
  uint32_t rounded = u + 0xfffu + ((u >> 13) & 1u);
  return sign | uint16_t((rounded - 0x38000000u) >> 13);
}

// Element types as tags: storage type + scalar load/store in fp32.
struct F32 {
  using T = float;
  static constexpr int code = kFloat32;
  static RF_INLINE float load(const T* p) { return *p; }
  static RF_INLINE void store(T* p, float v) { *p = v; }
  static RF_INLINE float round(float v) { return v; }
};
struct BF16 {
  using T = uint16_t;
  static constexpr int code = kBFloat16;
  static RF_INLINE float load(const T* p) { return bf16_to_f32(*p); }
  static RF_INLINE void store(T* p, float v) { *p = f32_to_bf16(v); }
  static RF_INLINE float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
};
struct F16 {
  using T = uint16_t;
  static constexpr int code = kFloat16;
  static inline float load(const T* p) { return f16_to_f32(*p); }
  static inline void store(T* p, float v) { *p = f32_to_f16(v); }
  static inline float round(float v) { return f16_to_f32(f32_to_f16(v)); }
};

// ---------------------------------------------------------------------------------------
// AVX2 loads/stores of 8 lanes, converting to/from fp32. `stream` selects non-temporal
// stores (caller guarantees alignment: 32 B for fp32, 16 B for 16-bit types).
template <class E>
struct V8;

template <>
struct V8<F32> {
  static RF_AVX2 RF_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static RF_AVX2 RF_INLINE void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
  static RF_AVX2 RF_INLINE void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
  // 16 lanes at once (p 32-byte aligned when streaming)
  static RF_AVX2 RF_INLINE void store2(float* p, __m256 a, __m256 b, bool nt) {
    if (nt) {
      _mm256_stream_ps(p, a);
      _mm256_stream_ps(p + 8, b);
    } else {
      _mm256_storeu_ps(p, a);
      _mm256_storeu_ps(p + 8, b);
    }
  }
  static RF_AVX2 RF_INLINE __m256 round(__m256 v) { return v; }
  // store v rounded to this type; return the rounded value as fp32
  static RF_AVX2 RF_INLINE __m256 round_store(float* p, __m256 v, bool nt) {
    if (nt)
      _mm256_stream_ps(p, v);
    else
      _mm256_storeu_ps(p, v);
    return v;
  }
  static RF_AVX2 RF_INLINE void round_store2(float* p, __m256& a, __m256& b, bool nt) { store2(p, a, b, nt); }
};

RF_AVX2 RF_INLINE __m256 bf16x8_to_f32(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// fp32 bits -> bf16 bits in the low half of each 32-bit lane (round-to-nearest-even,
// NaN -> quiet NaN)
RF_AVX2 RF_INLINE __m256i f32x8_to_bf16_lanes(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_srli_epi32(r, 16);
  const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), is_nan);
}

// The same rounding without the NaN fix-up, 2 uops cheaper per 8 lanes. Exact for every
// non-NaN value, and a NaN stays a NaN (sign and payload kept) when its low 16 bits are zero:
// the rounding carry then cannot reach the exponent. That holds for every NaN made from bf16
// data (a bf16 load; sums, products and square roots of such values) and for x86's default
// NaN. An fp32 NaN with payload in its low bits (0xffffffff) could round to +-0 or inf:
// callers pass fp32 inputs through canonicalize_nans first.
RF_AVX2 RF_INLINE __m256i f32x8_to_bf16_lanes_nan_clear(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}

RF_AVX2 RF_INLINE __m128i f32x8_to_bf16(__m256 v) {
  const __m256i r = f32x8_to_bf16_lanes(v);
  // pack 8 x u32 (each <= 0xffff) to 8 x u16 in order
  const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: a0..a3 a0..a3
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
}

template <>
struct V8<BF16> {
  static RF_AVX2 RF_INLINE __m256 load(const uint16_t* p) {
    return bf16x8_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static RF_AVX2 RF_INLINE void store(uint16_t* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f32x8_to_bf16(v));
  }
  static RF_AVX2 RF_INLINE void stream(uint16_t* p, __m256 v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), f32x8_to_bf16(v));
  }
  // 16 lanes with one pack and one permute (p 32-byte aligned when streaming)
  static RF_AVX2 RF_INLINE void store2(uint16_t* p, __m256 a, __m256 b, bool nt) {
    const __m256i packed = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(f32x8_to_bf16_lanes(a), f32x8_to_bf16_lanes(b)), 0b11011000);
    if (nt)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
  static RF_AVX2 RF_INLINE __m256 round_store(uint16_t* p, __m256 v, bool nt) {
    const __m256i lanes = f32x8_to_bf16_lanes(v);
    const __m128i packed =
        _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(lanes, lanes), 0b1000));
    if (nt)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), packed);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
    return _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));
  }
  // a, b <- rounded to bf16 (as fp32), and stored as 16 bf16 at p (32-byte aligned if nt)
  static RF_AVX2 RF_INLINE void round_store2(uint16_t* p, __m256& a, __m256& b, bool nt) {
    const __m256i la = f32x8_to_bf16_lanes(a), lb = f32x8_to_bf16_lanes(b);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(la, lb), 0b11011000);
    if (nt)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    a = _mm256_castsi256_ps(_mm256_slli_epi32(la, 16));
    b = _mm256_castsi256_ps(_mm256_slli_epi32(lb, 16));
  }
  // round to bf16 precision without leaving the fp32 lanes: RNE on the low 16 bits
  static RF_AVX2 RF_INLINE __m256 round(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    r = _mm256_and_si256(r, _mm256_set1_epi32(int(0xffff0000u)));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), is_nan));
  }
};

template <>
struct V8<F16> {
  static RF_AVX2 RF_INLINE __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static RF_AVX2 RF_INLINE void store(uint16_t* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static RF_AVX2 RF_INLINE void stream(uint16_t* p, __m256 v) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static RF_AVX2 RF_INLINE void store2(uint16_t* p, __m256 a, __m256 b, bool nt) {
    const __m256i packed = _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT),
                                            _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    if (nt)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  }
  static RF_AVX2 RF_INLINE __m256 round(__m256 v) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  static RF_AVX2 RF_INLINE __m256 round_store(uint16_t* p, __m256 v, bool nt) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    if (nt)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return _mm256_cvtph_ps(h);
  }
  static RF_AVX2 RF_INLINE void round_store2(uint16_t* p, __m256& a, __m256& b, bool nt) {
    const __m128i ha = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT);
    const __m128i hb = _mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT);
    const __m256i packed = _mm256_set_m128i(hb, ha);
    if (nt)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
    else
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    a = _mm256_cvtph_ps(ha);
    b = _mm256_cvtph_ps(hb);
  }
};

// Loads of the last n < 8 elements (other lanes = 0) and the matching stores: go through a
// small stack buffer so we never touch memory past the end of a row.
template <class E>
RF_AVX2 RF_INLINE __m256 load_tail(const typename E::T* p, int64_t n) {
  typename E::T buf[8] = {};
  std::memcpy(buf, p, size_t(n) * sizeof(typename E::T));
  return V8<E>::load(buf);
}

template <class E>
RF_AVX2 RF_INLINE void store_tail(typename E::T* p, __m256 v, int64_t n) {
  typename E::T buf[8];
  V8<E>::store(buf, v);
  std::memcpy(p, buf, size_t(n) * sizeof(typename E::T));
}

RF_AVX2 RF_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Sum of all lanes of N (a power of two) accumulators, added pairwise: a fixed order, so the
// result is bitwise the same run to run.
template <int N>
RF_AVX2 RF_INLINE float hsum_n(const __m256* acc) {
  if constexpr (N == 1) {
    return hsum(acc[0]);
  } else {
    __m256 half[N / 2];
    for (int k = 0; k < N / 2; ++k) half[k] = _mm256_add_ps(acc[2 * k], acc[2 * k + 1]);
    return hsum_n<N / 2>(half);
  }
}

// Lane j of the result = the sum of the 8 lanes of v[j]: eight horizontal sums for about
// the shuffles of two.
RF_AVX2 RF_INLINE __m256 hsum_each(const float (*v)[8]) {
  // pairwise sums within 128-bit halves: [v0 v0 v1 v1 | v0 v0 v1 v1] (each a sum of 2 lanes)
  const __m256 a01 = _mm256_hadd_ps(_mm256_load_ps(v[0]), _mm256_load_ps(v[1]));
  const __m256 a23 = _mm256_hadd_ps(_mm256_load_ps(v[2]), _mm256_load_ps(v[3]));
  const __m256 a45 = _mm256_hadd_ps(_mm256_load_ps(v[4]), _mm256_load_ps(v[5]));
  const __m256 a67 = _mm256_hadd_ps(_mm256_load_ps(v[6]), _mm256_load_ps(v[7]));
  // sums of 4 lanes: [v0 v1 v2 v3 | v0 v1 v2 v3] (low half's lanes, high half's lanes)
  const __m256 b0 = _mm256_hadd_ps(a01, a23), b1 = _mm256_hadd_ps(a45, a67);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// max of p[0, n), n >= 1 (p 32-byte aligned, readable up to n rounded up to 8; NaN-free)
RF_AVX2 RF_INLINE float max_of(const float* p, int64_t n) {
  __m256 m = _mm256_set1_ps(p[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_load_ps(p + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; i < n; ++i) r = std::max(r, p[i]);
  return r;
}

// exp(x) for 8 lanes: Cephes-style range reduction x = n ln2 + r, degree-6 polynomial for
// exp(r) on [-ln2/2, ln2/2], 2^n through the exponent bits. Max relative error ~2 ulp;
// inputs below -87.3 give 0 (as the softmax wants for far-below-max scores), NaN stays NaN.
RF_AVX2 RF_INLINE __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // operand order keeps NaN (maxps returns the 2nd on NaN)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
  return _mm256_andnot_ps(too_small, y);
}

// Per-thread fp32 scratch rows (slot 0..3) of at least n floats (+ 8 for a whole tail
// vector), so a kernel converts and adds its inputs once and re-reads them from L1/L2 as
// fp32: the rows s in flight, and the weight and bias converted once per call. 64-byte
// aligned, so no 32-byte access splits a cache line (std::vector gives 16: bf16 add_rms_norm
// [256-2048, 576], AVX2, ~3% faster aligned).
inline float* scratch_row(int slot, int64_t n) {
  thread_local std::vector<float> buf[4];
  if (int64_t(buf[slot].size()) < n + 24) buf[slot].resize(size_t(n + 24));
  const auto addr = reinterpret_cast<std::uintptr_t>(buf[slot].data());
  return reinterpret_cast<float*>((addr + 63) & ~std::uintptr_t(63));
}

// A parameter vector [n] of element type E as fp32 in scratch slot `slot` (null stays null;
// fp32 input is used in place).
template <class E>
inline const float* params_f32(const void* p, int64_t n, int slot) {
  if (p == nullptr) return nullptr;
  if constexpr (E::code == kFloat32) {
    return static_cast<const float*>(p);
  } else {
    float* out = scratch_row(slot, n);
    const auto* src = static_cast<const typename E::T*>(p);
    for (int64_t i = 0; i < n; ++i) out[i] = E::load(src + i);
    return out;
  }
}

// ---------------------------------------------------------------------------------------
// Split [0, rows) into contiguous chunks, one per thread, and call fn(begin, end) on each.
// Small work runs inline: an OpenMP fork costs ~1-5 us, more than a decode-sized row.
template <class Fn>
void parallel_rows(int64_t rows, int64_t work_per_row, int num_threads, Fn&& fn) {
  constexpr int64_t kMinParallelWork = 16384;  // elements; below this one thread wins
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  if (threads > rows) threads = rows;
  if (threads <= 1 || rows * work_per_row < kMinParallelWork) {
    fn(int64_t(0), rows);
    return;
  }
#pragma omp parallel num_threads(int(threads))
  {
    // the runtime may grant fewer threads than asked: split by what we got
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = rows * t / nt, end = rows * (t + 1) / nt;
    if (begin < end) fn(begin, end);
  }
}

// In-register 8 x 8 fp32 transpose: r[i][j] <- r[j][i].
RF_AVX2 RF_INLINE void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

}  // namespace ringfuse::cpu
