// RMSNorm, optionally fused with the residual add, on CUDA.
//
// Per row (hidden = H):  s = x (+ residual, rounded to x dtype; written to residual_out)
//                        rstd = 1 / sqrt(mean(s^2) + eps)          (fp32, correctly rounded)
//                        y = s * rstd * w            (torch order, one rounding)
//                        y = round_x(s * rstd) * w   (HF LlamaRMSNorm order, llama_cast)
//
// Napkin math (memory-bound: ~4 flops per element against 2-8 bytes moved):
//   bytes per call = rows * H * (sx [x] + sx [residual] + sx [residual_out] + so [out])
//                    + H * sw [weight, read from L2 by every row after the first]
//   [130, 4096] bf16 + residual: 4.3 MB -> ~1.5 us at ~3 TB/s (H100 HBM3), below the
//     ~3-5 us a launch costs: decode-sized calls are launch-bound.
//   [4096, 8192] bf16 + residual: 268 MB -> ~90 us at 3 TB/s (H100), ~150 us at 1.8 TB/s
//     (A100-80GB); the kernels should reach 80-90% of the copy bandwidth there.
#include "cuda/norm_common.cuh"

namespace ringfuse::cuda {
namespace {

using namespace detail;

// Register kernel: block (T, R) handles R rows at a time, T threads per row, each thread
// NC chunks of V = 16 / sizeof(x) elements kept in registers as raw x-dtype vectors (one
// uint4 per chunk; unpacked to fp32 where used). Every element of a row is read (x,
// residual) before the row's barrier and written (residual_out, out) after it, so
// out == x and residual_out == residual are safe. Memory traffic is the minimum: one read
// of each input, one write of each output.
template <class TX, int NC, bool kVec>
__global__ void __launch_bounds__(reg_launch_bound(NC))
    rms_norm_reg_kernel(const NormParams p) {
  static_assert(kVec, "the register kernels use 16-byte accesses");
  constexpr int V = 16 / int(sizeof(TX));
  __shared__ float red[2][kMaxRowsPerBlock][32];
  const int t = threadIdx.x, nt = blockDim.x, H = p.hidden;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  int buf = 0;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step, buf ^= 1) {
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
        for (int j = 0; j < V; ++j) acc = fmaf(a[j], a[j], acc);  // out-of-row s = 0
      }
    }
    const float rstd = rsqrt_rn(row_sum(acc, red[buf]) / float(H) + p.eps);
    if (!live) continue;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      if (r.res_out) store16<TX>(r.res_out, k, t, nt, H, s[k]);
      float a[V], y[V];
      load_param<TX, kVec>(p.w, p.w_f32, 1.0f, k, t, nt, H, y);  // y = w
      unpack16<TX>(s[k], a);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float n = a[j] * rstd;
        if (p.llama_cast) n = Cvt<TX>::round(n);
        y[j] *= n;
      }
      store_out<TX, kVec>(r.out, p.out_f32, k, t, nt, H, y);
    }
  }
}

// Streaming kernel, for rows longer than the registers hold (more than 4096 chunks: 32768
// 16-bit or 16384 fp32 elements) and for unaligned rows (scalar accesses, coalesced across
// the warp). Pass 1 reads x (+ residual), writes residual_out and sums s^2; pass 2 re-reads
// s (from residual_out, which holds it exactly, or from x) and writes out. Each thread
// re-reads only the elements it wrote itself, so in-place calls stay safe.
// Traffic: one extra read of the row, served by L1/L2 (a 128 KiB row is still in L2).
template <class TX, bool kVec>
__global__ void __launch_bounds__(kStreamThreads) rms_norm_stream_kernel(const NormParams p) {
  constexpr int V = 16 / int(sizeof(TX));
  constexpr int U = kVec ? 4 : 2;  // chunks in flight per thread (scalar: V loads each)
  __shared__ float red[2][kMaxRowsPerBlock][32];
  const int t = threadIdx.x, nt = blockDim.x, H = p.hidden;
  const int K = ((H + V - 1) / V + nt - 1) / nt;  // chunks per thread
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  int buf = 0;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.y; base < p.rows; base += step, buf ^= 1) {
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
        for (int j = 0; j < V; ++j) acc = fmaf(s[u][j], s[u][j], acc);  // out-of-row s = 0
      }
    }
    const float rstd = rsqrt_rn(row_sum(acc, red[buf]) / float(H) + p.eps);
    if (!live) continue;
    const TX* src = r.res_out ? r.res_out : r.x;
    for (int k0 = 0; k0 < K; k0 += U) {
      float s[U][V], y[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) load_chunk<TX, kVec>(src, k0 + u, t, nt, H, s[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) load_param<TX, kVec>(p.w, p.w_f32, 1.0f, k0 + u, t, nt, H, y[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float n = s[u][j] * rstd;
          if (p.llama_cast) n = Cvt<TX>::round(n);
          y[u][j] *= n;
        }
        store_out<TX, kVec>(r.out, p.out_f32, k0 + u, t, nt, H, y[u]);
      }
    }
  }
}

template <class TX, int NC, bool kVec>
struct RmsNorm {
  static void launch(const NormParams& a, unsigned grid, dim3 block, cudaStream_t st) {
    if constexpr (NC == 0)
      rms_norm_stream_kernel<TX, kVec><<<grid, block, 0, st>>>(a);
    else
      rms_norm_reg_kernel<TX, NC, kVec><<<grid, block, 0, st>>>(a);
  }
};

}  // namespace

void rms_norm(std::uintptr_t out, int64_t out_stride, std::uintptr_t residual_out,
              int64_t residual_out_stride, std::uintptr_t x, int64_t x_stride,
              std::uintptr_t residual, int64_t residual_stride, std::uintptr_t weight,
              int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype, int out_dtype,
              bool llama_cast, std::uintptr_t stream) {
  const NormParams a = make_params("rms_norm", out, out_stride, residual_out, residual_out_stride,
                                   x, x_stride, residual, residual_stride, weight, 0, rows, hidden,
                                   eps, x_dtype, w_dtype, out_dtype, llama_cast);
  dispatch<RmsNorm>("rms_norm", a, x_dtype, stream);
}

}  // namespace ringfuse::cuda
