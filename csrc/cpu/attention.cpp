// Attention on CPU. Decode (flash-decoding): one new query token per sequence attends over
// its KV cache, contiguous or paged, split along the KV length so a long context keeps
// both cores busy, with a deterministic merge of the splits.
//
// Work item = (sequence b, kv head, group of <= 8 query heads sharing it (GQA), split).
// A split walks its keys in tiles of 64: scores = (q * scale) . k for every query of the
// group (each key row is converted to fp32 once and reused by the whole group), an online
// softmax update per tile (vectorized exp), then acc += p * v. Partials (max, sum, acc) go
// to scratch; the merge combines the splits of each (b, query head) in split order, so
// results are bitwise identical run to run, whatever the thread count, and between the
// contiguous and the paged layout of the same data (splits depend on the length only).
// Each thread runs a contiguous run of items (about equal key counts), so that it can
// prefetch its next item's first tile while it finishes the current one.
//
// Napkin math: B = 8, L = 2048, (Hq, Hkv, D) = (9, 3, 64), fp32: K + V = 2 x 8 x 3 x 2048
// x 64 x 4 B = 25 MB read once per call, 0.78 ms for a plain 2-thread read of the same
// rows on the AVX-512 VM (32 GB/s; one thread alone 26 GB/s); flops 4 x Hq x B x L x D =
// 38 MFLOP, 48 FMAs (8-wide) per key row for a 3-query group, ~0.2 ms at the FMA peak of
// 2 cores. So the call is bound by DRAM reads, provided compute hides under them: K / V
// rows are prefetched about half a tile ahead of their use (see TilePrefetch), and the FMA
// loops keep enough independent accumulators. Measured (AVX2 path, 2 threads, 2026-12-07,
// a plain 2-thread read of the same bytes timed alongside, itself 0.3-0.7 ms as the VM's
// DRAM bandwidth moves): ~1.2x that read's time; 32/8/128 (134 MB) ~1.3x. The rest is
// compute not hidden under the reads.
// bf16 halves the bytes but not the math, and a host whose DRAM feeds 2 cores at 40-80
// GB/s (Zen 5 VM, 2026-12-06) leaves even fp32 little slack: there the 16-lane path
// (kWide) is 1.2-1.5x the AVX2 one for bf16 (9/3/64 B = 8 L = 2048: 557 -> 371 us) and
// equal for fp32 (both ~32 GB/s of KV).
//
// The prefill kernel (attention) and write_kv follow after the decode kernel.
#include "cpu/attention.h"
#include "cpu/attention_prefill.h"
#include "cpu/vec512.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

constexpr int kMaxGroup = 8;   // query heads per work item
constexpr int kTile = 32;      // split sizes are multiples of this
constexpr int kDecTile = 64;   // keys per softmax update (AVX2 path)

struct DecodeArgs {
  void* out;
  int64_t out_sb, out_sh;
  const void* q;
  int64_t q_sb, q_sh;
  const void* k;
  int64_t k_sblk, k_sh, k_spos;
  const void* v;
  int64_t v_sblk, v_sh, v_spos;
  const int32_t* block_table;  // null: contiguous (block b, block_size = S_max)
  int64_t bt_stride, block_size;
  const int32_t* seq_lens;
  int64_t batch, hq, hkv, d, group;
  float scale, softcap;
  int64_t window;  // > 0: the query (at position len - 1) sees only the last `window` keys
  int64_t split_size, max_splits;
  float* part_m;    // [B, Hq, max_splits]
  float* part_l;    // [B, Hq, max_splits]
  float* part_acc;  // [B, Hq, max_splits, D]
};

struct Item {
  int64_t b, kvh, g0, g1, split;
};

// First key sequence b's query sees: splits start there, so a sliding window reads only its
// keys (and the splits, hence the bits, depend on the length and the window only).
inline int64_t first_key(const DecodeArgs& a, int64_t len) {
  return a.window > 0 ? std::max<int64_t>(0, len - a.window) : 0;
}

// prefetch the cache lines that hold bytes [begin, end)
template <int kHint>
RF_INLINE void prefetch_span(const void* begin, const void* end) {
  const auto e = reinterpret_cast<uintptr_t>(end);
  auto p = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(63);
  constexpr auto h = static_cast<_mm_hint>(kHint);
  for (; p + 192 < e; p += 256) {
    _mm_prefetch(reinterpret_cast<const char*>(p), h);
    _mm_prefetch(reinterpret_cast<const char*>(p + 64), h);
    _mm_prefetch(reinterpret_cast<const char*>(p + 128), h);
    _mm_prefetch(reinterpret_cast<const char*>(p + 192), h);
  }
  for (; p < e; p += 64) _mm_prefetch(reinterpret_cast<const char*>(p), h);
}

// prefetch the lines that hold bytes [p, p + kBytes): a fixed count, no loop or branch (the
// last one repeats a line when p is aligned; a repeated prefetch costs one load slot)
template <int kHint, int kBytes>
RF_INLINE void prefetch_fixed(const void* p) {
  const char* c = static_cast<const char*>(p);
  constexpr auto h = static_cast<_mm_hint>(kHint);
  for (int o = 0; o < kBytes; o += 64) _mm_prefetch(c + o, h);
  _mm_prefetch(c + kBytes - 1, h);
}

template <class E>
struct DecodeKernel {
  using T = typename E::T;

  // Row pointers of keys [j0, j0 + n) for K and V: one division per tile, then walk the
  // positions block by block (a division per key would cost more than the key's math).
  static void tile_rows(const DecodeArgs& a, int64_t b, int64_t h, int64_t j0, int64_t n, const T** krow,
                        const T** vrow) {
    int64_t logical = j0 / a.block_size, pos = j0 % a.block_size;
    for (int64_t t = 0; t < n;) {
      const int64_t blk = a.block_table ? a.block_table[b * a.bt_stride + logical] : b;
      const T* kp = static_cast<const T*>(a.k) + blk * a.k_sblk + h * a.k_sh + pos * a.k_spos;
      const T* vp = static_cast<const T*>(a.v) + blk * a.v_sblk + h * a.v_sh + pos * a.v_spos;
      const int64_t run = std::min(n - t, a.block_size - pos);  // keys left in this block
      for (int64_t i = 0; i < run; ++i) {
        krow[t + i] = kp + i * a.k_spos;
        vrow[t + i] = vp + i * a.v_spos;
      }
      t += run;
      pos = 0;
      ++logical;
    }
  }

  // One work item: keys [j0, j1) of sequence it.b, query heads [g0, g0 + G) of kv head
  // it.kvh. G is a template argument so the group's accumulators live in registers (a
  // runtime-sized array of __m256 goes through the stack, and every FMA then waits on a
  // store-to-load round trip).
  //
  // Register blocking. Per key row, a G-query group costs 2 x G x D / 8 FMAs (D = 64,
  // G = 3: 48, 24 cycles on two FMA units) against 2 x D x 4 = 512 bytes of fp32 K and V
  // (~16 ns of one core's half of a 32 GB/s stream), so compute hides under the reads only
  // if the FMAs are not starved. Both loops keep ~12 independent accumulators (a chain of
  // dependent FMAs issues once per 4 cycles; two units need >= 8 chains) and load each K / V
  // chunk once for the whole group:
  //   scores: KB keys x G queries per block (G = 3: 4 x 3); per 8-column chunk G q loads and
  //           KB k loads feed KB x G FMAs (was 1 key at a time: G + 1 loads per G FMAs);
  //   PV:     PC chunks of 8 columns x G queries (G = 3: 4 x 3) over all keys of the tile.
  // This cut the warm (L2-resident) time per key by ~10% only and left the cold-cache time
  // as it was; what moved that was the prefetch schedule below and run()'s item order.
  // The loops over these register arrays carry RF_UNROLL (vec.h): without it GCC 12 kept
  // the score accumulators on the stack too and stored all 12 of them every 8 columns (Zen 5
  // VM, AVX2 path, B = 1, L = 2048, 9/3/64 warm: 14.5 -> 12.2-12.5 ns per key and kv head).
  //
  // AVX-512 (the avx512vnni level; kWide): the same item loop, with the two product loops
  // 16 lanes wide and every lane doing its AVX2 lane's operations in the same order, so the
  // bits are the AVX2 path's (tested). Scores: two keys per zmm (key k in lanes 0-7, key
  // k + 1 in lanes 8-15) against the 8-lane q chunk broadcast to both halves, so each half
  // is the AVX2 key's 8 partial sums; PV: 16 columns per zmm. Half the FMA instructions:
  // where the cache is read faster than AVX2 can multiply (bf16; hosts with 40-80 GB/s of
  // DRAM for 2 cores), that is the time.
  template <int G>
  static constexpr int kKeyBlock = G == 1 ? 8 : G <= 3 ? 4 : G <= 5 ? 2 : 1;
  template <int G>
  static constexpr int kPvChunks = G == 1 ? 8 : G <= 3 ? 4 : G <= 5 ? 2 : 1;
  template <int G>
  static constexpr int kKeyBlock512 = G <= 3 ? 8 : G <= 5 ? 4 : 2;  // keys (two per zmm)
  template <int G>
  static constexpr int kPvChunks512 = G == 1 ? 8 : G <= 5 ? 4 : 2;  // 16-column chunks

