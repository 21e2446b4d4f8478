// int8 on CPU: dynamic per-token quantization of activations, the W8A8 GEMM and the
// weight-only (W8A32) linear. AVX2 with a scalar fallback, OpenMP over rows / output tiles;
// the GEMM also has an AVX-512 VNNI kernel (gemm_vnni, below) taken where the host has it.
//
// AVX2 GEMM microkernel: per group of 4 k, a row's 4 int8 are broadcast
// to every int32 lane; vpmaddubsw takes unsigned x signed bytes, so the sign trick turns
// a . b into |a| . (b * sign(a)) (vpabsb / vpsignb), then vpmaddwd with ones widens the
// int16 pair sums to int32 and vpaddd accumulates: 4 instructions per 32 multiply-adds.
// Exact as long as b avoids -128: |a| <= 128 and |b| <= 127 keep each int16 pair sum
// <= 2 * 128 * 127 = 32512 (no saturation), and negating b cannot overflow. Symmetric
// weight quantization gives b in [-127, 127]; any other b takes an exact scalar path.
// Register block: 4 rows x 16 columns = 8 int32 accumulators. B is packed once into
// [16-column panel][k / 4][16][4] so each step loads 2 contiguous vectors.
// Loop order: each thread takes 16-column panels of B and walks all of A's 4-row blocks
// inside one, so the panel (16 x K bytes, 64 KB at K = 4096) stays in L2 while A (M x K)
// is re-read from L2/L3.
// Napkin math, M = 256, K = N = 4096: 4.3 G multiply-adds; at ~32 per cycle per core (two
// vpmaddubsw pipes) and 3 GHz, ~22 ms on 2 cores (measured: ~24 ms, 350 GOPS).
//
// Weight-only linear: per 8 weights, one widening load (vpmovsxbd), a convert and one FMA
// per row of x; at M = 1 it should stream the int8 weights at DRAM speed (4x fewer bytes
// than fp32 F.linear). Per-channel scales, M <= 16: linear.cpp's GEMV-style kernel (M = 1:
// one weight row after another; M > 1: blocks of 8 weight rows, next-block prefetch). With
// 8-row blocks at M = 1 too, against the 4-row kernel below it measured
// 1.2x / 1.35x / 1.7x faster at M = 1 / 4 / 8 over all of SmolLM2's linears (135 MB int8,
// M = 8 at ~150 GFLOP/s, near the 2-core FMA peak), and against wo_gemm at M = 12 / 16
// (Zen 5 VM, 2026-12-06; [1536, 576], [576, 1536], [4096, 4096]) 1.5-2.1x / 1.4-1.7x
// faster on the AVX2 path and 1.1-1.45x / 1.0-1.16x on the AVX-512 one (from M = 24 the
// AVX-512 GEMM wins; one bound for both levels keeps their bits equal). Group scales,
// M <= 4: wo_grouped. Larger M: wo_gemm, a blocked fp32 GEMM on dequantized panels.
//
// Napkin math: quantize_per_token reads x once from memory (the row stays in L1/L2 for its
// second pass) and writes 1 byte per element + 4 per row: for bf16 x, 3 bytes moved per
// element, memory-bound; 2 passes of ~3 vector instructions per 8 elements.
#include "cpu/int8_gemm.h"
#include "cpu/panel_gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/linear.h"
#include "cpu/vec.h"

namespace ringfuse::cpu {
namespace {

template <class E>
struct QuantizeKernel {
  using T = typename E::T;

