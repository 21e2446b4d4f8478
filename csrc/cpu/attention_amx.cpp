// Prefill attention for bf16 inputs on AMX tiles (Intel Sapphire Rapids and later): the
// AVX2 kernel's FlashAttention-2 loop (attention.cpp) with both products on the tile unit.
//
// Per work item (the same items as the AVX2 path: one sequence, one kv head, <= 8 of its
// query heads, a tile of queries; rows = heads x queries <= 64, padded to 16-row tiles),
// keys in tiles of 128:
//   S = Q K^T           2 x 2 blocks of 16 x 16 fp32 tiles, TDPBF16PS over 32 of D at a time
//   online softmax      per row on AVX-512: scale, softcap, causal / window masks, e^x as
//                       2^x, P rounded to bf16 (as FlashAttention does on GPUs), one pass
//   O = O * alpha + P V  2 x 2 blocks of O's tiles loaded, accumulated over 32 keys at a
//                       time, stored back; rows whose max did not move skip the rescale
// TDPBF16PS multiplies pairs of bf16 along the reduction dimension, so its B operand holds
// (k[j][2w], k[j][2w + 1]) side by side: K and V are repacked once per call (every query
// tile of a kv head reads the same keys), K as [16-key block][D / 2][16][2] and V as
// [key pair][D][2], zero-padded at the end of each sequence. That copy is the path's extra
// memory (the size of K and V in bf16); Q tiles load from a per-item copy of the rows.
//
// Napkin math, (Hq, Hkv, D) = (32, 8, 128), Sq = Sk = 2048, causal: 4 x 32 x 2048^2 / 2 x
// 128 = 34 GFLOP. One tile product is 16 x 16 x 32 = 8192 MACs in 16 cycles (512 MAC/cycle
// per core): ~33 M cycles for both products over 2 cores, ~6 ms at ~2.7 GHz. The softmax
// (~36 M scores per core at ~15 AVX-512 instructions per 16) is of the same order, and so
// is the O traffic. Measured on a 2-core SPR VM (2026-12-06): 39 ms, 0.88 TFLOP/s (the AVX2
// kernel: ~140 GFLOP/s). Parts timed by leaving the others out, before the base-2 softmax:
// 3 ms of packing and item set-up, 8 ms of S, 9 ms of P V, 20 ms of softmax.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/attention_prefill.h"

namespace ringfuse::cpu {

#ifdef RINGFUSE_HAVE_AMX

// the vector parts of the path (every AMX-BF16 CPU has AVX-512 BF16); the tile instructions are
// inline asm (below)
#define RF_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))

// Tile instructions as our own asm: GCC's _tile_* macros declare no memory operands (the
// compiler then drops the stores that fill a tile config and may move the stores of S and
// P across the loads that read them), so each of these clobbers memory, and ldtilecfg
// names the whole 64-byte config. AT&T operand order: tdpbf16ps b, a, c is c += a b.
#define RF_TILE_LOAD(t, base, stride_bytes) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(int64_t(stride_bytes)) : "memory")
#define RF_TILE_STORE(t, base, stride_bytes) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(int64_t(stride_bytes)) : "memory")
#define RF_TILE_DPBF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define RF_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)

namespace {

constexpr int64_t kTileRows = 16;  // every tile is 16 rows x 64 bytes (32 bf16 / 16 fp32)
// Keys per softmax update: each row's update has a fixed cost (two reductions, a scalar
// exp, the rescale of its O row) that 64 keys did not amortize (it took more time than the
// exps themselves); 128 keys keep S and P of a 64-row item (48 KiB) in L1 / L2.
constexpr int64_t kAmxKeys = 128;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-3: a 2 x 2 block of 16 x 16 fp32 accumulators (S or O); tmm4, tmm5: A operands of
// its two row tiles (Q or P); tmm6, tmm7: B operands of its two column tiles (K or V)
RF_AMX void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = kTileRows;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

RF_AMX void release_tiles() { __asm__ volatile("tilerelease" ::); }

// K and V of the whole call in the B-operand layouts (see the top of the file).
struct PackedKV {
  std::vector<uint16_t> k, v;
  std::vector<int64_t> base;  // per sequence: element offset of its kv head 0 in k and v
  std::vector<int64_t> keys;  // per sequence: keys per kv head, padded
  int64_t d = 0;