  // Prefetch schedule: each line is requested about half a tile of compute before its use.
  // A tile's V rows are fetched into L2 by the same tile's score loop (V is read right after
  // it), and the next tile's K rows by this tile's PV loop (K is read right after that); the
  // last tile fetches the first K rows of the thread's next item. Each is spread over its
  // loop (a fixed number of prefetches per step, no loop or branch of its own), so the core
  // keeps a steady number of DRAM reads in flight. This replaced fetching the next tile's K
  // in the score loop and its V in the PV loop, a whole tile (32 KiB of fp32 K and V at D =
  // 64) ahead: more lines in flight than a core tracks, and the cold 9/3/64 B = 8 L = 2048
  // call went from ~1.3-1.4x the time of a plain read of its bytes to ~1.2x (AVX2 fp32,
  // -8%; bf16 -19%; AVX-512 -7%; warm, L2-resident calls -13 to -19% from the cheaper
  // prefetch code; D = 128: unchanged; same bits). Shorter tiles with the old schedule
  // (16 keys) did as well for fp32 but worse for bf16 (more softmax updates per byte); the
  // T0 or NTA hint instead of T1 measured the same.
  struct TilePrefetch {
    const T* const* vrow;   // this tile's V rows ...
    int64_t vn;             // ... vn of them (the score loop's padding keys have none)
    const T* const* nkrow;  // the next tile's K rows ...
    int64_t nn;             // ... nn of them (<= 0: none)
    bool packed;            // rows of a block adjacent in memory (k_spos == v_spos == D)
    bool k_in_score;        // small D: the PV loop has no multi-chunk pass, the score loop fetches K too
  };

  // The score loop's prefetch for its block of keys [t, t + KB), as a pointer to spread
  // over the block's column steps (V rows adjacent in memory: step c fetches bytes
  // [c * KB, (c + 8) * KB) x sizeof(T) of the span, the tail columns here), or null after
  // prefetching the rows one by one here. With k_in_score the next tile's K rows too.
  template <int KB>
  static RF_AVX2 RF_INLINE const char* prefetch_block(const TilePrefetch& pf, int64_t t, int64_t D) {
    if (pf.k_in_score && t < pf.nn) {
      const int64_t kn = std::min<int64_t>(KB, pf.nn - t);
      for (int64_t i = 0; i < kn; ++i) prefetch_span<_MM_HINT_T1>(pf.nkrow[t + i], pf.nkrow[t + i] + D);
    }
    if (t >= pf.vn) return nullptr;
    const T* const* r = pf.vrow + t;
    if (pf.packed && t + KB <= pf.vn && r[KB - 1] == r[0] + (KB - 1) * D) {
      const int64_t Df = D & ~int64_t(7);
      if (Df < D) prefetch_span<_MM_HINT_T1>(r[0] + KB * Df, r[0] + KB * D);
      return reinterpret_cast<const char*>(r[0]);
    }
    for (int64_t i = 0; i < std::min<int64_t>(KB, pf.vn - t); ++i) prefetch_span<_MM_HINT_T1>(r[i], r[i] + D);
    return nullptr;
  }

  // the share of a block's V span for column step c (see prefetch_block)
  template <int KB>
  static RF_AVX2 RF_INLINE void prefetch_step(const char* span, int64_t c) {
    if (span) prefetch_fixed<_MM_HINT_T1, KB * 8 * int(sizeof(T))>(span + c * KB * int64_t(sizeof(T)));
  }

  // s[g][first, first + 8) = the 8 keys' sums of partial sums, soft-capped
  template <int G>
  static RF_AVX2 RF_INLINE void reduce_scores(float softcap, const float (*dots)[8][8], int64_t first,
                                              float (*s)[kDecTile]) {
    for (int g = 0; g < G; ++g) {
      _mm256_store_ps(s[g] + first, hsum_each(dots[g]));
      if (softcap > 0.0f)
        for (int64_t u = first; u < first + 8; ++u) s[g][u] = softcap * std::tanh(s[g][u] / softcap);
    }
  }

  // scores s[g][0, nt8) = qf[g] . krow[t], KB keys at a time: each (key, query) dot product
  // leaves a vector of 8 partial sums in dots, and every 8 keys one horizontal reduction
  // turns 8 such vectors into 8 scores (a horizontal sum per key cost ~3x more shuffles)
  template <int G>
  static RF_AVX2 RF_INLINE void score_tile(const DecodeArgs& a, const float (*qf)[256], const T* const* krow,
                                           int64_t nt8, const TilePrefetch& pf, float (*s)[kDecTile]) {
    constexpr int KB = kKeyBlock<G>;
    const int64_t D = a.d, Df = D & ~int64_t(7);
    alignas(32) float dots[G][8][8];
    for (int64_t t = 0; t < nt8; t += KB) {
      const char* vspan = prefetch_block<KB>(pf, t, D);
      __m256 sacc[KB][G];
      RF_UNROLL for (int kb = 0; kb < KB; ++kb)
        RF_UNROLL for (int g = 0; g < G; ++g) sacc[kb][g] = _mm256_setzero_ps();
      int64_t c = 0;
#pragma GCC unroll 2
      for (; c < Df; c += 8) {
        prefetch_step<KB>(vspan, c);
        __m256 qv[G];
        RF_UNROLL for (int g = 0; g < G; ++g) qv[g] = _mm256_load_ps(qf[g] + c);
        RF_UNROLL for (int kb = 0; kb < KB; ++kb) {
          const __m256 kv = V8<E>::load(krow[t + kb] + c);
          RF_UNROLL for (int g = 0; g < G; ++g) sacc[kb][g] = _mm256_fmadd_ps(qv[g], kv, sacc[kb][g]);
        }
      }
      if (c < D)
        RF_UNROLL for (int kb = 0; kb < KB; ++kb) {
          const __m256 kv = load_tail<E>(krow[t + kb] + c, D - c);
          RF_UNROLL for (int g = 0; g < G; ++g)
            sacc[kb][g] = _mm256_fmadd_ps(_mm256_load_ps(qf[g] + c), kv, sacc[kb][g]);
        }
      RF_UNROLL for (int kb = 0; kb < KB; ++kb)
        RF_UNROLL for (int g = 0; g < G; ++g) _mm256_store_ps(dots[g][(t + kb) & 7], sacc[kb][g]);
      if (((t + KB) & 7) == 0) reduce_scores<G>(a.softcap, dots, t + KB - 8, s);
    }
  }

  // score_tile with two keys per zmm (kWide above): the same dots, half the FMAs
  template <int G>
  static RF_AVX512VNNI void score_tile512(const DecodeArgs& a, const float (*qf)[256], const T* const* krow,
                                          int64_t nt8, const TilePrefetch& pf, float (*s)[kDecTile]) {
    constexpr int KB = kKeyBlock512<G>, KP = KB / 2;
    const int64_t D = a.d, Df = D & ~int64_t(7);
    alignas(64) float dots[G][8][8];
    for (int64_t t = 0; t < nt8; t += KB) {
      const char* vspan = prefetch_block<KB>(pf, t, D);
      __m512 sacc[KP][G];
      RF_UNROLL for (int kp = 0; kp < KP; ++kp)
        RF_UNROLL for (int g = 0; g < G; ++g) sacc[kp][g] = _mm512_setzero_ps();
      const T* const* kr = krow + t;
      int64_t c = 0;
#pragma GCC unroll 2
      for (; c < Df; c += 8) {
        prefetch_step<KB>(vspan, c);
        __m512 qv[G];
        RF_UNROLL for (int g = 0; g < G; ++g) qv[g] = broadcast8x2(_mm256_load_ps(qf[g] + c));
        RF_UNROLL for (int kp = 0; kp < KP; ++kp) {
          const __m512 kv = load_pair<E>(kr[2 * kp] + c, kr[2 * kp + 1] + c);
          RF_UNROLL for (int g = 0; g < G; ++g) sacc[kp][g] = _mm512_fmadd_ps(qv[g], kv, sacc[kp][g]);
        }
      }
      if (c < D)
        RF_UNROLL for (int kp = 0; kp < KP; ++kp) {
          const __m512 kv = pair8x2(load_tail<E>(kr[2 * kp] + c, D - c), load_tail<E>(kr[2 * kp + 1] + c, D - c));
          RF_UNROLL for (int g = 0; g < G; ++g)
            sacc[kp][g] = _mm512_fmadd_ps(broadcast8x2(_mm256_load_ps(qf[g] + c)), kv, sacc[kp][g]);
        }
      RF_UNROLL for (int kp = 0; kp < KP; ++kp)
        RF_UNROLL for (int g = 0; g < G; ++g) _mm512_store_ps(dots[g][(t + 2 * kp) & 7], sacc[kp][g]);
      if (((t + KB) & 7) == 0) reduce_scores<G>(a.softcap, dots, t + KB - 8, s);
    }
  }