  // round(v / s) clamped to [-127, 127] as int32; cvtps rounds half to even (the default
  // MXCSR mode), as torch.round does
  static RF_AVX2 RF_INLINE __m256i quant(__m256 vs, __m256 v) {
    const __m256 y = _mm256_div_ps(v, vs);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), y)));
  }

  // returns false (and writes q = 0, scale = NaN) when the row holds inf or NaN
  static RF_AVX2 bool row_avx2(int8_t* q, float* scale, const T* x, int64_t k) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    // maxps drops a NaN operand, so finiteness is tracked apart: x * 0 is 0 for finite x and
    // NaN for inf and NaN, and a NaN sticks in the sum
    __m256 vmax = _mm256_setzero_ps(), nonfinite = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i < k; i += 8) {
      const __m256 v = i + 8 <= k ? V8<E>::load(x + i) : load_tail<E>(x + i, k - i);
      vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, abs_mask));
      nonfinite = _mm256_add_ps(nonfinite, _mm256_mul_ps(v, _mm256_setzero_ps()));
    }
    if (hsum(nonfinite) != 0.0f) return fail(q, scale, k);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    float amax = 0.0f;
    for (float v : lanes) amax = std::max(amax, v);
    const float s = amax / 127.0f;
    *scale = s;
    if (amax == 0.0f) {
      std::fill(q, q + k, int8_t(0));
      return true;
    }
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    i = 0;
    for (; i + 32 <= k; i += 32) {  // 4 x 8 int32 -> 32 int8 in order
      const __m256i a = quant(vs, V8<E>::load(x + i)), b = quant(vs, V8<E>::load(x + i + 8));
      const __m256i c = quant(vs, V8<E>::load(x + i + 16)), d = quant(vs, V8<E>::load(x + i + 24));
      const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), _mm256_permutevar8x32_epi32(packed, order));
    }
    for (; i < k; ++i) q[i] = int8_t(std::nearbyint(std::min(127.0f, std::max(-127.0f, E::load(x + i) / s))));
    return true;
  }

  static bool fail(int8_t* q, float* scale, int64_t k) {
    std::fill(q, q + k, int8_t(0));
    *scale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }

  static bool row_scalar(int8_t* q, float* scale, const T* x, int64_t k) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) {
      const float v = E::load(x + i);
      if (!std::isfinite(v)) return fail(q, scale, k);
      amax = std::max(amax, std::fabs(v));
    }
    const float s = amax / 127.0f;
    *scale = s;
    for (int64_t i = 0; i < k; ++i)
      q[i] = amax == 0.0f ? int8_t(0) : int8_t(std::nearbyint(std::min(127.0f, std::max(-127.0f, E::load(x + i) / s))));
    return true;
  }

  static int64_t run(int8_t* q, int64_t q_stride, float* scale, const T* x, int64_t x_stride, int64_t rows,
                     int64_t k, Isa isa, int num_threads) {
    std::atomic<int64_t> bad{0};
    parallel_rows(rows, k, num_threads, [&](int64_t r0, int64_t r1) {
      int64_t local = 0;
      for (int64_t r = r0; r < r1; ++r) {
        const bool ok = isa == Isa::kAvx2 ? row_avx2(q + r * q_stride, scale + r, x + r * x_stride, k)
                                          : row_scalar(q + r * q_stride, scale + r, x + r * x_stride, k);
        local += ok ? 0 : 1;
      }
      bad += local;
    });
    return bad.load();
  }
};

}  // namespace

void quantize_per_token(std::uintptr_t q, int64_t q_stride, std::uintptr_t scale, std::uintptr_t x,
                        int64_t x_stride, int64_t rows, int64_t k, int dtype, int num_threads) {
  const std::string p = "quantize_per_token: ";
  RINGFUSE_CHECK(rows >= 0 && k >= 1, p + "rows must be >= 0 and k >= 1");
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16, p + "x must be float32, float16 or bfloat16");
  if (rows == 0) return;
  RINGFUSE_CHECK(q && scale && x, p + "null pointer");
  RINGFUSE_CHECK(q_stride >= k && x_stride >= k, p + "row strides must be >= k");
  const Isa isa = active_isa();
  auto* qp = reinterpret_cast<int8_t*>(q);
  auto* sp = reinterpret_cast<float*>(scale);
  int64_t bad = 0;
  switch (dtype) {
    case kFloat16: bad = QuantizeKernel<F16>::run(qp, q_stride, sp, reinterpret_cast<const uint16_t*>(x), x_stride, rows, k, isa, num_threads); break;
    case kBFloat16: bad = QuantizeKernel<BF16>::run(qp, q_stride, sp, reinterpret_cast<const uint16_t*>(x), x_stride, rows, k, isa, num_threads); break;
    default: bad = QuantizeKernel<F32>::run(qp, q_stride, sp, reinterpret_cast<const float*>(x), x_stride, rows, k, isa, num_threads); break;
  }
  RINGFUSE_CHECK(bad == 0, p + "x holds inf or NaN in " + std::to_string(bad) + " row(s); int8 cannot represent them");
}

namespace {

constexpr int64_t kPanel = 16;  // output columns per packed panel (2 vectors of 8 int32)
constexpr int kRows = 4;        // rows of A per register block

// acc[r][0..1] += a[r, 4g : 4g + 4] . panel group g (av: the 4 bytes of a in every lane)
template <int MR>
RF_AVX2 RF_INLINE void gemm_step(const __m256i av[MR], const int8_t* panel_group, __m256i acc[kRows][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel_group));
  const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel_group + 32));
  for (int r = 0; r < MR; ++r) {
    const __m256i au = _mm256_abs_epi8(av[r]);
    acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(b0, av[r])), ones));
    acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(b1, av[r])), ones));
  }
}