  int64_t offset(int64_t b, int64_t kvh) const { return base[size_t(b)] + kvh * keys[size_t(b)] * d; }
};

RF_INLINE uint32_t load_pair(const uint16_t* p) {  // two bf16, any 2-byte alignment
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

RF_AMX void pack_kv(const PrefillArgs& a, int64_t b, int64_t kvh, PackedKV& pk) {
  int64_t ks, klen;
  seq_range(a.cu_k, a.sk, b, ks, klen);
  const int64_t D = a.d, half = D / 2, padded = pk.keys[size_t(b)];
  const auto* k = static_cast<const uint16_t*>(a.k) + b * a.k_sb + kvh * a.k_sh + ks * a.k_ss;
  const auto* v = static_cast<const uint16_t*>(a.v) + b * a.v_sb + kvh * a.v_sh + ks * a.v_ss;
  auto* kp = reinterpret_cast<uint32_t*>(pk.k.data() + pk.offset(b, kvh));  // [padded / 16][D / 2][16] pairs
  uint16_t* vp = pk.v.data() + pk.offset(b, kvh);                            // [padded / 2][D][2]
  for (int64_t j = 0; j < padded; ++j) {
    uint32_t* dst = kp + (j / kTileRows) * half * kTileRows + j % kTileRows;
    const uint16_t* src = k + j * a.k_ss;
    for (int64_t w = 0; w < half; ++w) dst[w * kTileRows] = j < klen ? load_pair(src + 2 * w) : 0u;
  }
  for (int64_t j = 0; j < padded; j += 2, vp += 2 * D) {
    if (j + 1 < klen) {  // interleave rows j and j + 1, 16 columns at a time
      const uint16_t *r0 = v + j * a.v_ss, *r1 = r0 + a.v_ss;
      for (int64_t c = 0; c < D; c += 16) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c));
        const __m256i lo = _mm256_unpacklo_epi16(x, y), hi = _mm256_unpackhi_epi16(x, y);  // per 128-bit lane
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + 2 * c), _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(vp + 2 * c + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
      }
    } else {
      for (int64_t c = 0; c < D; ++c) {
        vp[2 * c] = j < klen ? v[j * a.v_ss + c] : 0;
        vp[2 * c + 1] = 0;
      }
    }
  }
}

// Per-thread item scratch, in a buffer each (OpenMP) thread keeps between calls.
struct AmxScratch {
  uint16_t *q, *p;  // [kMaxRows][D], [kMaxRows][kAmxKeys] bf16
  float *s, *o;     // [kMaxRows][kAmxKeys], [kMaxRows][D] fp32
  float m[kMaxRows], l[kMaxRows], alpha[kMaxRows];
  explicit AmxScratch(int64_t D) {
    thread_local std::vector<char> buf;
    const size_t bytes = size_t(kMaxRows * (D * 2 + kAmxKeys * 2 + kAmxKeys * 4 + D * 4) + 64);
    if (buf.size() < bytes) buf.resize(bytes);
    char* base = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
    q = reinterpret_cast<uint16_t*>(base);
    p = q + kMaxRows * D;
    s = reinterpret_cast<float*>(p + kMaxRows * kAmxKeys);
    o = s + kMaxRows * kAmxKeys;
  }
};

// 2^x for the lanes of `keep` where x >= -126 (0 in the others; NaN stays NaN): round to
// n, 2^(x - n) by its degree-5 Taylor polynomial (|x - n| <= 1/2: relative error 2.4e-6,
// far below P's bf16 rounding), scaled by 2^n. Base 2, so that the softmax folds log2(e)
// into its scale and needs no two-step range reduction; the masks fold into the last op.
RF_AMX RF_INLINE __m512 exp2_masked(__mmask16 keep, __m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __mmask16 live = _mm512_mask_cmp_ps_mask(keep, x, lo, _CMP_NLT_UQ);  // x >= -126 or NaN
  x = _mm512_max_ps(lo, x);  // operand order keeps NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(1.3333558e-3f);                   // ln2^5 / 5!
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.6181291e-3f));   // ln2^4 / 4!
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.5504109e-2f));   // ln2^3 / 3!
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4022651e-1f));   // ln2^2 / 2!
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.9314718e-1f));   // ln2
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, y, n);
}

