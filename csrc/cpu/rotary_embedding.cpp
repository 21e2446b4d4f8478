// Rotary position embedding, in place, on CPU: AVX2 with a scalar fallback, OpenMP over
// tokens.
//
// For token t at position p = positions[t], every head row x [D] of q and k has its first
// rot_dim dims rotated by the angles cos/sin = cache[p, :rot/2], cache[p, rot/2:] (fp32):
//   neox (Llama, "rotate half"): pairs (x[i], x[i + rot/2])
//   gptj (interleaved):          pairs (x[2i], x[2i + 1])
//   x_a' = x_a cos - x_b sin,  x_b' = x_b cos + x_a sin   (fp32 math, one rounding)
// Napkin math: reads and writes each rotated element once (plus the cache row, shared by
// the token's heads): memory-bound; a decode step (one token) is ~1 us of work.
#include "cpu/rotary_embedding.h"

#include <string>

#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

struct RotaryArgs {
  void* x;                 // [T, H, D] (q or k)
  int64_t x_st, x_sh;      // token and head strides (elements)
  int64_t heads;
  const int64_t* positions;  // [T]
  const float* cache;      // [max_pos, rot_dim]: cos | sin
  int64_t cache_stride;
  int64_t rot_dim;
  bool gptj;
};

template <class E>
struct RotaryKernel {
  using T = typename E::T;

  static RF_AVX2 void avx2(const RotaryArgs& a, int64_t t) {
    const int64_t half = a.rot_dim / 2;
    const float* cs = a.cache + a.positions[t] * a.cache_stride;
    for (int64_t h = 0; h < a.heads; ++h) {
      T* x = static_cast<T*>(a.x) + t * a.x_st + h * a.x_sh;
      int64_t i = 0;
      if (!a.gptj) {
        for (; i + 8 <= half; i += 8) {
          const __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
          const __m256 x1 = V8<E>::load(x + i), x2 = V8<E>::load(x + half + i);
          V8<E>::store(x + i, _mm256_fmsub_ps(x1, c, _mm256_mul_ps(x2, s)));
          V8<E>::store(x + half + i, _mm256_fmadd_ps(x2, c, _mm256_mul_ps(x1, s)));
        }
      } else {
        // 4 pairs per vector: [a0 b0 a1 b1 ...]; cos/sin duplicated per pair, sin signed -,+
        const __m256 sign = _mm256_setr_ps(-1.f, 1.f, -1.f, 1.f, -1.f, 1.f, -1.f, 1.f);
        const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (; i + 4 <= half; i += 4) {
          const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + i)), dup);
          const __m256 s = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + half + i)), dup), sign);
          const __m256 v = V8<E>::load(x + 2 * i);
          const __m256 swapped = _mm256_permute_ps(v, 0b10110001);  // [b0 a0 b1 a1 ...]
          V8<E>::store(x + 2 * i, _mm256_fmadd_ps(v, c, _mm256_mul_ps(swapped, s)));
        }
      }
      rotate_scalar(a, x, cs, i);
    }
  }

  // pairs [i0, half) of one row
  static void rotate_scalar(const RotaryArgs& a, T* x, const float* cs, int64_t i0) {
    const int64_t half = a.rot_dim / 2;
    for (int64_t i = i0; i < half; ++i) {
      const int64_t ia = a.gptj ? 2 * i : i, ib = a.gptj ? 2 * i + 1 : i + half;
      const float xa = E::load(x + ia), xb = E::load(x + ib), c = cs[i], s = cs[half + i];
      E::store(x + ia, xa * c - xb * s);
      E::store(x + ib, xb * c + xa * s);
    }
  }

  static void scalar(const RotaryArgs& a, int64_t t) {
    const float* cs = a.cache + a.positions[t] * a.cache_stride;
    for (int64_t h = 0; h < a.heads; ++h) rotate_scalar(a, static_cast<T*>(a.x) + t * a.x_st + h * a.x_sh, cs, 0);
  }
};

template <class E>
void run(const RotaryArgs& a, int64_t tokens, int num_threads) {
  const bool avx2 = active_isa() == Isa::kAvx2;
  parallel_rows(tokens, a.heads * a.rot_dim, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (avx2)
        RotaryKernel<E>::avx2(a, t);
      else
        RotaryKernel<E>::scalar(a, t);
    }
  });
}

}  // namespace

void rotary_embedding(std::uintptr_t x, int64_t x_st, int64_t x_sh, int64_t tokens, int64_t heads,
                      int64_t head_dim, std::uintptr_t positions, std::uintptr_t cache, int64_t cache_stride,
                      int64_t max_positions, int64_t rot_dim, bool gptj, int dtype, int num_threads) {
  const std::string p = "rotary_embedding: ";
  RINGFUSE_CHECK(tokens >= 0 && heads >= 1 && head_dim >= 1, p + "bad sizes");
  RINGFUSE_CHECK(rot_dim >= 2 && rot_dim % 2 == 0 && rot_dim <= head_dim,
                 p + "rot_dim must be even and in [2, head_dim], got " + std::to_string(rot_dim));
  RINGFUSE_CHECK(cache_stride >= rot_dim, p + "cache row stride must be >= rot_dim");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "bad dtype");
  if (tokens == 0) return;
  // an empty cos/sin cache may have no storage: the position check below names the problem
  RINGFUSE_CHECK(x && positions && (cache || max_positions == 0), p + "null pointer");
  const auto* pos = reinterpret_cast<const int64_t*>(positions);
  for (int64_t t = 0; t < tokens; ++t)  // before any write: no throw inside OpenMP
    RINGFUSE_CHECK(pos[t] >= 0 && pos[t] < max_positions,
                   p + "positions[" + std::to_string(t) + "] = " + std::to_string(pos[t]) + " outside [0, " +
                       std::to_string(max_positions) + ") (the cos/sin cache's length)");
  const RotaryArgs a{reinterpret_cast<void*>(x), x_st, x_sh, heads, pos, reinterpret_cast<const float*>(cache),
                     cache_stride, rot_dim, gptj};
  switch (dtype) {
    case kFloat16: run<F16>(a, tokens, num_threads); break;
    case kBFloat16: run<BF16>(a, tokens, num_threads); break;
    default: run<F32>(a, tokens, num_threads); break;
  }
}

}  // namespace ringfuse::cpu