  // acc = acc * alpha + p * v over the tile's nt keys: PC chunks x G queries of accumulators
  // in registers; each V chunk is loaded once for the group
  template <int G>
  static RF_AVX2 RF_INLINE void pv_tile(const DecodeArgs& a, float (*acc)[256], const float* alpha,
                                        const float (*s)[kDecTile], const T* const* vrow, int64_t nt,
                                        const TilePrefetch& pf) {
    constexpr int PC = kPvChunks<G>;
    const int64_t D = a.d, Df = D & ~int64_t(7), Dp = (D + 7) & ~int64_t(7);
    int64_t c = 0;
    for (; c + 8 * PC <= Df; c += 8 * PC) {
      __m256 av[G][PC];
      RF_UNROLL for (int g = 0; g < G; ++g) {
        const __m256 va = _mm256_set1_ps(alpha[g]);
        RF_UNROLL for (int u = 0; u < PC; ++u) av[g][u] = _mm256_mul_ps(_mm256_load_ps(acc[g] + c + 8 * u), va);
      }
      const bool last_pass = c + 16 * PC > Df;  // it also fetches the columns past its own
#pragma GCC unroll 2
      for (int64_t t = 0; t < nt; ++t) {
        if (t < pf.nn) {  // this pass's columns of the next tile's K row t
          if (last_pass)
            prefetch_span<_MM_HINT_T1>(pf.nkrow[t] + c, pf.nkrow[t] + D);
          else
            prefetch_fixed<_MM_HINT_T1, 8 * PC * int(sizeof(T))>(pf.nkrow[t] + c);
        }
        const T* vr = vrow[t] + c;
        __m256 pb[G];
        RF_UNROLL for (int g = 0; g < G; ++g) pb[g] = _mm256_broadcast_ss(&s[g][t]);
        RF_UNROLL for (int u = 0; u < PC; ++u) {
          const __m256 vv = V8<E>::load(vr + 8 * u);
          RF_UNROLL for (int g = 0; g < G; ++g) av[g][u] = _mm256_fmadd_ps(pb[g], vv, av[g][u]);
        }
      }
      RF_UNROLL for (int g = 0; g < G; ++g)
        RF_UNROLL for (int u = 0; u < PC; ++u) _mm256_store_ps(acc[g] + c + 8 * u, av[g][u]);
    }
    for (; c < Dp; c += 8) {  // the rest: single chunks, then the tail
      const int64_t n = std::min<int64_t>(8, D - c);
      __m256 av[G];
      RF_UNROLL for (int g = 0; g < G; ++g) av[g] = _mm256_mul_ps(_mm256_load_ps(acc[g] + c), _mm256_set1_ps(alpha[g]));
      for (int64_t t = 0; t < nt; ++t) {
        const __m256 vv = n == 8 ? V8<E>::load(vrow[t] + c) : load_tail<E>(vrow[t] + c, n);
        RF_UNROLL for (int g = 0; g < G; ++g) av[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[g][t]), vv, av[g]);
      }
      RF_UNROLL for (int g = 0; g < G; ++g) _mm256_store_ps(acc[g] + c, av[g]);
    }
  }

  // pv_tile for the P 16-column chunks from column c (masked loads past D; acc is
  // zero-padded to 256 columns), prefetching the same columns of the next tile's V rows
  template <int G, int P>
  static RF_AVX512VNNI RF_INLINE void pv_pass512(const DecodeArgs& a, float (*acc)[256], const float* alpha,
                                                 const float (*s)[kDecTile], const T* const* vrow, int64_t nt,
                                                 const TilePrefetch& pf, int64_t c) {
    const int64_t D = a.d, end = std::min<int64_t>(D, c + 16 * P);
    __mmask16 cols[P];
    RF_UNROLL for (int u = 0; u < P; ++u) cols[u] = __mmask16((1u << std::clamp<int64_t>(D - c - 16 * u, 0, 16)) - 1u);
    __m512 av[G][P];
    RF_UNROLL for (int g = 0; g < G; ++g) {
      const __m512 va = _mm512_set1_ps(alpha[g]);
      RF_UNROLL for (int u = 0; u < P; ++u) av[g][u] = _mm512_mul_ps(_mm512_load_ps(acc[g] + c + 16 * u), va);
    }
#pragma GCC unroll 2
    for (int64_t t = 0; t < nt; ++t) {
      if (t < pf.nn) prefetch_span<_MM_HINT_T1>(pf.nkrow[t] + c, pf.nkrow[t] + end);  // next tile's K
      const T* vr = vrow[t] + c;
      __m512 pb[G];
      RF_UNROLL for (int g = 0; g < G; ++g) pb[g] = _mm512_set1_ps(s[g][t]);
      RF_UNROLL for (int u = 0; u < P; ++u) {
        const __m512 vv = load16_masked<E>(vr + 16 * u, cols[u]);
        RF_UNROLL for (int g = 0; g < G; ++g) av[g][u] = _mm512_fmadd_ps(pb[g], vv, av[g][u]);
      }
    }
    RF_UNROLL for (int g = 0; g < G; ++g)
      RF_UNROLL for (int u = 0; u < P; ++u) _mm512_store_ps(acc[g] + c + 16 * u, av[g][u]);
  }

  template <int G>
  static RF_AVX512VNNI void pv_tile512(const DecodeArgs& a, float (*acc)[256], const float* alpha,
                                       const float (*s)[kDecTile], const T* const* vrow, int64_t nt,
                                       const TilePrefetch& pf) {
    constexpr int PC = kPvChunks512<G>;
    for (int64_t c = 0; c < a.d; c += 16 * PC) {
      const int64_t chunks = std::min<int64_t>(PC, (a.d - c + 15) / 16);
      switch (chunks) {  // P <= PC, the rest compiled away
        case 1: pv_pass512<G, 1>(a, acc, alpha, s, vrow, nt, pf, c); break;
        case 2: pv_pass512<G, std::min(PC, 2)>(a, acc, alpha, s, vrow, nt, pf, c); break;
        case 3: pv_pass512<G, std::min(PC, 3)>(a, acc, alpha, s, vrow, nt, pf, c); break;
        case 4: pv_pass512<G, std::min(PC, 4)>(a, acc, alpha, s, vrow, nt, pf, c); break;
        default: pv_pass512<G, PC>(a, acc, alpha, s, vrow, nt, pf, c); break;
      }
    }
  }

  template <int G, bool kWide>
  static RF_AVX2 void split_vec(const DecodeArgs& a, const Item& it, int64_t j0, int64_t j1, const Item* next) {
    const int64_t D = a.d, Df = D & ~int64_t(7), Dp = (D + 7) & ~int64_t(7);
    const int64_t h0 = it.kvh * a.group + it.g0;  // first query head of the item
    alignas(64) float qf[G][256];   // q * scale in fp32, zero-padded to Dp
    alignas(64) float acc[G][256];  // unnormalized output, zero-padded to 256 columns
    for (int g = 0; g < G; ++g) {
      const T* qp = static_cast<const T*>(a.q) + it.b * a.q_sb + (h0 + g) * a.q_sh;
      for (int64_t i = 0; i < D; ++i) qf[g][i] = E::load(qp + i) * a.scale;
      for (int64_t i = D; i < Dp; ++i) qf[g][i] = 0.0f;
      std::fill(acc[g], acc[g] + 256, 0.0f);
    }
    float m[G], l[G], alpha[G];
    for (int g = 0; g < G; ++g) m[g] = -std::numeric_limits<float>::infinity(), l[g] = 0.0f;
    alignas(64) float s[G][kDecTile];
    // row pointers of this tile (rows[cur]) and of the next one (rows[cur ^ 1])
    const T* rows[2][2][kDecTile];
    int cur = 0;
    const bool packed = a.k_spos == D && a.v_spos == D;
    const bool k_in_score = !kWide && Df < 8 * kPvChunks<G>;  // pv_tile's multi-chunk loop does not run
    constexpr int64_t tile = kDecTile;
    tile_rows(a, it.b, it.kvh, j0, std::min<int64_t>(tile, j1 - j0), rows[0][0], rows[0][1]);
    for (int64_t t0 = j0; t0 < j1; t0 += tile, cur ^= 1) {
      const int64_t nt = std::min<int64_t>(tile, j1 - t0), nt8 = (nt + 7) & ~int64_t(7);
      const T** krow = rows[cur][0];
      const T** vrow = rows[cur][1];
      const T** nkrow = rows[cur ^ 1][0];
      const T** nvrow = rows[cur ^ 1][1];
      for (int64_t t = nt; t < nt8; ++t) krow[t] = krow[nt - 1];  // padding keys: scored, then masked
      int64_t nn = std::min<int64_t>(tile, j1 - t0 - tile);  // keys of the next tile
      if (nn > 0) {
        tile_rows(a, it.b, it.kvh, t0 + tile, nn, nkrow, nvrow);
      } else if (next) {  // the last tile prefetches the first of the thread's next item
        const int64_t len = a.seq_lens[next->b], nj0 = first_key(a, len) + next->split * a.split_size;
        nn = std::min<int64_t>(std::min<int64_t>(tile, nt), len - nj0);
        if (nn > 0) tile_rows(a, next->b, next->kvh, nj0, nn, nkrow, nvrow);
      }
      const TilePrefetch pf{vrow, nt, nkrow, nn, packed, k_in_score};
      if constexpr (kWide)
        score_tile512<G>(a, qf, krow, nt8, pf, s);
      else
        score_tile<G>(a, qf, krow, nt8, pf, s);
      // online softmax update per query: p = exp(s - m_new); the running output is rescaled
      // by alpha as the PV loop loads it
      for (int g = 0; g < G; ++g) {
        const float tile_max = max_of(s[g], nt);
        const float m_new = std::max(m[g], tile_max);
        alpha[g] = std::exp(m[g] - m_new);  // 0 on the first tile (m = -inf)
        const __m256 vm = _mm256_set1_ps(m_new);
        __m256 psum = _mm256_setzero_ps();
        for (int64_t t = 0; t < nt8; t += 8) {
          __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s[g] + t), vm));
          if (t + 8 > nt) {  // lanes past the tile's end contribute nothing
            const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(int(t)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(nt)), lane)));
          }
          _mm256_store_ps(s[g] + t, p);
          psum = _mm256_add_ps(psum, p);
        }
        l[g] = l[g] * alpha[g] + hsum(psum);
        m[g] = m_new;
      }
      if constexpr (kWide)
        pv_tile512<G>(a, acc, alpha, s, vrow, nt, pf);
      else
        pv_tile<G>(a, acc, alpha, s, vrow, nt, pf);
    }
    for (int g = 0; g < G; ++g) {
      const int64_t slot = ((it.b * a.hq) + h0 + g) * a.max_splits + it.split;
      std::copy(acc[g], acc[g] + D, a.part_acc + slot * D);
      a.part_m[slot] = m[g];
      a.part_l[slot] = l[g];
    }
  }

  template <bool kWide>
  static void split_any(const DecodeArgs& a, const Item& it, int64_t j0, int64_t j1, const Item* next) {
    switch (it.g1 - it.g0) {
      case 1: split_vec<1, kWide>(a, it, j0, j1, next); break;
      case 2: split_vec<2, kWide>(a, it, j0, j1, next); break;
      case 3: split_vec<3, kWide>(a, it, j0, j1, next); break;
      case 4: split_vec<4, kWide>(a, it, j0, j1, next); break;
      case 5: split_vec<5, kWide>(a, it, j0, j1, next); break;
      case 6: split_vec<6, kWide>(a, it, j0, j1, next); break;
      case 7: split_vec<7, kWide>(a, it, j0, j1, next); break;
      default: split_vec<8, kWide>(a, it, j0, j1, next); break;
    }
  }

  static void split_scalar(const DecodeArgs& a, const Item& it, int64_t j0, int64_t j1) {
    const int64_t D = a.d;
    const int64_t h0 = it.kvh * a.group + it.g0;
    for (int64_t g = 0; g < it.g1 - it.g0; ++g) {
      const T* qp = static_cast<const T*>(a.q) + it.b * a.q_sb + (h0 + g) * a.q_sh;
      const int64_t slot = ((it.b * a.hq) + h0 + g) * a.max_splits + it.split;
      float* acc = a.part_acc + slot * D;
      std::fill(acc, acc + D, 0.0f);
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      const T* krow[kTile];
      const T* vrow[kTile];
      for (int64_t j = j0; j < j1; ++j) {
        if ((j - j0) % kTile == 0) tile_rows(a, it.b, it.kvh, j, std::min<int64_t>(kTile, j1 - j), krow, vrow);
        const T* kp = krow[(j - j0) % kTile];
        float score = 0.0f;
        for (int64_t i = 0; i < D; ++i) score += E::load(qp + i) * a.scale * E::load(kp + i);
        if (a.softcap > 0.0f) score = a.softcap * std::tanh(score / a.softcap);
        const float m_new = std::max(m, score);
        const float alpha = std::exp(m - m_new), p = std::exp(score - m_new);
        const T* vp = vrow[(j - j0) % kTile];
        for (int64_t i = 0; i < D; ++i) acc[i] = acc[i] * alpha + p * E::load(vp + i);
        l = l * alpha + p;
        m = m_new;
      }
      a.part_m[slot] = m;
      a.part_l[slot] = l;
    }
  }

  // out[b, h] = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), splits in order
  static void merge(const DecodeArgs& a, int64_t b, int64_t h, int64_t nsplit) {
    T* op = static_cast<T*>(a.out) + b * a.out_sb + h * a.out_sh;
    if (nsplit == 0) {  // empty sequence: zeros
      for (int64_t i = 0; i < a.d; ++i) E::store(op + i, 0.0f);
      return;
    }
    const int64_t base = (b * a.hq + h) * a.max_splits;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < nsplit; ++s) mx = std::max(mx, a.part_m[base + s]);
    float w[64];  // nsplit <= 64 is guaranteed by the split size choice
    float denom = 0.0f;
    for (int64_t s = 0; s < nsplit; ++s) {
      w[s] = std::exp(a.part_m[base + s] - mx);
      denom += a.part_l[base + s] * w[s];
    }
    const float inv = 1.0f / denom;
    // splits in the outer loop so the inner one vectorizes: the same sums in the same order
    // per element as the loop over splits per element it replaces (~180 K instructions on
    // one thread at B = 8, Hq = 9, 4 splits; with the merge in the kernels' parallel region,
    // a warm B = 8, L = 64 call went from 23 to 16 us)
    float num[256];
    std::fill(num, num + a.d, 0.0f);
    for (int64_t s = 0; s < nsplit; ++s) {
      const float* src = a.part_acc + (base + s) * a.d;
      const float ws = w[s];
      for (int64_t i = 0; i < a.d; ++i) num[i] += src[i] * ws;
    }
    for (int64_t i = 0; i < a.d; ++i) E::store(op + i, num[i] * inv);
  }

  static void run(const DecodeArgs& a, const std::vector<Item>& items, const std::vector<int64_t>& nsplits,
                  Isa isa, int num_threads) {
    const int64_t n_items = int64_t(items.size());
    const int threads = std::max(1, num_threads);
    auto keys_of = [&](const Item& it, int64_t& j0, int64_t& j1) {
      const int64_t len = a.seq_lens[it.b];
      j0 = first_key(a, len) + it.split * a.split_size;
      j1 = std::min<int64_t>(len, j0 + a.split_size);
    };
    // Each thread takes a contiguous run of items with about the same number of keys, in
    // order, so the last tile of an item prefetches the first tile of the thread's next one
    // (a dynamic schedule cannot know it: every item then started with a cold tile).
    std::vector<int64_t> prefix(size_t(n_items) + 1, 0);  // keys (+1 per item) before item n
    for (int64_t n = 0; n < n_items; ++n) {
      int64_t j0, j1;
      keys_of(items[size_t(n)], j0, j1);
      prefix[size_t(n) + 1] = prefix[size_t(n)] + (j1 - j0) + 1;
    }
    const int64_t n_out = a.batch * a.hq;
    const bool wide = avx512_kernels();
#pragma omp parallel num_threads(threads) if (n_items > 1)
    {
      const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
      auto bound = [&](int64_t k) {
        return int64_t(std::lower_bound(prefix.begin(), prefix.end(), prefix.back() * k / nth) - prefix.begin());
      };
      const int64_t lo = bound(tid), hi = tid + 1 == nth ? n_items : bound(tid + 1);
      for (int64_t n = lo; n < hi; ++n) {
        const Item& it = items[size_t(n)];
        int64_t j0, j1;
        keys_of(it, j0, j1);
        const Item* after = n + 1 < hi ? &items[size_t(n) + 1] : nullptr;
        if (isa == Isa::kAvx2 && wide)
          split_any<true>(a, it, j0, j1, after);
        else if (isa == Isa::kAvx2)
          split_any<false>(a, it, j0, j1, after);
        else
          split_scalar(a, it, j0, j1);
      }
      // the merge in the same parallel region (one fork per call, not two)
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t n = 0; n < n_out; ++n) merge(a, n / a.hq, n % a.hq, nsplits[size_t(n / a.hq)]);
    }
  }
};

}  // namespace

