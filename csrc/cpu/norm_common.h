// Internal to csrc/cpu/{rms_norm,layer_norm}.cpp: argument bundle, boundary checks, the
// dtype dispatch and the "s = round_x(x + residual)" loaders both norm families share.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "cpu/vec.h"

namespace ringfuse::cpu {

struct NormArgs {
  void* out;                  // [rows, hidden], out dtype
  int64_t out_stride;
  void* residual_out;         // [rows, hidden], x dtype, or null
  int64_t residual_out_stride;
  const void* x;              // [rows, hidden], x dtype
  int64_t x_stride;
  const void* residual;       // [rows, hidden], x dtype, or null
  int64_t residual_stride;
  const void* weight;         // [hidden], w dtype, or null
  const void* bias;           // [hidden], w dtype, or null (layer_norm only)
  int64_t rows, hidden;
  float eps;
  bool llama_cast;            // rms_norm only: round s * rstd to x dtype before * weight
  bool stream;                // non-temporal stores for outputs much larger than the caches
};

// Re-check at the C++ boundary what would corrupt memory or produce garbage silently.
inline void check_norm_args(const char* op, const NormArgs& a, int x_dtype, int w_dtype,
                            int out_dtype) {
  const std::string p = std::string(op) + ": ";
  RINGFUSE_CHECK(a.rows >= 0, p + "rows must be >= 0, got " + std::to_string(a.rows));
  RINGFUSE_CHECK(a.hidden >= 1, p + "hidden must be >= 1, got " + std::to_string(a.hidden));
  RINGFUSE_CHECK(std::isfinite(a.eps) && a.eps > 0.0f,
                 p + "eps must be a finite number > 0, got " + std::to_string(a.eps));
  RINGFUSE_CHECK(x_dtype == kFloat32 || x_dtype == kFloat16 || x_dtype == kBFloat16,
                 p + "x dtype must be float32, float16 or bfloat16, got " + dtype_name(x_dtype));
  RINGFUSE_CHECK(w_dtype == x_dtype || w_dtype == kFloat32,
                 p + "weight dtype must equal x dtype or be float32, got " + dtype_name(w_dtype));
  RINGFUSE_CHECK(out_dtype == x_dtype || out_dtype == kFloat32,
                 p + "out dtype must equal x dtype or be float32, got " + dtype_name(out_dtype));
  if (a.rows == 0) return;
  RINGFUSE_CHECK(a.out && a.x, p + "null out or x pointer");
  RINGFUSE_CHECK((a.residual == nullptr) == (a.residual_out == nullptr),
                 p + "residual and residual_out must be given together");
  const int64_t min_stride = a.rows > 1 ? a.hidden : 0;
  RINGFUSE_CHECK(a.out_stride >= min_stride && a.x_stride >= min_stride,
                 p + "row strides must be >= hidden");
  if (a.residual)
    RINGFUSE_CHECK(a.residual_stride >= min_stride && a.residual_out_stride >= min_stride,
                   p + "residual row strides must be >= hidden");
}

// Non-temporal stores pay off only when the outputs are far larger than L3 (32 MiB here);
// they need every row start 32-byte aligned.
inline bool want_stream(const NormArgs& a, int out_size, int x_size) {
  const int64_t bytes = a.rows * a.hidden * (out_size + (a.residual_out ? x_size : 0));
  if (bytes < (int64_t(48) << 20)) return false;
  auto aligned = [](const void* p, int64_t stride_bytes, int align) {
    return (reinterpret_cast<std::uintptr_t>(p) % align) == 0 && stride_bytes % align == 0;
  };
  bool ok = aligned(a.out, a.out_stride * out_size, 32);
  if (a.residual_out) ok = ok && aligned(a.residual_out, a.residual_out_stride * x_size, 32);
  return ok;
}

using RowsFn = void (*)(const NormArgs&, int64_t, int64_t);

// Kernel<TX, TW, TO> provides static avx2(args, begin, end) and scalar(args, begin, end).
template <template <class, class, class> class Kernel, class TX, class TW>
RowsFn pick_out(int out_dtype, Isa isa) {
  if (out_dtype == kFloat32) {
    return isa == Isa::kAvx2 ? &Kernel<TX, TW, F32>::avx2 : &Kernel<TX, TW, F32>::scalar;
  }
  return isa == Isa::kAvx2 ? &Kernel<TX, TW, TX>::avx2 : &Kernel<TX, TW, TX>::scalar;
}

template <template <class, class, class> class Kernel, class TX>
RowsFn pick_weight(int w_dtype, int x_dtype, int out_dtype, Isa isa) {
  if (w_dtype == kFloat32 && x_dtype != kFloat32) return pick_out<Kernel, TX, F32>(out_dtype, isa);
  return pick_out<Kernel, TX, TX>(out_dtype, isa);
}

template <template <class, class, class> class Kernel>
RowsFn pick_kernel(int x_dtype, int w_dtype, int out_dtype, Isa isa) {
  switch (x_dtype) {
    case kFloat16: return pick_weight<Kernel, F16>(w_dtype, x_dtype, out_dtype, isa);
    case kBFloat16: return pick_weight<Kernel, BF16>(w_dtype, x_dtype, out_dtype, isa);
    default: return pick_weight<Kernel, F32>(w_dtype, x_dtype, out_dtype, isa);
  }
}

// bf16 rows in even/odd order (AVX2). A 256-bit load of 16 bf16 holds, in 32-bit lane k,
// element 2k in its low half and element 2k + 1 in its high half. Widened in place, the
// even elements are u << 16 and the odd ones u & 0xffff0000: one shift and one and per 16
// lanes, where the in-order widening takes two zero-extending shuffles and two shifts. Stored
// back, a rounded even vector shifted down and word-blended with the rounded odd one is the
// 16 values in memory order again: no pack, no cross-lane permute. A norm only sums over its
// row and multiplies lane by lane between its loads and stores, so the order is invisible
// outside the kernel, provided the weights (and bias) come in the same order (norm_params
// with kEvenOdd) and every pass takes the same 16-lane blocks (first_pass and the output
// loops both step 16 lanes, then 8, then the tail). Vector shifts and shuffles run on two of
// Zen's four vector pipes, and they were ~22 of the ~42 vector ops per 16 lanes of a bf16
// add_rms_norm; this and bf16_round_hi leave 6 of ~34 (AVX2 path, [2048, 576]: 143 -> 116
// us on the Zen 5 VM; the word blend instead of an and + an or: 121 -> 116 us another day).
// The other ~28 are the adds, products and roundings themselves (each bf16 rounding is 4
// ops, 16 of the 34): ~8.5 cycles per 16 lanes at 4 vector ops per cycle, where the loop
// takes ~12. Only for bf16 in and out: fp16 widens with F16C, and fp32 outputs would need
// the shuffles back.
template <class TX, class TO>
inline constexpr bool kEvenOdd = TX::code == kBFloat16 && TO::code == kBFloat16;

// fp32 bits rounded to bf16 (nearest-even) in each lane's high half, its low half garbage:
// u + 0x7fff + ((u >> 16) & 1) written as u + 0x8000 - (bit 16 clear), with no shift. The
// NaN rule of f32x8_to_bf16_lanes_nan_clear: a NaN whose low 16 bits are zero stays the same
// NaN (the carry cannot reach the high half), which holds for every NaN a norm stores (see
// store16).
RF_AVX2 RF_INLINE __m256i bf16_round_hi(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bit16_clear =
      _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x10000)), _mm256_setzero_si256());
  return _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x8000)), bit16_clear);
}