// Lanes [lo, hi) of a 16-lane chunk (lo, hi in [0, 16]).
RF_INLINE __mmask16 lane_range(int64_t lo, int64_t hi) {
  return __mmask16(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// One row's online-softmax update over a tile of raw scores s (q . k, unscaled): keys
// [first, valid) count, columns [0, 16 chunks) are written. Writes p = e^(scale s - m) to
// pb as bf16 (0 where masked) and the factor alpha that rescales the row's previous O and l.
RF_AMX void softmax_row(float* s, uint16_t* pb, int64_t first, int64_t valid, int64_t chunks, float scale,
                        float softcap, float& m, float& l, float& alpha) {
  if (valid <= first) {
    std::memset(pb, 0, size_t(chunks) * 16 * sizeof(uint16_t));
    alpha = 1.0f;
    return;
  }
  auto keep = [&](int64_t c) -> __mmask16 {
    if (16 * c >= first && 16 * c + 16 <= valid) return 0xffff;
    return lane_range(std::clamp<int64_t>(first - 16 * c, 0, 16), std::clamp<int64_t>(valid - 16 * c, 0, 16));
  };
  if (softcap > 0.0f) {  // s <- softcap tanh(scale s / softcap), with the AVX2 path's tanh8 (accurate near 0)
    const __m256 cap = _mm256_set1_ps(softcap), inv = _mm256_set1_ps(scale / softcap);
    for (int64_t c = 0; c < 2 * chunks; ++c)
      _mm256_storeu_ps(s + 8 * c, _mm256_mul_ps(cap, tanh8(_mm256_mul_ps(_mm256_loadu_ps(s + 8 * c), inv))));
    scale = 1.0f;
  }
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = first / 16; c * 16 < valid; ++c) vmax = _mm512_mask_max_ps(vmax, keep(c), vmax, _mm512_loadu_ps(s + 16 * c));
  // scale > 0, and rounding is monotonic: max(scale s) = scale max(s)
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax) * scale);
  // all scores -inf so far (infinite inputs): keep p = 0 and the row unchanged, not NaN
  const float m_safe = m_new == -std::numeric_limits<float>::infinity() ? 0.0f : m_new;
  alpha = std::exp(m - m_safe);
  // p = e^(scale s - m) = 2^(scale log2(e) s - log2(e) m)
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 vm = _mm512_set1_ps(m_safe * kLog2e), vs = _mm512_set1_ps(scale * kLog2e);
  __m512 psum = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m512 p = exp2_masked(keep(c), _mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * c), vs, vm));
    psum = _mm512_add_ps(psum, p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + 16 * c), (__m256i)_mm512_cvtneps_pbh(p));  // RNE
  }
  l = l * alpha + _mm512_reduce_add_ps(psum);
  m = m_new;
}