void decode_attention(std::uintptr_t out, int64_t out_sb, int64_t out_sh, std::uintptr_t q, int64_t q_sb,
                      int64_t q_sh, std::uintptr_t k, int64_t k_sblk, int64_t k_sh, int64_t k_spos,
                      std::uintptr_t v, int64_t v_sblk, int64_t v_sh, int64_t v_spos,
                      std::uintptr_t block_table, int64_t bt_stride, int64_t max_blocks, int64_t block_size,
                      int64_t num_blocks, std::uintptr_t seq_lens, int64_t batch, int64_t num_q_heads,
                      int64_t num_kv_heads, int64_t head_dim, double scale, double softcap, int64_t window,
                      int dtype, int64_t split_size, int num_threads) {
  const std::string p = "decode_attention: ";
  RINGFUSE_CHECK(batch >= 0 && num_kv_heads >= 1 && num_q_heads >= 0, p + "bad batch / head counts");
  RINGFUSE_CHECK(num_q_heads % num_kv_heads == 0, p + "num_q_heads must be a multiple of num_kv_heads");
  RINGFUSE_CHECK(head_dim >= 1 && head_dim <= 256, p + "head_dim must be in [1, 256], got " + std::to_string(head_dim));
  // a cache without keys (S_max = 0, no blocks) holds sequences of length 0 only: the
  // seq_lens check below names any other length
  RINGFUSE_CHECK(block_size >= 0 && max_blocks >= 0 && num_blocks >= 0, p + "bad cache geometry");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "dtype must be float32, float16 or bfloat16");
  RINGFUSE_CHECK(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0.0, p + "scale and softcap must be finite (softcap >= 0)");
  RINGFUSE_CHECK(split_size >= kTile && split_size % kTile == 0, p + "split_size must be a positive multiple of 32");
  RINGFUSE_CHECK(window >= 0, p + "window must be >= 0 (0: no sliding window), got " + std::to_string(window));
  if (batch == 0 || num_q_heads == 0) return;
  const int64_t capacity = max_blocks * block_size;
  RINGFUSE_CHECK(out && q && seq_lens, p + "null pointer");
  const auto* lens = reinterpret_cast<const int32_t*>(seq_lens);
  const auto* table = reinterpret_cast<const int32_t*>(block_table);
  int64_t max_len = 0;  // most keys any query sees
  // Validate every value that addresses memory before any is used (no throw inside OpenMP).
  for (int64_t b = 0; b < batch; ++b) {
    RINGFUSE_CHECK(lens[b] >= 0 && lens[b] <= capacity,
                   p + "seq_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                       " outside [0, " + std::to_string(capacity) + "] (the cache's capacity)");
    const int64_t first = window > 0 ? std::max<int64_t>(0, lens[b] - window) : 0;  // first_key()
    max_len = std::max<int64_t>(max_len, lens[b] - first);
    if (table) {  // the blocks that hold the keys read; those before a window may be stale
      if (block_size == 0) continue;  // capacity 0: the length is 0, no block is read
      for (int64_t i = first / block_size; i < (lens[b] + block_size - 1) / block_size; ++i) {
        const int32_t blk = table[b * bt_stride + i];
        RINGFUSE_CHECK(blk >= 0 && blk < num_blocks,
                       p + "block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                           std::to_string(blk) + " outside [0, " + std::to_string(num_blocks) + ")");
      }
    } else {
      RINGFUSE_CHECK(b < num_blocks, p + "contiguous cache has fewer sequences than the batch");
    }
  }
  if (max_len == 0) {  // no query sees a key (e.g. a cache with no keys, then every length is 0): out = 0
    const int64_t elem = dtype == kFloat32 ? 4 : 2;
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < num_q_heads; ++h)
        std::memset(reinterpret_cast<char*>(out) + (b * out_sb + h * out_sh) * elem, 0, size_t(head_dim * elem));
    return;
  }
  RINGFUSE_CHECK(k && v, p + "null pointer");
  // at most 64 splits per sequence (the merge's weight buffer), at least split_size keys each
  while ((max_len + split_size - 1) / split_size > 64) split_size *= 2;
  const int64_t max_splits = std::max<int64_t>(1, (max_len + split_size - 1) / split_size);
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t slots = batch * num_q_heads * max_splits;
  std::unique_ptr<float[]> part(new float[size_t(slots * (head_dim + 2))]);
  DecodeArgs a{reinterpret_cast<void*>(out), out_sb, out_sh, reinterpret_cast<const void*>(q), q_sb, q_sh,
               reinterpret_cast<const void*>(k), k_sblk, k_sh, k_spos, reinterpret_cast<const void*>(v),
               v_sblk, v_sh, v_spos, table, bt_stride, table ? block_size : capacity, lens, batch,
               num_q_heads, num_kv_heads, head_dim, group, float(scale), float(softcap), window, split_size,
               max_splits, part.get(), part.get() + slots, part.get() + 2 * slots};
  std::vector<Item> items;
  std::vector<int64_t> nsplits(size_t(batch), 0);
  for (int64_t b = 0; b < batch; ++b) {
    nsplits[size_t(b)] = (lens[b] - first_key(a, lens[b]) + split_size - 1) / split_size;
    for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
      for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup)
        for (int64_t s = 0; s < nsplits[size_t(b)]; ++s) items.push_back({b, kvh, g0, std::min(group, g0 + kMaxGroup), s});
  }
  const Isa isa = active_isa();
  switch (dtype) {
    case kFloat16: DecodeKernel<F16>::run(a, items, nsplits, isa, num_threads); break;
    case kBFloat16: DecodeKernel<BF16>::run(a, items, nsplits, isa, num_threads); break;
    default: DecodeKernel<F32>::run(a, items, nsplits, isa, num_threads); break;
  }
}