RF_AVX2 RF_INLINE __m256 bf16_high(__m256i v) {  // the high halves as fp32
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
}

// 16 bf16 in memory order from the bf16 values in the high halves of even / odd lanes
RF_AVX2 RF_INLINE __m256i bf16_join(__m256i even_hi, __m256i odd_hi) {
  return _mm256_blend_epi16(_mm256_srli_epi32(even_hi, 16), odd_hi, 0xAA);  // odd words from odd_hi
}

template <bool kStream>
RF_AVX2 RF_INLINE void store256(void* p, __m256i v) {
  if constexpr (kStream)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}

// 16 lanes rounded once to E and stored (streaming when kStream; alignment was checked
// once per call). bf16 outputs come from bf16 rows, so a holds the even elements and b the
// odd ones (kEO), and they take the rounding without a NaN fix-up: every NaN that reaches a
// norm's stores comes from bf16 data, x86's default NaN or a parameter that norm_params
// canonicalized, so its low 16 bits are zero (see f32x8_to_bf16_lanes_nan_clear).
template <class E, bool kStream, bool kEO = false>
RF_AVX2 RF_INLINE void store16(typename E::T* p, __m256 a, __m256 b) {
  if constexpr (E::code == kBFloat16) {
    static_assert(kEO, "bf16 outputs are stored from even/odd lanes");
    store256<kStream>(p, bf16_join(bf16_round_hi(a), bf16_round_hi(b)));
  } else {
    V8<E>::store2(p, a, b, kStream);
  }
}