RF_AMX void run_item(const PrefillArgs& a, const PrefillItem& it, const PackedKV& pk, AmxScratch& w) {
  int64_t qs, qlen, ks, klen;
  seq_range(a.cu_q, a.sq, it.b, qs, qlen);
  seq_range(a.cu_k, a.sk, it.b, ks, klen);
  const int64_t D = a.d, nq = it.i1 - it.i0, rows = (it.g1 - it.g0) * nq;
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows, padded_rows = row_tiles * kTileRows;
  const int64_t h0 = it.kvh * a.group + it.g0, diag = klen - qlen;  // query i sees key j iff j <= i + diag
  const auto* qb = static_cast<const uint16_t*>(a.q) + it.b * a.q_sb + h0 * a.q_sh + (qs + it.i0) * a.q_ss;
  for (int64_t r = 0; r < rows; ++r) {  // row r = (head r / nq, query it.i0 + r % nq)
    std::memcpy(w.q + r * D, qb + (r / nq) * a.q_sh + (r % nq) * a.q_ss, size_t(D) * 2);
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.0f;
  }
  std::memset(w.q + rows * D, 0, size_t((padded_rows - rows) * D) * 2);
  std::memset(w.o, 0, size_t(padded_rows * D) * 4);
  int64_t lo, hi;
  item_keys(a, it, klen, diag, lo, hi);
  const uint16_t* kp = pk.k.data() + pk.offset(it.b, it.kvh);
  const uint16_t* vp = pk.v.data() + pk.offset(it.b, it.kvh);
  const int64_t q_ld = D * 2, o_ld = D * 4, v_ld = D * 4;  // row strides in bytes
  // tiles start at multiples of 16 keys (K's blocks); keys before lo are masked per row
  for (int64_t j0 = lo & ~(kTileRows - 1); j0 < hi; j0 += kAmxKeys) {
    const int64_t nk = std::min(kAmxKeys, hi - j0), key_tiles = (nk + 15) / 16, pair_chunks = (nk + 31) / 32;
    // S = Q K^T in 2 x 2 blocks of 16 x 16 tiles (an odd last row / key tile is computed on
    // spare scratch rows / the zero padding of K and never read)
    for (int64_t rt = 0; rt < row_tiles; rt += 2) {
      for (int64_t kt = 0; kt < key_tiles; kt += 2) {
        const uint16_t* kblock = kp + (j0 / kTileRows + kt) * kTileRows * D;  // [D / 2][16][2] per 16 keys
        RF_TILE_ZERO(0);
        RF_TILE_ZERO(1);
        RF_TILE_ZERO(2);
        RF_TILE_ZERO(3);
        for (int64_t c = 0; c < D; c += 32) {
          RF_TILE_LOAD(4, w.q + rt * kTileRows * D + c, q_ld);
          RF_TILE_LOAD(5, w.q + (rt + 1) * kTileRows * D + c, q_ld);
          RF_TILE_LOAD(6, kblock + c * kTileRows, 64);
          RF_TILE_LOAD(7, kblock + kTileRows * D + c * kTileRows, 64);
          RF_TILE_DPBF16(0, 4, 6);
          RF_TILE_DPBF16(1, 4, 7);
          RF_TILE_DPBF16(2, 5, 6);
          RF_TILE_DPBF16(3, 5, 7);
        }
        float* st = w.s + rt * kTileRows * kAmxKeys + kt * 16;
        RF_TILE_STORE(0, st, kAmxKeys * 4);
        RF_TILE_STORE(1, st + 16, kAmxKeys * 4);
        RF_TILE_STORE(2, st + kTileRows * kAmxKeys, kAmxKeys * 4);
        RF_TILE_STORE(3, st + kTileRows * kAmxKeys + 16, kAmxKeys * 4);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      int64_t first, valid;
      row_keys(a, it.i0 + r % nq, diag, j0, nk, first, valid);
      softmax_row(w.s + r * kAmxKeys, w.p + r * kAmxKeys, first, valid, 2 * pair_chunks, a.scale, a.softcap, w.m[r],
                  w.l[r], w.alpha[r]);
      if (w.alpha[r] != 1.0f) {
        const __m512 al = _mm512_set1_ps(w.alpha[r]);
        for (float* o = w.o + r * D; o < w.o + (r + 1) * D; o += 16) _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), al));
      }
    }
    // O += P V in 2 x 2 blocks (rows x 16 columns of D), over the tile's keys 32 at a time
    const uint16_t* vpair = vp + (j0 / 2) * 2 * D;  // [key pair][D][2] from key j0
    for (int64_t rt = 0; rt < row_tiles; rt += 2) {
      for (int64_t c = 0; c < D; c += 32) {
        float* o = w.o + rt * kTileRows * D + c;
        RF_TILE_LOAD(0, o, o_ld);
        RF_TILE_LOAD(1, o + 16, o_ld);
        RF_TILE_LOAD(2, o + kTileRows * D, o_ld);
        RF_TILE_LOAD(3, o + kTileRows * D + 16, o_ld);
        for (int64_t pc = 0; pc < pair_chunks; ++pc) {
          const uint16_t* pt = w.p + rt * kTileRows * kAmxKeys + 32 * pc;
          const uint16_t* vt = vpair + pc * 16 * 2 * D + 2 * c;  // keys j0 + 32 pc ...
          RF_TILE_LOAD(4, pt, kAmxKeys * 2);
          RF_TILE_LOAD(5, pt + kTileRows * kAmxKeys, kAmxKeys * 2);
          RF_TILE_LOAD(6, vt, v_ld);
          RF_TILE_LOAD(7, vt + 32, v_ld);
          RF_TILE_DPBF16(0, 4, 6);
          RF_TILE_DPBF16(1, 4, 7);
          RF_TILE_DPBF16(2, 5, 6);
          RF_TILE_DPBF16(3, 5, 7);
        }
        RF_TILE_STORE(0, o, o_ld);
        RF_TILE_STORE(1, o + 16, o_ld);
        RF_TILE_STORE(2, o + kTileRows * D, o_ld);
        RF_TILE_STORE(3, o + kTileRows * D + 16, o_ld);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // out row = o / l (zeros when no key was visible)
    const int64_t h = h0 + r / nq, i = qs + it.i0 + r % nq;
    auto* dst = static_cast<uint16_t*>(a.out) + it.b * a.o_sb + h * a.o_sh + i * a.o_ss;
    const float m = w.m[r], l = w.l[r];
    const __m256 inv = _mm256_set1_ps(l > 0.0f ? 1.0f / l : 0.0f);
    for (int64_t c = 0; c < D; c += 8) V8<BF16>::store(dst + c, _mm256_mul_ps(_mm256_loadu_ps(w.o + r * D + c), inv));
    if (a.lse)
      a.lse[it.b * a.l_sb + h * a.l_sh + i * a.l_ss] = l > 0.0f ? m + std::log(l) : -std::numeric_limits<float>::infinity();
  }
}

}  // namespace