namespace {

// ---------------------------------------------------------------------------------------
// Prefill: FlashAttention-2 style forward.
//
// Work item = (sequence b, kv head, <= 8 query heads sharing it (GQA), tile of queries).
// Its M = heads x queries <= 64 rows live in per-thread fp32 scratch: Qf = q * scale, the
// unnormalized output O, the running max m and sum l. Keys are walked in tiles of 64: K^T
// packed to fp32 [D][64] (transposed so the score kernel broadcasts one q element against
// 8 keys), V packed to fp32 [64][Dp] (fp32 rows of a multiple of 8 are read in place).
// Per tile:
//   S = Qf K^T              register block of 6 rows x 16 keys (12 accumulators)
//   online softmax per row  causal mask on diagonal tiles only, softcap, exp8
//   O = O * alpha + P V     register block of 6 rows x 16 columns
// There is no [Sq, Sk] matrix: the extra memory is the scratch, (3 * 64 + 2 * D) * 64 floats
// per thread, whatever S is. bf16 inputs on CPUs with AMX take attention_amx.cpp instead.
//
// Napkin math, (Hq, Hkv, D) = (9, 3, 64), Sq = Sk = 2048, causal: 4 * 9 * 2048^2 / 2 * 64
// = 4.8 GFLOP, 26 ms at the 182 GFLOP/s FMA peak of 2 cores; K/V bytes are tiny (1.5 MB
// fp32). Each packed K/V tile serves the item's 48 rows (3 heads x 16 queries), so packing
// is ~2% of the work, and exp8 (~20 instructions per 8 scores) ~15% at D = 64. On AVX-512
// hosts (avx512vnni level) the products and the exponents run 16 lanes wide with the AVX2
// bits; SPR VM, fp32, causal, S = 2048: 9/3/64 0.99x -> 1.12x SDPA, 32/8/128 0.94x -> 0.97x
// (there the products, at ~45% of the AVX-512 FMA peak, are the cost).

constexpr int kRowBlock = 6;      // rows per register block

struct PrefillScratch {
  std::vector<float> buf;
  float *qf, *o, *kt, *vp, *s, *m, *l, *alpha;
  explicit PrefillScratch(int64_t dp)
      : buf(size_t(2 * kMaxRows * dp + 2 * kKeyTile * dp + kMaxRows * kKeyTile + 3 * kMaxRows), 0.0f) {
    qf = buf.data();                 // [kMaxRows][dp]
    o = qf + kMaxRows * dp;          // [kMaxRows][dp]
    kt = o + kMaxRows * dp;          // [dp][kKeyTile]
    vp = kt + dp * kKeyTile;         // [kKeyTile][dp]
    s = vp + kKeyTile * dp;          // [kMaxRows][kKeyTile]
    m = s + kMaxRows * kKeyTile;     // [kMaxRows]
    l = m + kMaxRows;                // [kMaxRows]
    alpha = l + kMaxRows;            // [kMaxRows]
  }
};

// s[r][0, 16 * nchunk) = qf[r] . kt[:, j] for MR rows (qf rows ld apart, kt [D][kKeyTile])
template <int MR>
RF_AVX2 void score_block(const float* qf, int64_t ld, const float* kt, int64_t D, int64_t nchunk, float* s) {
  for (int64_t c = 0; c < nchunk; ++c) {
    __m256 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* kp = kt + c * 16;
    for (int64_t d = 0; d < D; ++d, kp += kKeyTile) {
      const __m256 k0 = _mm256_loadu_ps(kp), k1 = _mm256_loadu_ps(kp + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 qb = _mm256_broadcast_ss(qf + r * ld + d);
        acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_ps(s + r * kKeyTile + c * 16, acc[r][0]);
      _mm256_storeu_ps(s + r * kKeyTile + c * 16 + 8, acc[r][1]);
    }
  }
}

// o[r] = o[r] * alpha[r] + sum_j p[r][j] v[j] for MR rows, columns [0, dp) (dp % 8 == 0).
// The tile's sum starts from zero and joins o once: folding it into o key by key made one
// sequential sum over every key of the row (at 4096 keys, 3-4x torch's error).
template <int MR>
RF_AVX2 void pv_block(const float* p, const float* alpha, const float* v, int64_t ldv, int64_t nk, float* o,
                      int64_t ldo, int64_t dp) {
  int64_t c = 0;
  for (; c + 16 <= dp; c += 16) {
    __m256 acc[MR][2];
    RF_UNROLL for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const float* vr = v + c;
    for (int64_t j = 0; j < nk; ++j, vr += ldv) {
      const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
      RF_UNROLL for (int r = 0; r < MR; ++r) {
        const __m256 pb = _mm256_broadcast_ss(p + r * kKeyTile + j);
        acc[r][0] = _mm256_fmadd_ps(pb, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(pb, v1, acc[r][1]);
      }
    }
    RF_UNROLL for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(alpha + r);
      float* orow = o + r * ldo + c;
      _mm256_storeu_ps(orow, _mm256_fmadd_ps(_mm256_loadu_ps(orow), a, acc[r][0]));
      _mm256_storeu_ps(orow + 8, _mm256_fmadd_ps(_mm256_loadu_ps(orow + 8), a, acc[r][1]));
    }
  }
  if (c < dp) {  // 8 columns left
    __m256 acc[MR];
    RF_UNROLL for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    const float* vr = v + c;
    for (int64_t j = 0; j < nk; ++j, vr += ldv) {
      const __m256 v0 = _mm256_loadu_ps(vr);
      RF_UNROLL for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + r * kKeyTile + j), v0, acc[r]);
    }
    RF_UNROLL for (int r = 0; r < MR; ++r)
      _mm256_storeu_ps(o + r * ldo + c,
                       _mm256_fmadd_ps(_mm256_loadu_ps(o + r * ldo + c), _mm256_broadcast_ss(alpha + r), acc[r]));
  }
}

