// Decode attention on CPU (flash-decoding): one new query token per sequence attends over
// its KV cache, contiguous or paged, split along the KV length so a long context keeps
// both cores busy, with a deterministic merge of the splits.
//
// Work item = (sequence b, kv head, group of <= 8 query heads sharing it (GQA), split).
// A split walks its keys in tiles of 32: scores = (q * scale) . k for every query of the
// group (each key row is converted to fp32 once and reused by the whole group), an online
// softmax update per tile (vectorized exp), then acc += p * v. Partials (max, sum, acc) go
// to scratch; the merge combines the splits of each (b, query head) in split order, so
// results are bitwise identical run to run, whatever the thread count, and between the
// contiguous and the paged layout of the same data (splits depend on the length only).
//
// Napkin math: B = 1, Hkv = 3, D = 64, L = 8192, fp32: K + V = 12.6 MB read once, ~0.55 ms
// at 23 GB/s; flops 4 * Hq * L * D = 19 MFLOP, ~0.1 ms at the FMA peak: memory-bound,
// provided exp is vectorized (a scalar exp per score would cost more than the reads).
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

constexpr int kMaxGroup = 8;  // query heads per work item
constexpr int kTile = 32;     // keys per softmax update

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
  int64_t split_size, max_splits;
  float* part_m;    // [B, Hq, max_splits]
  float* part_l;    // [B, Hq, max_splits]
  float* part_acc;  // [B, Hq, max_splits, D]
};

struct Item {
  int64_t b, kvh, g0, g1, split;
};