// As store16, and a, b <- the stored values as fp32 (the residual sum s = round_x(x + r)).
template <class E, bool kStream, bool kEO = false>
RF_AVX2 RF_INLINE void round_store16(typename E::T* p, __m256& a, __m256& b) {
  if constexpr (kEO) {
    static_assert(E::code == kBFloat16);
    const __m256i ra = bf16_round_hi(a), rb = bf16_round_hi(b);
    store256<kStream>(p, bf16_join(ra, rb));
    a = bf16_high(ra);
    b = bf16_high(rb);
  } else if constexpr (E::code == kBFloat16) {
    const __m256i la = f32x8_to_bf16_lanes_nan_clear(a), lb = f32x8_to_bf16_lanes_nan_clear(b);
    store256<kStream>(p, _mm256_permute4x64_epi64(_mm256_packus_epi32(la, lb), 0b11011000));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(la, 16));
    b = _mm256_castsi256_ps(_mm256_slli_epi32(lb, 16));
  } else {
    V8<E>::round_store2(p, a, b, kStream);
  }
}

// x rounded to E's precision, kept in fp32 lanes (bf16: without the NaN fix-up, as store16)
template <class E>
RF_AVX2 RF_INLINE __m256 round8(__m256 v) {
  if constexpr (E::code == kBFloat16) {
    return bf16_high(bf16_round_hi(v));
  } else {
    return V8<E>::round(v);
  }
}

// v rounded to bf16 precision (nearest-even) in fp32 lanes with the low 16 bits zero, by
// Veltkamp's split: c = v * (2^16 + 1) with one rounding, hi = c - (c - v). Three fp ops
// against five for round8<BF16> (and 3 of the 5 on the integer side, which the bf16 norms
// are short of, see kEvenOdd). Compared with the integer rounding on all 2^32 inputs: equal
// for zero, for every normal |v| below 5.19e33 (just under 2^112) and for every subnormal
// that bf16 holds exactly; a larger |v| or an infinity gives NaN (c overflows), a subnormal
// below bf16's precision keeps bits it should drop. The residual sum of two bf16 values is
// a multiple of 2^-133, so its subnormals are exact; the overflow makes the row's sum
// non-finite, and first_pass_sums redoes that row with the integer rounding. (A multiply,
// non-destructive where an fma would need a register copy of v; the empty asm keeps GCC from
// contracting it with c - v into one fma, which would be exact and round nothing.)
RF_AVX2 RF_INLINE __m256 bf16_round_split(__m256 v) {
  __m256 c = _mm256_mul_ps(v, _mm256_set1_ps(65537.0f));
  asm("" : "+x"(c));
  return _mm256_sub_ps(c, _mm256_sub_ps(c, v));
}

// How the first pass rounds the residual sum s = x + r and whether it stores it.
// kStoreNow: rounded and stored to residual_out as it is made. The other two leave the store
// to the output pass (bf16 rows in even/odd order, see kDeferredSum), rounding with
// bf16_round_split (kSplit) or, when a row is redone, with the integer rounding (kExact).
enum class SumRound { kStoreNow, kSplit, kExact };

// Row pointers for one row of the argument bundle.
template <class TX, class TW, class TO>
struct RowPtrs {
  using TXType = TX;
  using TOType = TO;
  static constexpr bool kEO = kEvenOdd<TX, TO>;
  using X = typename TX::T;
  using W = typename TW::T;
  using O = typename TO::T;
  const X* x;
  const X* res;
  X* res_out;
  O* out;
  const W* w;
  const W* b;
  RF_INLINE RowPtrs(const NormArgs& a, int64_t row)
      : x(static_cast<const X*>(a.x) + row * a.x_stride),
        res(a.residual ? static_cast<const X*>(a.residual) + row * a.residual_stride : nullptr),
        res_out(a.residual_out ? static_cast<X*>(a.residual_out) + row * a.residual_out_stride
                               : nullptr),
        out(static_cast<O*>(a.out) + row * a.out_stride),
        w(static_cast<const W*>(a.weight)),
        b(static_cast<const W*>(a.bias)) {}