// acc = a[0 : MR, 0 : k] . panel for the whole K (groups of 4, the last one zero-padded)
template <int MR>
RF_AVX2 void gemm_block(const int8_t* a, int64_t a_stride, const int8_t* panel, int64_t k, __m256i acc[kRows][2]) {
  const int64_t full = k / 4;
  __m256i av[MR];
  for (int64_t g = 0; g < full; ++g) {
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * a_stride + 4 * g, 4);
      av[r] = _mm256_set1_epi32(word);
    }
    gemm_step<MR>(av, panel + g * 64, acc);
  }
  if (full * 4 < k) {  // tail group: the bytes past k are zero
    for (int r = 0; r < MR; ++r) {
      int32_t word = 0;
      std::memcpy(&word, a + r * a_stride + 4 * full, size_t(k - 4 * full));
      av[r] = _mm256_set1_epi32(word);
    }
    gemm_step<MR>(av, panel + full * 64, acc);
  }
}

struct GemmArgs {
  void* out;
  int64_t out_stride;
  int out_dtype;
  const int8_t* a;
  int64_t a_stride;
  const int8_t* packed;
  const float *a_scale, *b_scale, *bias;
  int64_t m, n, k;
};

void store_floats(const GemmArgs& g, int64_t r, int64_t n0, int64_t cols, const float* v);

// out row r, columns [n0, n0 + cols): raw int32 or the scaled epilogue
RF_AVX2 void store_row(const GemmArgs& g, int64_t r, int64_t n0, int64_t cols, const int32_t* acc) {
  if (g.out_dtype == kInt32) {
    std::memcpy(static_cast<int32_t*>(g.out) + r * g.out_stride + n0, acc, size_t(cols) * 4);
    return;
  }
  alignas(32) float v[kPanel];
  for (int64_t j = 0; j < cols; ++j)
    v[j] = float(acc[j]) * g.a_scale[r] * g.b_scale[n0 + j] + (g.bias ? g.bias[n0 + j] : 0.0f);
  store_floats(g, r, n0, cols, v);
}

// out[r, n0 : n0 + cols] = v in the output dtype
void store_floats(const GemmArgs& g, int64_t r, int64_t n0, int64_t cols, const float* v) {
  switch (g.out_dtype) {
    case kFloat32: std::memcpy(static_cast<float*>(g.out) + r * g.out_stride + n0, v, size_t(cols) * 4); break;
    case kBFloat16:
      for (int64_t j = 0; j < cols; ++j) BF16::store(static_cast<uint16_t*>(g.out) + r * g.out_stride + n0 + j, v[j]);
      break;
    default:
      for (int64_t j = 0; j < cols; ++j) F16::store(static_cast<uint16_t*>(g.out) + r * g.out_stride + n0 + j, v[j]);
      break;
  }
}

RF_AVX2 void gemm_avx2(const GemmArgs& g, int num_threads) {
  const int64_t panels = (g.n + kPanel - 1) / kPanel, kg = (g.k + 3) / 4;
  const int64_t mblocks = (g.m + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (panels * mblocks > 1 && g.m * g.n * g.k > (1 << 18))
  for (int64_t p = 0; p < panels; ++p) {
    const int8_t* panel = g.packed + p * kg * 64;
    const int64_t n0 = p * kPanel, cols = std::min(kPanel, g.n - n0);
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int64_t r0 = mb * kRows, rows = std::min<int64_t>(kRows, g.m - r0);
      __m256i acc[kRows][2];
      for (auto& row : acc) row[0] = row[1] = _mm256_setzero_si256();
      const int8_t* a = g.a + r0 * g.a_stride;
      switch (rows) {
        case 4: gemm_block<4>(a, g.a_stride, panel, g.k, acc); break;
        case 3: gemm_block<3>(a, g.a_stride, panel, g.k, acc); break;
        case 2: gemm_block<2>(a, g.a_stride, panel, g.k, acc); break;
        default: gemm_block<1>(a, g.a_stride, panel, g.k, acc); break;
      }
      alignas(32) int32_t lanes[kPanel];
      for (int64_t r = 0; r < rows; ++r) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[r][0]);
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8), acc[r][1]);
        store_row(g, r0 + r, n0, cols, lanes);
      }
    }
  }
}

