// LayerNorm, optionally fused with the residual add, on CUDA.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype; written to residual_out)
//                        m = sum(s) / H, d = s - m              (fp32 math throughout)
//                        c = sum(d) / H;  var = sum(d^2) / H - c^2
//                        y = (d - c) * rstd * w + b, rounded once
// This is the corrected two-pass algorithm (Chan, Golub & LeVeque): no cancellation when
// |mean| >> std (unlike E[s^2] - E[s]^2), and c removes the rounding error of m, so the
// centered values d - c keep full fp32 precision even when m itself is large (the mean
// m + c is never rounded to fp32).
//
// Napkin math (memory-bound: ~6 flops per element against 2-8 bytes moved):
//   bytes per call = rows * H * (sx [x] + sx [residual] + sx [residual_out] + so [out])
//                    + H * 2 * sw [weight, bias, read from L2 by every row after the first]
//   [130, 4096] bf16, no residual: 2.1 MB -> ~0.7 us at ~3 TB/s (H100 HBM3): launch-bound.
//   [4096, 8192] bf16 + residual: 268 MB -> ~90 us at 3 TB/s (H100), ~150 us at 1.8 TB/s
//     (A100-80GB); the kernels should reach 80-90% of the copy bandwidth there.
#include "cuda/norm_common.cuh"

namespace ringfuse::cuda {
namespace {

using namespace detail;

// max(v, 0) that keeps a NaN (fmaxf would drop it)
__device__ __forceinline__ float clamp0(float v) { return v < 0.0f ? 0.0f : v; }

// Register kernel: block (T, R) handles R rows at a time, T threads per row, each thread
// NC chunks of V = 16 / sizeof(x) elements kept in registers as raw x-dtype vectors (one
// uint4 per chunk; unpacked to fp32 where used). Two block reductions over those
// registers: sum(s), then sum(d) and sum(d^2) together. Every element of a row is read
// (x, residual) before the row's first barrier and written (residual_out, out) after it,
// so out == x and residual_out == residual are safe. Memory traffic is the minimum: one
// read of each input, one write of each output.
template <class TX, int NC, bool kVec>
__global__ void __launch_bounds__(reg_launch_bound(NC))
    layer_norm_reg_kernel(const NormParams p) {
  static_assert(kVec, "the register kernels use 16-byte accesses");
  constexpr int V = 16 / int(sizeof(TX));
  __shared__ float red[3][kMaxRowsPerBlock][32];  // sum(s); sum(d), sum(d^2)
  const int t = threadIdx.x, nt = blockDim.x, H = p.hidden;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool live = row < p.rows;
    const RowPtrs<TX> r(p, live ? row : 0);
    uint4 s[NC];  // [NC chunks] of this thread's share of the row, x dtype
    float acc = 0.0f;
    if (live) {
      load_s_raw<TX>(r, 0, t, nt, H, s);
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        float a[V];
        unpack16<TX>(s[k], a);
#pragma unroll
        for (int j = 0; j < V; ++j) acc += a[j];  // out-of-row s = 0
      }
    }
    const float m = row_sum(acc, red[0]) / float(H);
    float sd = 0.0f, sd2 = 0.0f;  // sum(d), sum(d^2) over this thread's elements
    if (live) {
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        float a[V];
        unpack16<TX>(s[k], a);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = a[j] - m;
          if (elem_index<kVec, V>(k, j, t, nt) < H) {
            sd += d;
            sd2 = fmaf(d, d, sd2);
          }
        }
      }
    }
    // red[0] is written again only after every warp passed this barrier (next row).
    row_sum2(sd, sd2, red[1], red[2]);
    const float c = sd / float(H);
    const float rstd = rsqrt_rn(clamp0(sd2 / float(H) - c * c) + p.eps);
    if (!live) continue;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      if (r.res_out) store16<TX>(r.res_out, k, t, nt, H, s[k]);
      float a[V], w[V], y[V];
      load_param<TX, kVec>(p.w, p.w_f32, 1.0f, k, t, nt, H, w);
      load_param<TX, kVec>(p.b, p.w_f32, 0.0f, k, t, nt, H, y);  // y = b
      unpack16<TX>(s[k], a);
#pragma unroll
      for (int j = 0; j < V; ++j) y[j] = fmaf(((a[j] - m) - c) * rstd, w[j], y[j]);
      store_out<TX, kVec>(r.out, p.out_f32, k, t, nt, H, y);
    }
  }
}