  // s[i] = round_x(x[i] + res[i]) or x[i]
  RF_INLINE float s(int64_t i) const {
    return res ? TX::round(TX::load(x + i) + TX::load(res + i)) : TX::load(x + i);
  }

  // AVX2: s for lanes [i, i + 16) / [i, i + 8) / the last n < 8, x and r read, converted
  // and added exactly once. With kStoreNow the rounded sum is also stored to res_out right
  // here (res_out may alias x or res: each lane is read before it is written); otherwise the
  // output pass stores it (kDeferredSum). s16 gives lanes [i, i + 16) in even/odd order when
  // kEO (s0 even, s1 odd).
  template <bool kRes, bool kStream, SumRound kRound = SumRound::kStoreNow>
  RF_AVX2 RF_INLINE void s16(int64_t i, __m256& s0, __m256& s1) const {
    if constexpr (kEO) {
      load_even_odd(x + i, s0, s1);
    } else {
      s0 = V8<TX>::load(x + i);
      s1 = V8<TX>::load(x + i + 8);
    }
    if constexpr (kRes) {
      __m256 r0, r1;
      if constexpr (kEO) {
        load_even_odd(res + i, r0, r1);
      } else {
        r0 = V8<TX>::load(res + i);
        r1 = V8<TX>::load(res + i + 8);
      }
      s0 = _mm256_add_ps(s0, r0);
      s1 = _mm256_add_ps(s1, r1);
      if constexpr (kRound == SumRound::kStoreNow) {
        round_store16<TX, kStream, kEO>(res_out + i, s0, s1);
      } else if constexpr (kRound == SumRound::kSplit) {
        static_assert(kEO, "the split rounding is for bf16 rows");
        s0 = bf16_round_split(s0);
        s1 = bf16_round_split(s1);
      } else {
        s0 = round8<TX>(s0);
        s1 = round8<TX>(s1);
      }
    }
  }
  static RF_AVX2 RF_INLINE void load_even_odd(const X* p, __m256& even, __m256& odd) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    odd = bf16_high(u);
  }
  // s8 and s_tail round with the integer rounding whatever kRound says (few lanes)
  template <bool kRes, bool kStream, SumRound kRound = SumRound::kStoreNow>
  RF_AVX2 RF_INLINE __m256 s8(int64_t i) const {
    const __m256 v = V8<TX>::load(x + i);
    if constexpr (!kRes) return v;
    const __m256 sum = _mm256_add_ps(v, V8<TX>::load(res + i));
    if constexpr (kRound == SumRound::kStoreNow) return V8<TX>::round_store(res_out + i, sum, kStream);
    return V8<TX>::round(sum);
  }
  template <bool kRes, SumRound kRound = SumRound::kStoreNow>
  RF_AVX2 RF_INLINE __m256 s_tail(int64_t i, int64_t n) const {  // lanes >= n are 0
    const __m256 v = load_tail<TX>(x + i, n);
    if constexpr (!kRes) return v;
    const __m256 s = V8<TX>::round(_mm256_add_ps(v, load_tail<TX>(res + i, n)));
    if constexpr (kRound == SumRound::kStoreNow) store_tail<TX>(res_out + i, s, n);
    return s;
  }
};

// Whether the later passes over a row read s from x itself: fp32 x without a residual is s
// already, and its row is in L1 after the first pass. Otherwise they read the fp32 copy of s
// that the first pass writes to scratch (x converted, or x + r rounded, once).
template <class TX, bool kRes>
inline constexpr bool kReadsX = TX::code == kFloat32 && !kRes;

// s for the later passes of row r: x's row or the scratch copy (see kReadsX).
template <class TX, bool kRes, class Ptrs>
RF_INLINE const float* s_row(const Ptrs& p, float* buf) {
  if constexpr (kReadsX<TX, kRes>)
    return reinterpret_cast<const float*>(p.x);
  else
    return buf;
}