// Exact for any int8 (b may hold -128) and the scalar ISA: int32 multiply-adds, OpenMP
// over rows. Slower; the fast path covers quantized weights.
void gemm_scalar(const GemmArgs& g, const int8_t* b, int64_t b_stride, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (g.m > 1 && g.m * g.n * g.k > (1 << 18))
  for (int64_t r = 0; r < g.m; ++r) {
    const int8_t* a = g.a + r * g.a_stride;
    for (int64_t n0 = 0; n0 < g.n; n0 += kPanel) {
      const int64_t cols = std::min(kPanel, g.n - n0);
      int32_t acc[kPanel];
      for (int64_t j = 0; j < cols; ++j) {
        const int8_t* bj = b + (n0 + j) * b_stride;
        int32_t s = 0;
        for (int64_t i = 0; i < g.k; ++i) s += int32_t(a[i]) * int32_t(bj[i]);
        acc[j] = s;
      }
      store_row(g, r, n0, cols, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX-512 VNNI (hosts that have it; chosen at run time). vpdpbusd multiplies unsigned by
// signed bytes and adds each group of 4 products into an int32 lane: one instruction per
// 64 multiply-adds, and no int16 stage that could saturate. The packed B bytes are flipped
// to unsigned (b + 128 = b ^ 0x80) once per loaded vector; a's 4 bytes ride along as the
// signed broadcast operand. So acc = sum_k (b + 128) a = a . b + 128 * rowsum(a), and the
// epilogue subtracts 128 * rowsum(a) (row sums taken once per call). vpdpbusd wraps mod
// 2^32, so the result is exact whenever a . b fits int32, and any b, -128 included, works.
// The same packed layout as the AVX2 kernel: one 64-byte [16 cols][4 k] group is one zmm.
// Register block: 8 rows x 3 panels (48 columns) = 24 zmm accumulators + 3 B vectors.
// Napkin math, M = 256, K = N = 4096: 4.3 G multiply-adds; two vpdpbusd zmm per cycle per
// core would be 128 per cycle, ~11 ms at 3 GHz on one core.
constexpr int kVnniRows = 8, kVnniPanels = 3;

// acc += 4-byte dot products of unsigned u and signed s in each int32 lane. Inline asm
// because GCC 12 copies the accumulator to a fresh register around every
// _mm512_dpbusd_epi32 (two extra moves per instruction measured in the 8 x 3 block).
RF_AVX512VNNI RF_INLINE __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// one k-group of 4: c[r][p] += (b + 128) . a[r] for MR rows x NP panels (b: 64 bytes per panel)
template <int MR, int NP>
RF_AVX512VNNI RF_INLINE void vnni_step(const int8_t* a, int64_t a_stride, const int8_t* b, int64_t panel_bytes,
                                       __m512i c[MR][NP]) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i bu[NP];
#pragma GCC unroll 4
  for (int p = 0; p < NP; ++p) bu[p] = _mm512_xor_si512(_mm512_loadu_si512(b + p * panel_bytes), flip);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    int32_t word;
    std::memcpy(&word, a + r * a_stride, 4);
    const __m512i av = _mm512_set1_epi32(word);
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) c[r][p] = dpbusd(c[r][p], bu[p], av);
  }
}

template <int MR, int NP>
RF_AVX512VNNI void vnni_block(const int8_t* a, int64_t a_stride, const int8_t* panels, int64_t panel_bytes,
                              int64_t k, __m512i acc[kVnniRows][kVnniPanels]) {
  __m512i c[MR][NP];  // local, so the accumulators live in registers (24 of the 32 zmm)
  for (auto& row : c)
    for (auto& v : row) v = _mm512_setzero_si512();
  const int64_t full = k / 4;
  for (int64_t g = 0; g < full; ++g) vnni_step<MR, NP>(a + 4 * g, a_stride, panels + g * 64, panel_bytes, c);
  if (full * 4 < k) {  // tail group: a's bytes past k are 0, so the padded b (0x80) adds nothing
    alignas(4) int8_t tail[kVnniRows][4] = {};
    for (int r = 0; r < MR; ++r) std::memcpy(tail[r], a + r * a_stride + 4 * full, size_t(k - 4 * full));
    vnni_step<MR, NP>(&tail[0][0], 4, panels + full * 64, panel_bytes, c);
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p] = c[r][p];
}

template <int NP>
RF_AVX512VNNI void vnni_rows(const int8_t* a, int64_t a_stride, const int8_t* panels, int64_t panel_bytes,
                             int64_t k, int rows, __m512i acc[kVnniRows][kVnniPanels]) {
  switch (rows) {
    case 8: vnni_block<8, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 7: vnni_block<7, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 6: vnni_block<6, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 5: vnni_block<5, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 4: vnni_block<4, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 3: vnni_block<3, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    case 2: vnni_block<2, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
    default: vnni_block<1, NP>(a, a_stride, panels, panel_bytes, k, acc); break;
  }
}

// sum_k a[r, k] for every row (int32: |sum| <= 128 K)
RF_AVX2 void row_sums(const GemmArgs& g, int32_t* sums) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < g.m; ++r) {
    const int8_t* a = g.a + r * g.a_stride;
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= g.k; i += 32)  // 1 x a pairs: |sum| <= 256 fits int16
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256(
                                                        reinterpret_cast<const __m256i*>(a + i))), ones16));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
    int32_t s = 0;
    for (int32_t v : lanes) s += v;
    for (; i < g.k; ++i) s += a[i];
    sums[r] = s;
  }
}