RF_AVX2 void score_rows(int64_t rows, const float* qf, int64_t ld, const float* kt, int64_t D, int64_t nchunk,
                        float* s) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) score_block<kRowBlock>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile);
  switch (rows - r) {
    case 5: score_block<5>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile); break;
    case 4: score_block<4>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile); break;
    case 3: score_block<3>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile); break;
    case 2: score_block<2>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile); break;
    case 1: score_block<1>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile); break;
    default: break;
  }
}

RF_AVX2 void pv_rows(int64_t rows, const float* p, const float* alpha, const float* v, int64_t ldv, int64_t nk,
                     float* o, int64_t ldo, int64_t dp) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    pv_block<kRowBlock>(p + r * kKeyTile, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp);
  const float* pr = p + r * kKeyTile;
  switch (rows - r) {
    case 5: pv_block<5>(pr, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp); break;
    case 4: pv_block<4>(pr, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp); break;
    case 3: pv_block<3>(pr, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp); break;
    case 2: pv_block<2>(pr, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp); break;
    case 1: pv_block<1>(pr, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp); break;
    default: break;
  }
}

// The same two products with 16-lane AVX-512 FMAs (hosts with AVX-512 at the "avx512vnni"
// ISA level and above): half the FMA instructions per score of the AVX2 blocks, whose
// ~65% of the AVX2 peak left torch's AVX-512 SDPA ahead at long fp32 prompts.

// s[r][0, 16 NC) = qf[r] . kt[:, j] for MR rows: MR x NC accumulators of 16 keys
template <int MR, int NC>
RF_AVX512VNNI void score_block512(const float* qf, int64_t ld, const float* kt, int64_t D, float* s) {
  __m512 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* kp = kt;
  for (int64_t d = 0; d < D; ++d, kp += kKeyTile) {
    __m512 k[NC];
    for (int c = 0; c < NC; ++c) k[c] = _mm512_loadu_ps(kp + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 qb = _mm512_set1_ps(qf[r * ld + d]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(qb, k[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(s + r * kKeyTile + 16 * c, acc[r][c]);
}

// o[r][c0, c0 + 16 NC) = o[r] * alpha[r] + sum_j p[r][j] v[j] for MR rows (the tile's sum
// from zero, as pv_block)
template <int MR, int NC>
RF_AVX512VNNI void pv_block512(const float* p, const float* alpha, const float* v, int64_t ldv, int64_t nk, float* o,
                           int64_t ldo) {
  __m512 acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  const float* vr = v;
  for (int64_t j = 0; j < nk; ++j, vr += ldv) {
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 pb = _mm512_set1_ps(p[r * kKeyTile + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < NC; ++c)
      _mm512_storeu_ps(o + r * ldo + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(o + r * ldo + 16 * c), a, acc[r][c]));
  }
}

template <int MR>
RF_AVX512VNNI void score_rows512_mr(const float* qf, int64_t ld, const float* kt, int64_t D, int64_t nchunk, float* s) {
  switch (nchunk) {
    case 1: score_block512<MR, 1>(qf, ld, kt, D, s); break;
    case 2: score_block512<MR, 2>(qf, ld, kt, D, s); break;
    case 3: score_block512<MR, 3>(qf, ld, kt, D, s); break;
    default: score_block512<MR, 4>(qf, ld, kt, D, s); break;
  }
}

template <int MR>
RF_AVX512VNNI void pv_rows512_mr(const float* p, const float* alpha, const float* v, int64_t ldv, int64_t nk, float* o,
                             int64_t ldo, int64_t dp) {
  for (int64_t c = 0; c < dp; c += 64) {  // dp % 16 == 0
    switch (std::min<int64_t>(4, (dp - c) / 16)) {
      case 1: pv_block512<MR, 1>(p, alpha, v + c, ldv, nk, o + c, ldo); break;
      case 2: pv_block512<MR, 2>(p, alpha, v + c, ldv, nk, o + c, ldo); break;
      case 3: pv_block512<MR, 3>(p, alpha, v + c, ldv, nk, o + c, ldo); break;
      default: pv_block512<MR, 4>(p, alpha, v + c, ldv, nk, o + c, ldo); break;
    }
  }
}

// score_rows / pv_rows on AVX-512, for dp % 16 == 0: 6-row blocks (6 x 4 accumulators)
RF_AVX512VNNI void score_rows512(int64_t rows, const float* qf, int64_t ld, const float* kt, int64_t D, int64_t nchunk,
                             float* s) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock) score_rows512_mr<kRowBlock>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile);
  for (; r < rows; ++r) score_rows512_mr<1>(qf + r * ld, ld, kt, D, nchunk, s + r * kKeyTile);
}

RF_AVX512VNNI void pv_rows512(int64_t rows, const float* p, const float* alpha, const float* v, int64_t ldv, int64_t nk,
                          float* o, int64_t ldo, int64_t dp) {
  int64_t r = 0;
  for (; r + kRowBlock <= rows; r += kRowBlock)
    pv_rows512_mr<kRowBlock>(p + r * kKeyTile, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp);
  for (; r < rows; ++r) pv_rows512_mr<1>(p + r * kKeyTile, alpha + r, v, ldv, nk, o + r * ldo, ldo, dp);
}

// The first half of a row's online-softmax update over a tile: scores s[first, valid)
// count; the others are masked (before a sliding window, after the causal diagonal or past
// the tile). Applies the softcap, sets alpha (the factor that rescales the row's previous O
// and l) and m_safe (the max the exponents subtract). false: no score counts (s zeroed).
// The max runs over 8 lanes on every path: which NaN a lane keeps depends on the lane order.
RF_AVX2 RF_INLINE bool softmax_begin(float* s, int64_t first, int64_t valid, int64_t width, float softcap, float m,
                                     float& alpha, float& m_new, float& m_safe) {
  if (valid <= first) {
    std::fill(s, s + width, 0.0f);
    alpha = 1.0f;
    return false;
  }
  if (softcap > 0.0f) {
    const __m256 cap = _mm256_set1_ps(softcap), inv = _mm256_set1_ps(1.0f / softcap);
    for (int64_t c = 0; c < width; c += 8)
      _mm256_storeu_ps(s + c, _mm256_mul_ps(cap, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + c), inv))));
  }
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = first;
  for (; c + 8 <= valid; c += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + c));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = lanes[0];
  for (int i = 1; i < 8; ++i) mx = std::max(mx, lanes[i]);
  for (; c < valid; ++c) mx = std::max(mx, s[c]);
  m_new = std::max(m, mx);
  // all scores -inf so far (infinite inputs): keep p = 0 and the row unchanged, not NaN
  m_safe = m_new == -std::numeric_limits<float>::infinity() ? 0.0f : m_new;
  alpha = std::exp(m - m_safe);
  return true;
}

// One row's online-softmax update over a tile (see softmax_begin): leaves p in s (0 where
// masked), alpha, and the row's new m and l.
RF_AVX2 void softmax_update(float* s, int64_t first, int64_t valid, int64_t width, float softcap, float& m,
                            float& l, float& alpha) {
  float m_new, m_safe;
  if (!softmax_begin(s, first, valid, width, softcap, m, alpha, m_new, m_safe)) return;
  const __m256 vm = _mm256_set1_ps(m_safe);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 psum = _mm256_setzero_ps();
  for (int64_t c = 0; c < width; c += 8) {
    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
    if (c < first || c + 8 > valid) {  // keep lanes idx in [first, valid)
      const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int(c)), lane);
      const __m256i keep = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(valid)), idx),
                                            _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(int(first) - 1)));
      p = _mm256_and_ps(p, _mm256_castsi256_ps(keep));
    }
    _mm256_storeu_ps(s + c, p);
    psum = _mm256_add_ps(psum, p);
  }
  l = l * alpha + hsum(psum);
  m = m_new;
}