// Pass 1 of both norms for N rows in lockstep: s = x (+ r) into bufs[r] (unless kReadsX;
// with kStoreNow the rounded sum also goes to residual_out), and per row kAcc accumulators
// of s (kSquares: of s * s), zero-filled tail lanes adding nothing.
template <int N, int kAcc, bool kSquares, bool kRes, bool kStream, SumRound kRound, class Ptrs>
RF_AVX2 RF_INLINE void first_pass(const Ptrs* p, float* const* bufs, int64_t H, __m256 (*acc)[kAcc]) {
  constexpr bool kCopy = !kReadsX<typename Ptrs::TXType, kRes>;
  // local copies: the pointers in bufs[] would be reloaded after every vector store (the
  // intrinsics' stores may alias anything)
  float* buf[N];
  RF_UNROLL for (int r = 0; r < N; ++r) buf[r] = bufs[r];
  const auto accumulate = [](__m256 sum, __m256 s) RF_AVX2 {
    return kSquares ? _mm256_fmadd_ps(s, s, sum) : _mm256_add_ps(sum, s);
  };
  RF_UNROLL for (int r = 0; r < N; ++r)
    RF_UNROLL for (int k = 0; k < kAcc; ++k) acc[r][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * kAcc <= H; i += 8 * kAcc) {
    RF_UNROLL for (int r = 0; r < N; ++r) {
      RF_UNROLL for (int k = 0; k < kAcc; k += 2) {
        __m256 s0, s1;
        p[r].template s16<kRes, kStream, kRound>(i + 8 * k, s0, s1);
        if constexpr (kCopy) {
          _mm256_storeu_ps(buf[r] + i + 8 * k, s0);
          _mm256_storeu_ps(buf[r] + i + 8 * k + 8, s1);
        }
        acc[r][k] = accumulate(acc[r][k], s0);
        acc[r][k + 1] = accumulate(acc[r][k + 1], s1);
      }
    }
  }
  // then 16 lanes at a time, as the output loops step (the same blocks in even/odd order);
  // both halves go to acc[r][0] in lane order, the sums of two 8-lane steps
  for (; i + 16 <= H; i += 16) {
    RF_UNROLL for (int r = 0; r < N; ++r) {
      __m256 s0, s1;
      p[r].template s16<kRes, kStream, kRound>(i, s0, s1);
      if constexpr (kCopy) {
        _mm256_storeu_ps(buf[r] + i, s0);
        _mm256_storeu_ps(buf[r] + i + 8, s1);
      }
      acc[r][0] = accumulate(accumulate(acc[r][0], s0), s1);
    }
  }
  if (i + 8 <= H) {
    RF_UNROLL for (int r = 0; r < N; ++r) {
      const __m256 s = p[r].template s8<kRes, kStream, kRound>(i);
      if constexpr (kCopy) _mm256_storeu_ps(buf[r] + i, s);
      acc[r][0] = accumulate(acc[r][0], s);
    }
    i += 8;
  }
  if (i < H) {
    RF_UNROLL for (int r = 0; r < N; ++r) {
      const __m256 s = p[r].template s_tail<kRes, kRound>(i, H - i);
      if constexpr (kCopy) _mm256_storeu_ps(buf[r] + i, s);
      acc[r][1] = accumulate(acc[r][1], s);
    }
  }
}

// Whether the residual sum waits for the output pass: bf16 rows in even/odd order round it
// with bf16_round_split (34 -> 30 vector ops per 16 lanes of a bf16 add_rms_norm; [2048, 576]
// out=, AVX2, 2 threads on the Zen 5 VM: 120 -> 111 us, add_layer_norm 140 -> 137 us), and
// leave x and r unwritten until the output pass so that a row can be redone.
template <class TX, class TO, bool kRes>
inline constexpr bool kDeferredSum = kRes && kEvenOdd<TX, TO>;

// Pass 1 with the dtypes' residual-sum policy; sums[r] = row r's horizontal sum of acc.
// Deferred sums: a row whose sum is not finite (an inf or NaN in it, or a residual sum past
// bf16_round_split's range) is redone with the integer rounding, from the same x and r.
template <int N, int kAcc, bool kSquares, bool kRes, bool kStream, class Ptrs>
RF_AVX2 RF_INLINE void first_pass_sums(const Ptrs* p, float* const* bufs, int64_t H, float* sums) {
  constexpr bool kDefer = kDeferredSum<typename Ptrs::TXType, typename Ptrs::TOType, kRes>;
  __m256 acc[N][kAcc];
  first_pass<N, kAcc, kSquares, kRes, kStream, kDefer ? SumRound::kSplit : SumRound::kStoreNow>(p, bufs, H, acc);
  bool finite = true;
  RF_UNROLL for (int r = 0; r < N; ++r) {
    sums[r] = hsum_n<kAcc>(acc[r]);
    finite = finite && std::isfinite(sums[r]);
  }
  if constexpr (kDefer) {
    if (!finite) [[unlikely]] {
      first_pass<N, kAcc, kSquares, kRes, kStream, SumRound::kExact>(p, bufs, H, acc);
      RF_UNROLL for (int r = 0; r < N; ++r) sums[r] = hsum_n<kAcc>(acc[r]);
    }
  }
}