RF_AVX512VNNI void gemm_vnni(const GemmArgs& g, int num_threads) {
  const int64_t panels = (g.n + kPanel - 1) / kPanel, panel_bytes = (g.k + 3) / 4 * 64;
  const int64_t chunks = (panels + kVnniPanels - 1) / kVnniPanels;
  const int64_t mblocks = (g.m + kVnniRows - 1) / kVnniRows;
  std::vector<int32_t> sums(size_t(g.m));
  row_sums(g, sums.data());
#pragma omp parallel for schedule(static) num_threads(num_threads) if (chunks * mblocks > 1 && g.m * g.n * g.k > (1 << 18))
  for (int64_t c = 0; c < chunks; ++c) {  // 48 columns of B (3 panels, ~K * 48 bytes) stay in L2 for all of A
    const int64_t p0 = c * kVnniPanels;
    const int np = int(std::min<int64_t>(kVnniPanels, panels - p0));
    const int8_t* chunk = g.packed + p0 * panel_bytes;
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int64_t r0 = mb * kVnniRows;
      const int rows = int(std::min<int64_t>(kVnniRows, g.m - r0));
      __m512i acc[kVnniRows][kVnniPanels];
      for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_si512();
      const int8_t* a = g.a + r0 * g.a_stride;
      if (np == 3)
        vnni_rows<3>(a, g.a_stride, chunk, panel_bytes, g.k, rows, acc);
      else if (np == 2)
        vnni_rows<2>(a, g.a_stride, chunk, panel_bytes, g.k, rows, acc);
      else
        vnni_rows<1>(a, g.a_stride, chunk, panel_bytes, g.k, rows, acc);
      alignas(64) int32_t lanes[kPanel];
      for (int r = 0; r < rows; ++r) {
        const __m512i offset = _mm512_set1_epi32(128 * sums[size_t(r0 + r)]);
        for (int p = 0; p < np; ++p) {
          _mm512_store_si512(lanes, _mm512_sub_epi32(acc[r][p], offset));
          const int64_t n0 = (p0 + p) * kPanel;
          store_row(g, r0 + r, n0, std::min(kPanel, g.n - n0), lanes);
        }
      }
    }
  }
}

}  // namespace

int64_t int8_packed_size(int64_t n, int64_t k) {
  RINGFUSE_CHECK(n >= 0 && k >= 0, "int8_packed_size: negative size");
  return (n + kPanel - 1) / kPanel * ((k + 3) / 4) * 64;
}

bool int8_pack_b(std::uintptr_t packed, std::uintptr_t b, int64_t b_stride, int64_t n, int64_t k) {
  RINGFUSE_CHECK(n >= 0 && k >= 1 && b_stride >= k, "int8_pack_b: bad sizes");
  if (n == 0) return false;
  RINGFUSE_CHECK(packed && b, "int8_pack_b: null pointer");
  auto* dst = reinterpret_cast<int8_t*>(packed);
  const auto* src = reinterpret_cast<const int8_t*>(b);
  const int64_t kg = (k + 3) / 4, panels = (n + kPanel - 1) / kPanel;
  bool has_min = false;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t g = 0; g < kg; ++g)
      for (int64_t j = 0; j < kPanel; ++j)
        for (int64_t i = 0; i < 4; ++i) {
          const int64_t col = p * kPanel + j, kk = 4 * g + i;
          const int8_t v = col < n && kk < k ? src[col * b_stride + kk] : int8_t(0);
          has_min |= v == -128;
          dst[((p * kg + g) * kPanel + j) * 4 + i] = v;
        }
  return has_min;
}