// softmax_update with the exponents 16 lanes at a time (exp16 is exp8 at 16 lanes) and the
// sum still taken 8 lanes at a time in key order: the same bits, with half the instructions
// of the exp, ~15-25% of the fp32 prefill's work (width is a multiple of 16).
RF_AVX512VNNI void softmax_update512(float* s, int64_t first, int64_t valid, int64_t width, float softcap, float& m,
                                     float& l, float& alpha) {
  float m_new, m_safe;
  if (!softmax_begin(s, first, valid, width, softcap, m, alpha, m_new, m_safe)) return;
  const __m512 vm = _mm512_set1_ps(m_safe);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m256 psum = _mm256_setzero_ps();
  for (int64_t c = 0; c < width; c += 16) {
    __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));
    if (c < first || c + 16 > valid) {  // keep lanes idx in [first, valid)
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int(c)), lane);
      const __mmask16 keep = _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(int(valid))) &
                             _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(int(first)));
      p = _mm512_maskz_mov_ps(keep, p);
    }
    _mm512_storeu_ps(s + c, p);
    psum = _mm256_add_ps(psum, _mm512_castps512_ps256(p));
    psum = _mm256_add_ps(psum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
  }
  l = l * alpha + hsum(psum);
  m = m_new;
}

template <class E>
struct PrefillKernel {
  using T = typename E::T;

  // kt[d][j] = k[j][d] in fp32 for keys [0, nk) (rows ldk apart)
  static RF_AVX2 void pack_kt(const T* k, int64_t ldk, int64_t nk, int64_t D, float* kt) {
    int64_t j = 0;
    for (; j + 8 <= nk; j += 8) {
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = V8<E>::load(k + (j + i) * ldk + d);
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d + i) * kKeyTile + j, r[i]);
      }
      for (; d < D; ++d)
        for (int i = 0; i < 8; ++i) kt[d * kKeyTile + j + i] = E::load(k + (j + i) * ldk + d);
    }
    for (; j < nk; ++j)
      for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + j] = E::load(k + j * ldk + d);
  }

  // dst[0, dp) = src[0, D) * mul in fp32, zero-padded
  static RF_AVX2 void load_row(const T* src, int64_t D, float mul, float* dst) {
    const __m256 vm = _mm256_set1_ps(mul);
    int64_t c = 0;
    for (; c + 8 <= D; c += 8) _mm256_storeu_ps(dst + c, _mm256_mul_ps(V8<E>::load(src + c), vm));
    if (c < D) _mm256_storeu_ps(dst + c, _mm256_mul_ps(load_tail<E>(src + c, D - c), vm));
  }

  // wide: the AVX-512 products (dp % 16 == 0) and exponents; the rest of the item stays AVX2
  static RF_AVX2 void item_avx2(const PrefillArgs& a, const PrefillItem& it, PrefillScratch& w, bool wide) {
    int64_t qs, qlen, ks, klen;
    seq_range(a.cu_q, a.sq, it.b, qs, qlen);
    seq_range(a.cu_k, a.sk, it.b, ks, klen);
    const int64_t D = a.d, dp = (D + 7) & ~int64_t(7), nq = it.i1 - it.i0, rows = (it.g1 - it.g0) * nq;
    const int64_t h0 = it.kvh * a.group + it.g0, diag = klen - qlen;  // query i sees key j iff j <= i + diag
    const T* qb = static_cast<const T*>(a.q) + it.b * a.q_sb + h0 * a.q_sh + (qs + it.i0) * a.q_ss;
    for (int64_t r = 0; r < rows; ++r) {  // row r = (head r / nq, query it.i0 + r % nq)
      load_row(qb + (r / nq) * a.q_sh + (r % nq) * a.q_ss, D, a.scale, w.qf + r * dp);
      std::fill(w.o + r * dp, w.o + (r + 1) * dp, 0.0f);
      w.m[r] = -std::numeric_limits<float>::infinity();
      w.l[r] = 0.0f;
    }
    int64_t lo, hi;  // keys anyone sees
    item_keys(a, it, klen, diag, lo, hi);
    const T* kb = static_cast<const T*>(a.k) + it.b * a.k_sb + it.kvh * a.k_sh + ks * a.k_ss;
    const T* vb = static_cast<const T*>(a.v) + it.b * a.v_sb + it.kvh * a.v_sh + ks * a.v_ss;
    for (int64_t j0 = lo; j0 < hi; j0 += kKeyTile) {
      const int64_t nk = std::min(kKeyTile, hi - j0), nchunk = (nk + 15) / 16;
      pack_kt(kb + j0 * a.k_ss, a.k_ss, nk, D, w.kt);
      const float* vt = w.vp;
      int64_t ldv = dp;
      if constexpr (E::code == kFloat32) {
        if (D == dp) vt = reinterpret_cast<const float*>(vb + j0 * a.v_ss), ldv = a.v_ss;
      }
      if (vt == w.vp)
        for (int64_t j = 0; j < nk; ++j) load_row(vb + (j0 + j) * a.v_ss, D, 1.0f, w.vp + j * dp);
      if (wide)
        score_rows512(rows, w.qf, dp, w.kt, D, nchunk, w.s);
      else
        score_rows(rows, w.qf, dp, w.kt, D, nchunk, w.s);
      for (int64_t r = 0; r < rows; ++r) {
        int64_t first, valid;
        row_keys(a, it.i0 + r % nq, diag, j0, nk, first, valid);
        (wide ? softmax_update512 : softmax_update)(w.s + r * kKeyTile, first, valid, nchunk * 16, a.softcap,
                                                    w.m[r], w.l[r], w.alpha[r]);
      }
      if (wide)
        pv_rows512(rows, w.s, w.alpha, vt, ldv, nk, w.o, dp, dp);
      else
        pv_rows(rows, w.s, w.alpha, vt, ldv, nk, w.o, dp, dp);
    }
    for (int64_t r = 0; r < rows; ++r) store_row(a, it, qs, nq, r, w.o + r * dp, w.m[r], w.l[r]);
  }

  // out row = o / l (zeros when no key was visible), lse = m + log l (-inf then)
  static RF_AVX2 void store_row(const PrefillArgs& a, const PrefillItem& it, int64_t qs, int64_t nq, int64_t r,
                                const float* o, float m, float l) {
    const int64_t h = it.kvh * a.group + it.g0 + r / nq, i = qs + it.i0 + r % nq, D = a.d;
    T* dst = static_cast<T*>(a.out) + it.b * a.o_sb + h * a.o_sh + i * a.o_ss;
    const __m256 inv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
    int64_t c = 0;
    for (; c + 8 <= D; c += 8) V8<E>::store(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), inv));
    if (c < D) store_tail<E>(dst + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), inv), D - c);
    if (a.lse)
      a.lse[it.b * a.l_sb + h * a.l_sh + i * a.l_ss] =
          l > 0.0f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
  }

  // Scalar fallback: one row at a time, online softmax over single keys.
  // O (o: D doubles of the thread's scratch) and l in fp64 as the dot: one key at a time they
  // are sums over every key of the row (fp32 had 4-8x torch's error at 2-4K keys).
  static void item_scalar(const PrefillArgs& a, const PrefillItem& it, double* o) {
    int64_t qs, qlen, ks, klen;
    seq_range(a.cu_q, a.sq, it.b, qs, qlen);
    seq_range(a.cu_k, a.sk, it.b, ks, klen);
    const int64_t D = a.d, nq = it.i1 - it.i0, diag = klen - qlen;
    for (int64_t r = 0; r < (it.g1 - it.g0) * nq; ++r) {
      const int64_t h = it.kvh * a.group + it.g0 + r / nq, i = it.i0 + r % nq;
      const T* qp = static_cast<const T*>(a.q) + it.b * a.q_sb + h * a.q_sh + (qs + i) * a.q_ss;
      const int64_t hi = a.causal ? std::clamp<int64_t>(i + diag + 1, 0, klen) : klen;
      const int64_t lo = a.window > 0 ? std::clamp<int64_t>(i + diag - a.window + 1, 0, klen) : 0;
      std::fill(o, o + D, 0.0);
      float m = -std::numeric_limits<float>::infinity();
      double l = 0.0;
      for (int64_t j = lo; j < hi; ++j) {
        const T* kp = static_cast<const T*>(a.k) + it.b * a.k_sb + it.kvh * a.k_sh + (ks + j) * a.k_ss;
        const T* vp = static_cast<const T*>(a.v) + it.b * a.v_sb + it.kvh * a.v_sh + (ks + j) * a.v_ss;
        double dot = 0.0;  // serial sums: fp64 keeps the fallback within the tolerance rule
        for (int64_t c = 0; c < D; ++c) dot += double(E::load(qp + c)) * E::load(kp + c);
        float score = float(dot * a.scale);
        if (a.softcap > 0.0f) score = a.softcap * std::tanh(score / a.softcap);
        const float m_new = std::max(m, score);
        const float m_safe = m_new == -std::numeric_limits<float>::infinity() ? 0.0f : m_new;
        const double alpha = std::exp(m - m_safe), p = std::exp(score - m_safe);
        for (int64_t c = 0; c < D; ++c) o[c] = o[c] * alpha + p * E::load(vp + c);
        l = l * alpha + p;
        m = m_new;
      }
      T* dst = static_cast<T*>(a.out) + it.b * a.o_sb + h * a.o_sh + (qs + i) * a.o_ss;
      const double inv = l > 0.0 ? 1.0 / l : 0.0;
      for (int64_t c = 0; c < D; ++c) E::store(dst + c, float(o[c] * inv));
      if (a.lse)
        a.lse[it.b * a.l_sb + h * a.l_sh + (qs + i) * a.l_ss] =
            l > 0.0 ? float(m + std::log(l)) : -std::numeric_limits<float>::infinity();
    }
  }

  static void run(const PrefillArgs& a, const std::vector<PrefillItem>& items, Isa isa, int num_threads) {
    const int64_t n_items = int64_t(items.size()), dp = (a.d + 7) & ~int64_t(7);
    const bool wide = isa == Isa::kAvx2 && dp % 16 == 0 && avx512_kernels();
#pragma omp parallel num_threads(std::max(1, num_threads)) if (n_items > 1)
    {
      if (isa == Isa::kAvx2) {  // every thread takes the same branch
        PrefillScratch w(dp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < n_items; ++n) item_avx2(a, items[size_t(n)], w, wide);
      } else {
        std::vector<double> o(size_t(a.d));
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < n_items; ++n) item_scalar(a, items[size_t(n)], o.data());
      }
    }
  }
};

}  // namespace