// The output pass's store of deferred residual sums (kDeferredSum): 16 lanes of s in
// even/odd order, already bf16 values, joined without rounding.
template <bool kStream, class Ptrs>
RF_AVX2 RF_INLINE void store_sum16(const Ptrs& p, int64_t i, __m256 even, __m256 odd) {
  store256<kStream>(p.res_out + i, bf16_join(_mm256_castps_si256(even), _mm256_castps_si256(odd)));
}

// While the last pass over a row runs from cache, pull a later row of x (and the residual)
// toward L1 so its loads overlap this row's compute: without it the kernel alternates
// between waiting on memory and computing. at() is called once per 16 lanes (every line of
// an fp32 row, twice per line of a 16-bit one). A row at or past the chunk's end is not
// fetched; the chunk's last row (already in cache) is touched instead. (Fetching its
// output lines for writing too, with PREFETCHW, measured no faster on Zen 5.)
template <class TX, bool kRes>
struct NextRowPrefetch {
  const char* x;
  const char* res;
  RF_INLINE NextRowPrefetch(const NormArgs& a, int64_t row, int64_t end) {
    const int64_t target = row < end ? row : end - 1;
    using X = typename TX::T;
    x = reinterpret_cast<const char*>(static_cast<const X*>(a.x) + target * a.x_stride);
    res = kRes ? reinterpret_cast<const char*>(static_cast<const X*>(a.residual) + target * a.residual_stride)
               : nullptr;
  }
  RF_AVX2 RF_INLINE void at(int64_t i) const {
    _mm_prefetch(x + i * int64_t(sizeof(typename TX::T)), _MM_HINT_T0);
    if constexpr (kRes) _mm_prefetch(res + i * int64_t(sizeof(typename TX::T)), _MM_HINT_T0);
  }
};

// Store 8 lanes, streaming when asked (alignment was checked once per call).
template <class E, bool kStream>
RF_AVX2 RF_INLINE void store8(typename E::T* p, __m256 v) {
  if constexpr (kStream)
    V8<E>::stream(p, v);
  else
    V8<E>::store(p, v);
}

// A norm's weight or bias [hidden] as fp32 for the AVX2 rows: converted once per call into
// scratch slot `slot`, or used in place when fp32. Null becomes a row of `fill` (1 for a
// weight, 0 for a bias), so the inner loops carry no branch for it. With bf16 outputs an
// fp32 parameter's NaNs are replaced by the canonical quiet NaN (in a copy, made only when
// there is one): that keeps the outputs' bf16 rounding without a NaN fix-up exact. With
// kEvenOdd<TX, TO> every full block of 16 is put in even/odd order (in the slot), as the
// rows' values are.
template <class TX, class TW, class TO>
inline const float* norm_params(const void* p, int64_t n, int slot, float fill) {
  if (p == nullptr) {
    float* out = scratch_row(slot, n);
    std::fill(out, out + n, fill);
    return out;
  }
  const float* f = params_f32<TW>(p, n, slot);
  if constexpr (TO::code == kBFloat16 && TW::code == kFloat32) {
    if (std::any_of(f, f + n, [](float v) { return std::isnan(v); })) {
      float* out = scratch_row(slot, n);
      for (int64_t i = 0; i < n; ++i) out[i] = std::isnan(f[i]) ? std::numeric_limits<float>::quiet_NaN() : f[i];
      f = out;
    }
  }
  if constexpr (kEvenOdd<TX, TO>) {
    float* out = scratch_row(slot, n);  // may be f itself: each block goes through a copy
    std::copy(f + (n & ~int64_t(15)), f + n, out + (n & ~int64_t(15)));
    for (int64_t i = 0; i + 16 <= n; i += 16) {
      float block[16];
      std::copy(f + i, f + i + 16, block);
      for (int k = 0; k < 8; ++k) out[i + k] = block[2 * k], out[i + 8 + k] = block[2 * k + 1];
    }
    f = out;
  }
  return f;
}

}  // namespace ringfuse::cpu