void int8_gemm_packed(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t a, int64_t a_stride,
                      std::uintptr_t packed, std::uintptr_t b_raw, int64_t b_stride, bool b_has_min,
                      std::uintptr_t a_scale, std::uintptr_t b_scale, std::uintptr_t bias, int64_t m, int64_t n,
                      int64_t k, int num_threads) {
  const std::string p = "int8_gemm: ";
  RINGFUSE_CHECK(m >= 0 && n >= 0 && k >= 1, p + "sizes must be m, n >= 0 and k >= 1");
  RINGFUSE_CHECK(out_dtype == kInt32 || out_dtype == kFloat32 || out_dtype == kBFloat16 || out_dtype == kFloat16,
                 p + "out dtype must be int32, float32, bfloat16 or float16");
  if (m == 0 || n == 0) return;
  RINGFUSE_CHECK(out && a && packed && b_raw && out_stride >= n && a_stride >= k && b_stride >= k, p + "bad pointers or strides");
  RINGFUSE_CHECK(out_dtype == kInt32 || (a_scale && b_scale), p + "scaled output needs a_scale and b_scale");
  GemmArgs g{reinterpret_cast<void*>(out), out_stride, out_dtype, reinterpret_cast<const int8_t*>(a), a_stride,
             reinterpret_cast<const int8_t*>(packed), reinterpret_cast<const float*>(a_scale),
             reinterpret_cast<const float*>(b_scale), reinterpret_cast<const float*>(bias), m, n, k};
  const int threads = std::max(1, num_threads);
  if (active_isa() == Isa::kAvx2 && int8_use_vnni())
    gemm_vnni(g, threads);
  else if (active_isa() == Isa::kAvx2 && !b_has_min)
    gemm_avx2(g, threads);
  else
    gemm_scalar(g, reinterpret_cast<const int8_t*>(b_raw), b_stride, threads);
}

namespace {

// 8 int8 weights -> 8 fp32
RF_AVX2 RF_INLINE __m256 load_w8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Weight scales of the weight-only linear: per output channel (group = 0: scale[n], applied
// once to the finished dot product) or per group of `group` K-columns (scale[n, k / group],
// rows `stride` apart; group is a multiple of 16, so vectors never straddle two groups and
// each weight vector is scaled once before its FMAs: one vmulps per 8 weights, shared by
// all rows of x).
constexpr int64_t kPrefetch = 1024;  // bytes ahead in each weight row (prefetching past a row's end is harmless)

struct WScale {
  const float* scale;
  int64_t stride, group;
};

// dots[r][j] = x[r] . (w[j] * group scales) over K for MR rows of x and NR weight rows
// (nrows of them real; the rest repeat the last one and are not stored). MR x NR x U
// independent FMA chains (U-way unrolled over K): at least 8, to hide the FMA latency that
// a single chain per row would expose (72 dependent FMAs for K = 576 cost more than
// reading the row).
template <int MR, int NR, int U>
RF_AVX2 void wo_block(const float* x, int64_t x_stride, const int8_t* w, int64_t w_stride, int64_t k, int64_t nrows,
                      const WScale& ws, int64_t n0, float dots[kRows][4]) {
  __m256 acc[MR][NR][U];
  RF_UNROLL for (auto& row : acc)
    RF_UNROLL for (auto& col : row)
      RF_UNROLL for (auto& a : col) a = _mm256_setzero_ps();
  const int8_t* wr[NR];
  const float* sr[NR];  // row j's group scales
  RF_UNROLL for (int j = 0; j < NR; ++j) {
    const int64_t jj = std::min<int64_t>(j, nrows - 1);
    wr[j] = w + jj * w_stride;
    sr[j] = ws.scale + (n0 + jj) * ws.stride;
  }
  const int64_t group = ws.group;
  int64_t i = 0;
  for (int64_t g0 = 0; g0 < k; g0 += group) {
    const int64_t gend = std::min(k, g0 + group);
    __m256 sv[NR];
    RF_UNROLL for (int j = 0; j < NR; ++j) sv[j] = _mm256_set1_ps(sr[j][g0 / group]);
    for (i = g0; i + 8 * U <= gend; i += 8 * U) {
      // Weight rows are K bytes apart, often exactly a 4 KiB page, and the hardware stream
      // prefetcher stops at page ends: fetch each row kPrefetch bytes ahead ourselves
      // (once per cache line): cold-weight M = 1 went from 44-45% to 66-72% of DRAM read.
      if ((i & 63) == 0)
        RF_UNROLL for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + i + kPrefetch), _MM_HINT_T0);
      RF_UNROLL for (int u = 0; u < U; ++u) {
        __m256 wv[NR];
        RF_UNROLL for (int j = 0; j < NR; ++j) wv[j] = _mm256_mul_ps(load_w8(wr[j] + i + 8 * u), sv[j]);
        RF_UNROLL for (int r = 0; r < MR; ++r) {
          const __m256 xv = _mm256_loadu_ps(x + r * x_stride + i + 8 * u);
          RF_UNROLL for (int j = 0; j < NR; ++j) acc[r][j][u] = _mm256_fmadd_ps(xv, wv[j], acc[r][j][u]);
        }
      }
    }
  }
  // i < k only in the last group (the others are multiples of 16 >= 8 * U long)
  RF_UNROLL for (int r = 0; r < MR; ++r)
    RF_UNROLL for (int j = 0; j < NR; ++j) {
      __m256 sum = acc[r][j][0];
      RF_UNROLL for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[r][j][u]);
      float t = hsum(sum);
      for (int64_t q = i; q < k; ++q)
        t += x[r * x_stride + q] * float(wr[j][q]) * sr[j][q / group];
      dots[r][j] = t;
    }
}