void attention(std::uintptr_t out, int64_t o_sb, int64_t o_sh, int64_t o_ss,  //
               std::uintptr_t lse, int64_t l_sb, int64_t l_sh, int64_t l_ss,   //
               std::uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_ss,     //
               std::uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_ss,     //
               std::uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_ss,     //
               std::uintptr_t cu_seqlens_q, std::uintptr_t cu_seqlens_k, int64_t batch, int64_t seqlen_q,
               int64_t seqlen_k, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, bool causal,
               double scale, double softcap, int64_t window, int dtype, int num_threads) {
  const std::string p = "attention: ";
  RINGFUSE_CHECK(batch >= 0 && seqlen_q >= 0 && seqlen_k >= 0, p + "negative batch or sequence length");
  RINGFUSE_CHECK(num_kv_heads >= 1 && num_q_heads >= 1 && num_q_heads % num_kv_heads == 0,
                 p + "num_q_heads must be a positive multiple of num_kv_heads");
  RINGFUSE_CHECK(head_dim >= 1 && head_dim <= 256, p + "head_dim must be in [1, 256], got " + std::to_string(head_dim));
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "dtype must be float32, float16 or bfloat16");
  RINGFUSE_CHECK(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0.0, p + "scale and softcap must be finite (softcap >= 0)");
  RINGFUSE_CHECK((cu_seqlens_q == 0) == (cu_seqlens_k == 0), p + "cu_seqlens_q and cu_seqlens_k come together");
  RINGFUSE_CHECK(window >= 0 && (window == 0 || causal),
                 p + "window must be >= 0 (0: none) and needs causal, got " + std::to_string(window));
  if (batch == 0 || seqlen_q == 0) return;
  RINGFUSE_CHECK(out && q && (seqlen_k == 0 || (k && v)), p + "null pointer");
  const auto* cu_q = reinterpret_cast<const int32_t*>(cu_seqlens_q);
  const auto* cu_k = reinterpret_cast<const int32_t*>(cu_seqlens_k);
  if (cu_q) {  // varlen: seqlen_q / seqlen_k are the total rows; every range must lie inside
    for (const auto& [cu, total, name] : {std::tuple{cu_q, seqlen_q, "cu_seqlens_q"}, std::tuple{cu_k, seqlen_k, "cu_seqlens_k"}}) {
      RINGFUSE_CHECK(cu[0] == 0, p + name + "[0] must be 0, got " + std::to_string(cu[0]));
      for (int64_t b = 0; b < batch; ++b)
        RINGFUSE_CHECK(cu[b + 1] >= cu[b] && cu[b + 1] <= total,
                       p + name + " must be non-decreasing and end at most at " + std::to_string(total) + ", got " +
                           name + "[" + std::to_string(b + 1) + "] = " + std::to_string(cu[b + 1]));
    }
  }
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t heads_per_item = std::min<int64_t>(group, 8);
  int64_t pow2 = 1;
  while (pow2 < heads_per_item) pow2 *= 2;
  const int64_t tile_q = kMaxRows / pow2;  // 64, 32, 16, 16, 8...: rows = heads x tile_q <= 64
  PrefillArgs a{reinterpret_cast<void*>(out), o_sb, o_sh, o_ss, reinterpret_cast<float*>(lse), l_sb, l_sh, l_ss,
                reinterpret_cast<const void*>(q), q_sb, q_sh, q_ss, reinterpret_cast<const void*>(k), k_sb, k_sh,
                k_ss, reinterpret_cast<const void*>(v), v_sb, v_sh, v_ss, cu_q, cu_k, batch, seqlen_q, seqlen_k,
                num_q_heads, num_kv_heads, head_dim, group, causal, float(scale), float(softcap), window};
  // Items in decreasing query order: with causal masking the last query tiles have the
  // most keys, so they start first and the dynamic schedule fills in with short ones.
  std::vector<PrefillItem> items;
  int64_t max_q = 0;
  for (int64_t b = 0; b < batch; ++b) max_q = std::max<int64_t>(max_q, cu_q ? cu_q[b + 1] - cu_q[b] : seqlen_q);
  for (int64_t i0 = (max_q - 1) / tile_q * tile_q; i0 >= 0; i0 -= tile_q)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t qlen = cu_q ? cu_q[b + 1] - cu_q[b] : seqlen_q;
      if (i0 >= qlen) continue;
      for (int64_t kvh = 0; kvh < num_kv_heads; ++kvh)
        for (int64_t g0 = 0; g0 < group; g0 += heads_per_item)
          items.push_back({b, kvh, g0, std::min(group, g0 + heads_per_item), i0, std::min(qlen, i0 + tile_q)});
    }
  if (amx_prefill_takes(a, dtype)) return amx_prefill(a, items, num_threads);
  const Isa isa = active_isa();
  switch (dtype) {
    case kFloat16: PrefillKernel<F16>::run(a, items, isa, num_threads); break;
    case kBFloat16: PrefillKernel<BF16>::run(a, items, isa, num_threads); break;
    default: PrefillKernel<F32>::run(a, items, isa, num_threads); break;
  }
}

// write_kv: copy new K/V rows into cache slots. Sequential in token order on purpose: the
// bytes are small (prefill of 2048 tokens x 3 kv heads x 64 x bf16 x 2 = 1.5 MB, ~0.1 ms),
// and a slot named twice then deterministically holds the last token's row.
void write_kv(std::uintptr_t k_cache, int64_t kc_sblk, int64_t kc_sh, int64_t kc_spos,  //
              std::uintptr_t v_cache, int64_t vc_sblk, int64_t vc_sh, int64_t vc_spos,  //
              std::uintptr_t k, int64_t k_st, int64_t k_sh, std::uintptr_t v, int64_t v_st, int64_t v_sh,
              std::uintptr_t slot_mapping, int64_t tokens, int64_t num_kv_heads, int64_t head_dim,
              int64_t num_blocks, int64_t block_size, int dtype) {
  const std::string p = "write_kv: ";
  RINGFUSE_CHECK(tokens >= 0 && num_kv_heads >= 1 && head_dim >= 1 && num_blocks >= 1 && block_size >= 1,
                 p + "bad sizes");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "dtype must be float32, float16 or bfloat16");
  if (tokens == 0) return;
  RINGFUSE_CHECK(k_cache && v_cache && k && v && slot_mapping, p + "null pointer");
  const auto* slots = reinterpret_cast<const int64_t*>(slot_mapping);
  const int64_t capacity = num_blocks * block_size;
  for (int64_t t = 0; t < tokens; ++t)  // every slot checked before any byte is written
    RINGFUSE_CHECK(slots[t] >= -1 && slots[t] < capacity,
                   p + "slot_mapping[" + std::to_string(t) + "] = " + std::to_string(slots[t]) +
                       " outside [-1, " + std::to_string(capacity) + ") (-1 skips a token)");
  const int64_t esize = dtype == kFloat32 ? 4 : 2, row_bytes = head_dim * esize;
  auto* kc = reinterpret_cast<char*>(k_cache);
  auto* vc = reinterpret_cast<char*>(v_cache);
  const auto* kp = reinterpret_cast<const char*>(k);
  const auto* vp = reinterpret_cast<const char*>(v);
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    const int64_t blk = slots[t] / block_size, pos = slots[t] % block_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(kc + (blk * kc_sblk + h * kc_sh + pos * kc_spos) * esize, kp + (t * k_st + h * k_sh) * esize, size_t(row_bytes));
      std::memcpy(vc + (blk * vc_sblk + h * vc_sh + pos * vc_spos) * esize, vp + (t * v_st + h * v_sh) * esize, size_t(row_bytes));
    }
  }
}

}  // namespace ringfuse::cpu