// Streaming kernel, for rows longer than the registers hold (more than 4096 chunks: 32768
// 16-bit or 16384 fp32 elements) and for unaligned rows (scalar accesses, coalesced across
// the warp). Pass 1 reads x (+ residual), writes residual_out and sums s; pass 2 re-reads
// s (from residual_out, which holds it exactly, or from x) for sum(d), sum(d^2); pass 3
// re-reads s and writes out. Each thread re-reads only the elements it wrote itself, so
// in-place calls stay safe. Traffic: two extra reads of the row, served by L1/L2.
template <class TX, bool kVec>
__global__ void __launch_bounds__(kStreamThreads) layer_norm_stream_kernel(const NormParams p) {
  constexpr int V = 16 / int(sizeof(TX));
  constexpr int U = kVec ? 4 : 2;  // chunks in flight per thread (scalar: V loads each)
  __shared__ float red[3][kMaxRowsPerBlock][32];  // sum(s); sum(d), sum(d^2)
  const int t = threadIdx.x, nt = blockDim.x, H = p.hidden;
  const int K = ((H + V - 1) / V + nt - 1) / nt;  // chunks per thread
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool live = row < p.rows;
    const RowPtrs<TX> r(p, live ? row : 0);
    float acc = 0.0f;
    for (int k0 = 0; live && k0 < K; k0 += U) {
      float s[U][V];
      load_s<TX, kVec>(r, k0, t, nt, H, s);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r.res_out) store_chunk<TX, kVec>(r.res_out, k0 + u, t, nt, H, s[u]);
#pragma unroll
        for (int j = 0; j < V; ++j) acc += s[u][j];  // out-of-row s = 0
      }
    }
    const float m = row_sum(acc, red[0]) / float(H);
    const TX* src = r.res_out ? r.res_out : r.x;
    float sd = 0.0f, sd2 = 0.0f;
    for (int k0 = 0; live && k0 < K; k0 += U) {
      float s[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) load_chunk<TX, kVec>(src, k0 + u, t, nt, H, s[u]);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = s[u][j] - m;
          if (elem_index<kVec, V>(k0 + u, j, t, nt) < H) {
            sd += d;
            sd2 = fmaf(d, d, sd2);
          }
        }
    }
    row_sum2(sd, sd2, red[1], red[2]);
    const float c = sd / float(H);
    const float rstd = rsqrt_rn(clamp0(sd2 / float(H) - c * c) + p.eps);
    if (!live) continue;
    constexpr int U3 = U / 2;  // pass 3 has three inputs per chunk in flight
    for (int k0 = 0; k0 < K; k0 += U3) {
      float s[U3][V], w[U3][V], y[U3][V];
#pragma unroll
      for (int u = 0; u < U3; ++u) load_chunk<TX, kVec>(src, k0 + u, t, nt, H, s[u]);
#pragma unroll
      for (int u = 0; u < U3; ++u) {
        load_param<TX, kVec>(p.w, p.w_f32, 1.0f, k0 + u, t, nt, H, w[u]);
        load_param<TX, kVec>(p.b, p.w_f32, 0.0f, k0 + u, t, nt, H, y[u]);  // y = b
      }
#pragma unroll
      for (int u = 0; u < U3; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) y[u][j] = fmaf(((s[u][j] - m) - c) * rstd, w[u][j], y[u][j]);
        store_out<TX, kVec>(r.out, p.out_f32, k0 + u, t, nt, H, y[u]);
      }
    }
  }
}

template <class TX, int NC, bool kVec>
struct LayerNorm {
  static void launch(const NormParams& a, unsigned grid, dim3 block, cudaStream_t st) {
    if constexpr (NC == 0)
      layer_norm_stream_kernel<TX, kVec><<<grid, block, 0, st>>>(a);
    else
      layer_norm_reg_kernel<TX, NC, kVec><<<grid, block, 0, st>>>(a);
  }
};

}  // namespace

void layer_norm(std::uintptr_t out, int64_t out_stride, std::uintptr_t residual_out,
                int64_t residual_out_stride, std::uintptr_t x, int64_t x_stride,
                std::uintptr_t residual, int64_t residual_stride, std::uintptr_t weight,
                std::uintptr_t bias, int64_t rows, int64_t hidden, double eps, int x_dtype,
                int w_dtype, int out_dtype, std::uintptr_t stream) {
  const NormParams a = make_params("layer_norm", out, out_stride, residual_out,
                                   residual_out_stride, x, x_stride, residual, residual_stride,
                                   weight, bias, rows, hidden, eps, x_dtype, w_dtype, out_dtype,
                                   false);
  dispatch<LayerNorm>("layer_norm", a, x_dtype, stream);
}

}  // namespace ringfuse::cuda