// exp(x) for 8 lanes: Cephes-style range reduction x = n ln2 + r, degree-6 polynomial for
// exp(r) on [-ln2/2, ln2/2], 2^n through the exponent bits. Max relative error ~2 ulp;
// inputs below -87.3 give 0 (as the softmax wants for far-below-max scores).
RF_AVX2 RF_INLINE __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
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
      const T* kb = static_cast<const T*>(a.k) + blk * a.k_sblk + h * a.k_sh;
      const T* vb = static_cast<const T*>(a.v) + blk * a.v_sblk + h * a.v_sh;
      for (; t < n && pos < a.block_size; ++t, ++pos) {
        krow[t] = kb + pos * a.k_spos;
        vrow[t] = vb + pos * a.v_spos;
      }
      pos = 0;
      ++logical;
    }
  }

  // One work item with AVX2: keys [j0, j1) of sequence it.b, query heads [g0, g1) of kv head.
  static RF_AVX2 void split_avx2(const DecodeArgs& a, const Item& it, int64_t j0, int64_t j1) {
    const int64_t D = a.d, G = it.g1 - it.g0, Dv = D & ~int64_t(7);
    const int64_t h0 = it.kvh * a.group + it.g0;  // first query head of the item
    // q * scale in fp32, zero-padded to a multiple of 8
    const int64_t Dp = (D + 7) & ~int64_t(7);
    float qf[kMaxGroup][256 + 8];
    float kf[256 + 8];
    for (int64_t g = 0; g < G; ++g) {
      const T* qp = static_cast<const T*>(a.q) + it.b * a.q_sb + (h0 + g) * a.q_sh;
      for (int64_t i = 0; i < D; ++i) qf[g][i] = E::load(qp + i) * a.scale;
      for (int64_t i = D; i < Dp; ++i) qf[g][i] = 0.0f;
    }
    float* acc[kMaxGroup];
    float m[kMaxGroup], l[kMaxGroup];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t slot = ((it.b * a.hq) + h0 + g) * a.max_splits + it.split;
      acc[g] = a.part_acc + slot * D;
      std::fill(acc[g], acc[g] + D, 0.0f);
      m[g] = -std::numeric_limits<float>::infinity();
      l[g] = 0.0f;
    }
    alignas(32) float s[kMaxGroup][kTile];
    const T* krow[kTile];
    const T* vrow[kTile];
    for (int64_t t0 = j0; t0 < j1; t0 += kTile) {
      const int64_t nt = std::min<int64_t>(kTile, j1 - t0);
      tile_rows(a, it.b, it.kvh, t0, nt, krow, vrow);
      // scores of the tile: each key row converted to fp32 once for the whole group
      for (int64_t t = 0; t < nt; ++t) {
        // fp32 rows of a multiple of 8 are read in place; others are converted once
        const float* kr = kf;
        if constexpr (E::code == kFloat32) {
          if (Dv == D) kr = reinterpret_cast<const float*>(krow[t]);
        }
        if (kr == kf) {
          int64_t i = 0;
          for (; i < Dv; i += 8) _mm256_storeu_ps(kf + i, V8<E>::load(krow[t] + i));
          if (i < D) _mm256_storeu_ps(kf + i, load_tail<E>(krow[t] + i, D - i));
        }
        for (int64_t g = 0; g < G; ++g) {
          __m256 d0 = _mm256_setzero_ps(), d1 = d0;
          int64_t c = 0;
          for (; c + 16 <= Dp; c += 16) {
            d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[g] + c), _mm256_loadu_ps(kr + c), d0);
            d1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[g] + c + 8), _mm256_loadu_ps(kr + c + 8), d1);
          }
          if (c < Dp) d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf[g] + c), _mm256_loadu_ps(kr + c), d0);
          float score = hsum(_mm256_add_ps(d0, d1));
          if (a.softcap > 0.0f) score = a.softcap * std::tanh(score / a.softcap);
          s[g][t] = score;
        }
      }
      // online softmax update per query: p = exp(s - m_new), rescale the running sums
      for (int64_t g = 0; g < G; ++g) {
        float tile_max = s[g][0];
        for (int64_t t = 1; t < nt; ++t) tile_max = std::max(tile_max, s[g][t]);
        const float m_new = std::max(m[g], tile_max);
        const float alpha = std::exp(m[g] - m_new);  // 0 on the first tile (m = -inf)
        const __m256 vm = _mm256_set1_ps(m_new);
        __m256 psum = _mm256_setzero_ps();
        for (int64_t t = 0; t < kTile; t += 8) {
          __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(s[g] + t), vm));
          if (t + 8 > nt) {  // lanes past the tile's end contribute nothing
            const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(int(t)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            p = _mm256_and_ps(p, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(nt)), lane)));
          }
          _mm256_store_ps(s[g] + t, p);
          psum = _mm256_add_ps(psum, p);
        }
        l[g] = l[g] * alpha + hsum(psum);
        m[g] = m_new;
        if (alpha != 1.0f) {
          const __m256 va = _mm256_set1_ps(alpha);
          for (int64_t i = 0; i < Dv; i += 8) _mm256_storeu_ps(acc[g] + i, _mm256_mul_ps(_mm256_loadu_ps(acc[g] + i), va));
          for (int64_t i = Dv; i < D; ++i) acc[g][i] *= alpha;
        }
      }
      // acc += p * v: per 8 columns, the group's accumulators stay in registers over the tile
      for (int64_t c = 0; c < Dp; c += 8) {
        const int64_t n = std::min<int64_t>(8, D - c);
        __m256 accv[kMaxGroup];
        for (int64_t g = 0; g < G; ++g) accv[g] = n == 8 ? _mm256_loadu_ps(acc[g] + c) : load_tail<F32>(acc[g] + c, n);
        for (int64_t t = 0; t < nt; ++t) {
          const __m256 vv = n == 8 ? V8<E>::load(vrow[t] + c) : load_tail<E>(vrow[t] + c, n);
          for (int64_t g = 0; g < G; ++g) accv[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(&s[g][t]), vv, accv[g]);
        }
        for (int64_t g = 0; g < G; ++g) {
          if (n == 8)
            _mm256_storeu_ps(acc[g] + c, accv[g]);
          else
            store_tail<F32>(acc[g] + c, accv[g], n);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t slot = ((it.b * a.hq) + h0 + g) * a.max_splits + it.split;
      a.part_m[slot] = m[g];
      a.part_l[slot] = l[g];
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
    for (int64_t i = 0; i < a.d; ++i) {
      float num = 0.0f;
      for (int64_t s = 0; s < nsplit; ++s) num += a.part_acc[(base + s) * a.d + i] * w[s];
      E::store(op + i, num * inv);
    }
  }

  static void run(const DecodeArgs& a, const std::vector<Item>& items, const std::vector<int64_t>& nsplits,
                  Isa isa, int num_threads) {
    const int64_t n_items = int64_t(items.size());
    const int threads = std::max(1, num_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (n_items > 1)
    for (int64_t n = 0; n < n_items; ++n) {
      const Item& it = items[size_t(n)];
      const int64_t j0 = it.split * a.split_size;
      const int64_t j1 = std::min<int64_t>(a.seq_lens[it.b], j0 + a.split_size);
      if (isa == Isa::kAvx2)
        split_avx2(a, it, j0, j1);
      else
        split_scalar(a, it, j0, j1);
    }
    const int64_t n_out = a.batch * a.hq;
#pragma omp parallel for schedule(static) num_threads(threads) if (n_out * a.d > 16384)
    for (int64_t n = 0; n < n_out; ++n) merge(a, n / a.hq, n % a.hq, nsplits[size_t(n / a.hq)]);
  }
};

}  // namespace