RF_AVX2 void wo_grouped(const GemmArgs& g, const float* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                     const WScale& ws, int num_threads) {
  constexpr int64_t kCols = 4;  // weight rows per work item
  const int64_t items = (g.n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (items > 1 && g.m * g.n * g.k > (1 << 16))
  for (int64_t p = 0; p < items; ++p) {
    const int64_t n0 = kCols * p, ncols = std::min(kCols, g.n - n0);
    for (int64_t r0 = 0; r0 < g.m; r0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, g.m - r0);
      float dots[kRows][4];
      const float* xr = x + r0 * x_stride;
      const int8_t* wr = w + n0 * w_stride;
      switch (rows) {  // MR x NR x U >= 8 chains from 2 rows of x
        case 4: wo_block<4, 4, 1>(xr, x_stride, wr, w_stride, g.k, ncols, ws, n0, dots); break;
        case 3: wo_block<3, 4, 1>(xr, x_stride, wr, w_stride, g.k, ncols, ws, n0, dots); break;
        case 2: wo_block<2, 4, 1>(xr, x_stride, wr, w_stride, g.k, ncols, ws, n0, dots); break;
        default:  // one weight row at a time, in address order (as linear.cpp's dot_rows:
                  // walking 4 rows 576 bytes apart at once held the DRAM read at about half
                  // the plain-read rate; SmolLM2's linears with group 128, AVX2, 2 threads:
                  // 11.4 -> 7.2 ms per pass). Same sums per row as 1 x 4 x 2.
          for (int64_t j = 0; j < ncols; ++j) {
            float one[kRows][4];
            wo_block<1, 1, 2>(xr, x_stride, wr + j * w_stride, w_stride, g.k, 1, ws, n0 + j, one);
            dots[0][j] = one[0][0];
          }
          break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        float v[kCols];
        for (int64_t j = 0; j < ncols; ++j)
          v[j] = dots[r][j] + (g.bias ? g.bias[n0 + j] : 0.0f);
        store_floats(g, r0 + r, n0, ncols, v);
      }
    }
  }
}

// Larger M: panel_gemm.h's register-blocked fp32 GEMM on weights dequantized once per call:
// each item's 16-row panels of W are dequantized (with their group scales) into wp [K][16]
// fp32 by 8 x 8 transposes, the per-channel scale and the bias applied to the finished sums.
// Zen 5 VM, 2 threads, warm, [4096, 4096]: M = 17 / 64 / 256 at 174 / 231 / 255 GFLOP/s on
// the AVX2 blocks (peak there ~270), 233 / 390 / 461 on the AVX-512 ones (2.4 / 1.8 / 1.4x
// and 3.1 / 3.0 / 2.5x torch's fp32 F.linear in the same process).
constexpr int64_t kWoGemmMinRows = 4;    // grouped scales: more rows than this take wo_gemm (measured crossover 4-8 rows)
constexpr int64_t kWoLinearMaxRows = 16;  // per-channel scales: up to this many rows take linear.cpp's kernel

// panel_gemm::pack_panel for int8 weights: dequantized with their group scales (8 k never
// straddle two groups: group % 16 == 0); per-channel scales are applied to the finished sums
RF_AVX2 void dequant_panel(const int8_t* w, int64_t w_stride, int64_t ncols, int64_t k, const WScale& ws, int64_t n0,
                           float* wp, int64_t wp_stride) {
  const auto scale = [&](int64_t col, int64_t kk) { return ws.scale[(n0 + col) * ws.stride + kk / ws.group]; };
  panel_gemm::pack_panel(
      w, w_stride, ncols, k, wp, wp_stride,
      [&](int64_t col, int64_t kk) RF_AVX2 {
        const __m256 v = load_w8(w + col * w_stride + kk);
        return ws.group ? _mm256_mul_ps(v, _mm256_set1_ps(scale(col, kk))) : v;
      },
      [&](int64_t col, int64_t kk) { return float(w[col * w_stride + kk]) * (ws.group ? scale(col, kk) : 1.0f); });
}