bool amx_prefill_takes(const PrefillArgs& a, int dtype) {
  return dtype == kBFloat16 && a.d % 32 == 0 && a.d <= 256 && a.scale > 0.0f && attention_use_amx();
}

void amx_prefill(const PrefillArgs& a, const std::vector<PrefillItem>& items, int num_threads) {
  // kept per calling thread: a fresh buffer each call cost its page faults and zero fill
  // (every element is written by pack_kv, padding included)
  thread_local PackedKV kept;
  PackedKV& pk = kept;  // the caller's, shared with the team (kept names each thread's own)
  pk.d = a.d;
  pk.base.resize(size_t(a.batch));
  pk.keys.resize(size_t(a.batch));
  int64_t total = 0;
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t ks, klen;
    seq_range(a.cu_k, a.sk, b, ks, klen);
    // a tile starts at a multiple of 16 below klen and reads its keys rounded up to 32
    pk.keys[size_t(b)] = (klen + 15) / 16 * 16 + 16;
    pk.base[size_t(b)] = total;
    total += a.hkv * pk.keys[size_t(b)] * a.d;
  }
  if (pk.k.size() < size_t(total)) {
    pk.k.resize(size_t(total));
    pk.v.resize(size_t(total));
  }
  const int64_t n_heads = a.batch * a.hkv, n_items = int64_t(items.size());
  const int threads = std::max(1, num_threads);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t n = 0; n < n_heads; ++n) pack_kv(a, n / a.hkv, n % a.hkv, pk);
    AmxScratch w(a.d);
    configure_tiles();
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < n_items; ++n) run_item(a, items[size_t(n)], pk, w);
    release_tiles();
  }
  // keep up to 2 x 8 MiB for the next call (a 2k-token prompt of 8 kv heads x 128): larger
  // copies belong to prompts whose compute dwarfs their allocation
  if (pk.k.capacity() > (size_t(4) << 20)) {
    pk.k = {};
    pk.v = {};
  }
}

#else  // built without AMX support in the compiler

bool amx_prefill_takes(const PrefillArgs&, int) { return false; }

void amx_prefill(const PrefillArgs&, const std::vector<PrefillItem>&, int) {
  fail("attention: this build of ringfuse has no AMX kernels");
}

#endif

}  // namespace ringfuse::cpu