void decode_attention(std::uintptr_t out, int64_t out_sb, int64_t out_sh, std::uintptr_t q, int64_t q_sb,
                      int64_t q_sh, std::uintptr_t k, int64_t k_sblk, int64_t k_sh, int64_t k_spos,
                      std::uintptr_t v, int64_t v_sblk, int64_t v_sh, int64_t v_spos,
                      std::uintptr_t block_table, int64_t bt_stride, int64_t max_blocks, int64_t block_size,
                      int64_t num_blocks, std::uintptr_t seq_lens, int64_t batch, int64_t num_q_heads,
                      int64_t num_kv_heads, int64_t head_dim, double scale, double softcap, int dtype,
                      int64_t split_size, int num_threads) {
  const std::string p = "decode_attention: ";
  RINGFUSE_CHECK(batch >= 0 && num_kv_heads >= 1 && num_q_heads >= 1, p + "bad batch / head counts");
  RINGFUSE_CHECK(num_q_heads % num_kv_heads == 0, p + "num_q_heads must be a multiple of num_kv_heads");
  RINGFUSE_CHECK(head_dim >= 1 && head_dim <= 256, p + "head_dim must be in [1, 256], got " + std::to_string(head_dim));
  RINGFUSE_CHECK(block_size >= 1 && max_blocks >= 1 && num_blocks >= 1, p + "bad cache geometry");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "dtype must be float32, float16 or bfloat16");
  RINGFUSE_CHECK(std::isfinite(scale) && std::isfinite(softcap) && softcap >= 0.0, p + "scale and softcap must be finite (softcap >= 0)");
  RINGFUSE_CHECK(split_size >= kTile && split_size % kTile == 0, p + "split_size must be a positive multiple of 32");
  if (batch == 0) return;
  RINGFUSE_CHECK(out && q && k && v && seq_lens, p + "null pointer");
  const auto* lens = reinterpret_cast<const int32_t*>(seq_lens);
  const auto* table = reinterpret_cast<const int32_t*>(block_table);
  const int64_t capacity = max_blocks * block_size;
  int64_t max_len = 0;
  // Validate every value that addresses memory before any is used (no throw inside OpenMP).
  for (int64_t b = 0; b < batch; ++b) {
    RINGFUSE_CHECK(lens[b] >= 0 && lens[b] <= capacity,
                   p + "seq_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]) +
                       " outside [0, " + std::to_string(capacity) + "] (the cache's capacity)");
    max_len = std::max<int64_t>(max_len, lens[b]);
    if (table) {
      for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
        const int32_t blk = table[b * bt_stride + i];
        RINGFUSE_CHECK(blk >= 0 && blk < num_blocks,
                       p + "block_table[" + std::to_string(b) + ", " + std::to_string(i) + "] = " +
                           std::to_string(blk) + " outside [0, " + std::to_string(num_blocks) + ")");
      }
    } else {
      RINGFUSE_CHECK(b < num_blocks, p + "contiguous cache has fewer sequences than the batch");
    }
  }
  // at most 64 splits per sequence (the merge's weight buffer), at least split_size keys each
  while ((max_len + split_size - 1) / split_size > 64) split_size *= 2;
  const int64_t max_splits = std::max<int64_t>(1, (max_len + split_size - 1) / split_size);
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t slots = batch * num_q_heads * max_splits;
  std::unique_ptr<float[]> part(new float[size_t(slots * (head_dim + 2))]);
  DecodeArgs a{reinterpret_cast<void*>(out), out_sb, out_sh, reinterpret_cast<const void*>(q), q_sb, q_sh,
               reinterpret_cast<const void*>(k), k_sblk, k_sh, k_spos, reinterpret_cast<const void*>(v),
               v_sblk, v_sh, v_spos, table, bt_stride, table ? block_size : capacity, lens, batch,
               num_q_heads, num_kv_heads, head_dim, group, float(scale), float(softcap), split_size,
               max_splits, part.get(), part.get() + slots, part.get() + 2 * slots};
  std::vector<Item> items;
  std::vector<int64_t> nsplits(size_t(batch), 0);
  for (int64_t b = 0; b < batch; ++b) {
    nsplits[size_t(b)] = (lens[b] + split_size - 1) / split_size;
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

}  // namespace ringfuse::cpu