RF_AVX2 void wo_gemm(const GemmArgs& g, const float* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
                     const WScale& ws, int num_threads) {
  const auto pack = [&](int64_t n0, int64_t ncols, float* wp, int64_t wp_stride) {
    dequant_panel(w + n0 * w_stride, w_stride, ncols, g.k, ws, n0, wp, wp_stride);
  };
  const auto finish = [&](int64_t r, int64_t n0, int64_t ncols, const float* sums) {
    float v[panel_gemm::kCols512];
    for (int64_t j = 0; j < ncols; ++j)
      v[j] = sums[j] * (ws.group ? 1.0f : ws.scale[n0 + j]) + (g.bias ? g.bias[n0 + j] : 0.0f);
    store_floats(g, r, n0, ncols, v);
  };
  panel_gemm::run(g.m, g.n, g.k, x, x_stride, pack, finish, num_threads);
}

void wo_scalar(const GemmArgs& g, const float* x, int64_t x_stride, const int8_t* w, int64_t w_stride,
               const WScale& ws, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (g.n > 1 && g.m * g.n * g.k > (1 << 16))
  for (int64_t col = 0; col < g.n; ++col)
    for (int64_t r = 0; r < g.m; ++r) {
      // the per-row kernels' chunked order (linear.h): one sequential fp32 sum over K = 4096
      // was 4-8x torch's error
      const float* xr = x + r * x_stride;
      const int8_t* wc = w + col * w_stride;
      const float t = chunked_dot(g.k, [&](int64_t i) {
        return xr[i] * float(wc[i]) * (ws.group ? ws.scale[col * ws.stride + i / ws.group] : 1.0f);
      });
      const float v = t * (ws.group ? 1.0f : ws.scale[col]) + (g.bias ? g.bias[col] : 0.0f);
      store_floats(g, r, col, 1, &v);
    }
}

}  // namespace

void int8_weight_only_linear(std::uintptr_t out, int64_t out_stride, int out_dtype, std::uintptr_t x,
                             int64_t x_stride, std::uintptr_t w, int64_t w_stride, std::uintptr_t w_scale,
                             int64_t scale_stride, int64_t group_size, std::uintptr_t bias, int64_t m, int64_t n,
                             int64_t k, int num_threads) {
  const std::string p = "int8_weight_only_linear: ";
  RINGFUSE_CHECK(m >= 0 && n >= 0 && k >= 1, p + "sizes must be m, n >= 0 and k >= 1");
  RINGFUSE_CHECK(out_dtype == kFloat32 || out_dtype == kBFloat16 || out_dtype == kFloat16,
                 p + "out dtype must be float32, bfloat16 or float16");
  RINGFUSE_CHECK(group_size == 0 || (group_size > 0 && group_size % 16 == 0 &&
                                     scale_stride >= (k + group_size - 1) / group_size),
                 p + "group_size must be 0 (per channel) or a positive multiple of 16 with scale rows of ceil(k / group_size)");
  if (m == 0 || n == 0) return;
  RINGFUSE_CHECK(out && x && w && w_scale && out_stride >= n && x_stride >= k && w_stride >= k,
                 p + "bad pointers or strides");
  GemmArgs g{reinterpret_cast<void*>(out), out_stride, out_dtype, nullptr, 0, nullptr, nullptr,
             nullptr, reinterpret_cast<const float*>(bias), m, n, k};
  const WScale ws{reinterpret_cast<const float*>(w_scale), scale_stride, group_size};
  const auto* xp = reinterpret_cast<const float*>(x);
  const auto* wp = reinterpret_cast<const int8_t*>(w);
  const int threads = std::max(1, num_threads);
  if (active_isa() != Isa::kAvx2)
    wo_scalar(g, xp, x_stride, wp, w_stride, ws, threads);
  else if (group_size == 0 && m <= kWoLinearMaxRows)
    linear_int8_per_channel(out, out_stride, out_dtype, x, x_stride, w, w_stride, w_scale, bias, m, n, k, threads);
  else if (m > kWoGemmMinRows)
    wo_gemm(g, xp, x_stride, wp, w_stride, ws, threads);
  else
    wo_grouped(g, xp, x_stride, wp, w_stride, ws, threads);
}

}  // namespace ringfuse::cpu
