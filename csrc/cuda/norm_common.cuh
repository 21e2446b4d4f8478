// Internal to csrc/cuda/{rms_norm,layer_norm}.cu: the argument bundle, boundary checks,
// launch shape, loads/stores and block reduction both norm families share.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <string>
#include <type_traits>

#include "common.h"
#include "cuda/norms.h"

namespace ringfuse::cuda::detail {

// ---------------------------------------------------------------------------------------
// Launch shape. The row is cut into chunks of V = 16 / sizeof(x) elements (one 16-byte
// access). A row gets T threads (blockDim.x, a multiple of 32) holding NC chunks each in
// registers (as x-dtype vectors), so the row is read from memory once: NC is the smallest
// of 1, 2, 4, 8 with T <= 256, then T grows to 512 at NC = 8 (4096 chunks: 32768 16-bit or
// 16384 fp32 elements). Longer rows take the streaming kernel (T = 512), which re-reads
// them; so do rows that are not 16-byte aligned (scalar accesses).
// Rows needing fewer than 128 threads are packed R = 128 / T to a block (blockDim.y = R):
// a row of up to 32 chunks (512 B) is one warp and reduces with shuffles alone.
// Examples, bf16: H = 576 -> T = 96, NC = 1; 4096 -> 256, 2; 8192 -> 256, 4;
// 16384 -> 256, 8; 32768 -> 512, 8; 65536 -> streaming. fp32 needs twice the chunks.
// ---------------------------------------------------------------------------------------
constexpr int kMaxRowsPerBlock = 4;   // 128 / 32
constexpr int kSmallBlock = 128;      // pack rows until a block has this many threads
constexpr int kRegThreads = 256;      // preferred block size of the register kernels
constexpr int kMaxRegThreads = 512;   // NC = 8 may grow to this before streaming
constexpr int kStreamThreads = 512;   // streaming kernel
constexpr int kMaxRegChunks = 8 * kMaxRegThreads;

// NC = 8 kernels run up to 512 threads (ptxas caps them at 128 registers); smaller NC
// never exceed 256 threads.
constexpr int reg_launch_bound(int nc) { return nc >= 8 ? kMaxRegThreads : kRegThreads; }

struct LaunchShape {
  int nc;       // chunks per thread held in registers; 0: streaming kernel
  int threads;  // blockDim.x, a multiple of 32
  int rows_per_block;
};

inline LaunchShape pick_shape(int64_t chunks) {
  auto round32 = [](int64_t n) { return int((n + 31) / 32 * 32); };
  for (int nc : {1, 2, 4, 8}) {
    const int t = round32((chunks + nc - 1) / nc);
    if (t <= kRegThreads) return {nc, t, t < kSmallBlock ? kSmallBlock / t : 1};
  }
  if (chunks <= kMaxRegChunks) return {8, round32((chunks + 7) / 8), 1};
  return {0, kStreamThreads, 1};
}

// ---------------------------------------------------------------------------------------
// Argument bundle (passed by value to the kernels).
// ---------------------------------------------------------------------------------------
struct NormParams {
  void* out;                  // [rows, hidden], out dtype
  int64_t out_stride;
  void* res_out;              // [rows, hidden], x dtype, or null
  int64_t res_out_stride;
  const void* x;              // [rows, hidden], x dtype (may alias out)
  int64_t x_stride;
  const void* res;            // [rows, hidden], x dtype, or null (may alias res_out)
  int64_t res_stride;
  const void* w;              // [hidden], w dtype, or null
  const void* b;              // [hidden], w dtype, or null (layer_norm only)
  int64_t rows;
  int hidden;
  float eps;
  bool w_f32;                 // weight / bias are float32 (else x dtype)
  bool out_f32;               // out is float32 (else x dtype)
  bool llama_cast;            // rms_norm: round s * rstd to x dtype before * w
};

inline int dtype_size(int code) { return code == kFloat32 ? 4 : 2; }

inline NormParams make_params(const char* op, std::uintptr_t out, int64_t out_stride,
                              std::uintptr_t residual_out, int64_t residual_out_stride,
                              std::uintptr_t x, int64_t x_stride, std::uintptr_t residual,
                              int64_t residual_stride, std::uintptr_t weight, std::uintptr_t bias,
                              int64_t rows, int64_t hidden, double eps, int x_dtype, int w_dtype,
                              int out_dtype, bool llama_cast) {
  const std::string p = std::string(op) + ": ";
  RINGFUSE_CHECK(rows >= 0, p + "rows must be >= 0, got " + std::to_string(rows));
  RINGFUSE_CHECK(hidden >= 1, p + "hidden must be >= 1, got " + std::to_string(hidden));
  RINGFUSE_CHECK(hidden <= (int64_t(1) << 30),
                 p + "hidden must be <= 2^30, got " + std::to_string(hidden));
  RINGFUSE_CHECK(std::isfinite(float(eps)) && float(eps) > 0.0f,
                 p + "eps must be a finite number > 0, got " + std::to_string(eps));
  RINGFUSE_CHECK(x_dtype == kFloat32 || x_dtype == kFloat16 || x_dtype == kBFloat16,
                 p + "x dtype must be float32, float16 or bfloat16, got " + dtype_name(x_dtype));
  RINGFUSE_CHECK(w_dtype == x_dtype || w_dtype == kFloat32,
                 p + "weight dtype must equal x dtype (" + dtype_name(x_dtype) +
                     ") or be float32, got " + dtype_name(w_dtype));
  RINGFUSE_CHECK(out_dtype == x_dtype || out_dtype == kFloat32,
                 p + "out dtype must equal x dtype (" + dtype_name(x_dtype) +
                     ") or be float32, got " + dtype_name(out_dtype));
  if (rows > 0) {
    RINGFUSE_CHECK(out != 0 && x != 0, p + "null out or x pointer");
    RINGFUSE_CHECK((residual == 0) == (residual_out == 0),
                   p + "residual and residual_out must be given together");
    const int64_t min_stride = rows > 1 ? hidden : 0;
    RINGFUSE_CHECK(out_stride >= min_stride && x_stride >= min_stride,
                   p + "row strides must be >= hidden");
    if (residual)
      RINGFUSE_CHECK(residual_stride >= min_stride && residual_out_stride >= min_stride,
                     p + "residual row strides must be >= hidden");
  }
  NormParams a;
  a.out = reinterpret_cast<void*>(out);
  a.out_stride = out_stride;
  a.res_out = reinterpret_cast<void*>(residual_out);
  a.res_out_stride = residual_out_stride;
  a.x = reinterpret_cast<const void*>(x);
  a.x_stride = x_stride;
  a.res = reinterpret_cast<const void*>(residual);
  a.res_stride = residual_stride;
  a.w = reinterpret_cast<const void*>(weight);
  a.b = reinterpret_cast<const void*>(bias);
  a.rows = rows;
  a.hidden = int(hidden);
  a.eps = float(eps);
  a.w_f32 = w_dtype == kFloat32;
  a.out_f32 = out_dtype == kFloat32;
  a.llama_cast = llama_cast;
  return a;
}

// 16-byte vector loads/stores need every row start 16-byte aligned and whole chunks.
inline bool can_vectorize(const NormParams& a, int x_dtype) {
  const int sx = dtype_size(x_dtype), so = a.out_f32 ? 4 : sx, sw = a.w_f32 ? 4 : sx;
  if (a.hidden % (16 / sx) != 0) return false;
  auto ok = [&](const void* p, int64_t stride, int size) {
    if (p == nullptr) return true;
    const bool base = reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
    return base && (a.rows <= 1 || (stride * size) % 16 == 0);
  };
  return ok(a.x, a.x_stride, sx) && ok(a.out, a.out_stride, so) && ok(a.res, a.res_stride, sx) &&
         ok(a.res_out, a.res_out_stride, sx) && ok(a.w, 0, sw) && ok(a.b, 0, sw);
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  RINGFUSE_CHECK(err == cudaSuccess, std::string(op) + ": CUDA kernel launch failed: " +
                                         cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

inline unsigned grid_for(int64_t rows, int rows_per_block) {
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return unsigned(blocks < INT_MAX ? blocks : INT_MAX);  // kernels loop over the rest
}

// ---------------------------------------------------------------------------------------
// Element conversion: load to fp32, store with round-to-nearest-even.
// ---------------------------------------------------------------------------------------
template <class T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
  static __device__ __forceinline__ float round(float f) { return f; }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float round(float f) {
    return __half2float(__float2half_rn(f));
  }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float round(float f) {
    return __bfloat162float(__float2bfloat16_rn(f));
  }
};

// 16-bit patterns <-> fp32 (bf16 -> fp32 is exact: the pattern is the upper half).
__device__ __forceinline__ float bits_to_float(uint32_t b, __half*) {
  return __half2float(__ushort_as_half((unsigned short)b));
}
__device__ __forceinline__ float bits_to_float(uint32_t b, __nv_bfloat16*) {
  return __uint_as_float(b << 16);
}
__device__ __forceinline__ uint32_t float_to_bits(float f, __half*) {
  return __half_as_ushort(__float2half_rn(f));
}
__device__ __forceinline__ uint32_t float_to_bits(float f, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
}

// 16 bytes <-> fp32: 4 floats or 8 halves / bfloat16s.
template <class T>
__device__ __forceinline__ void unpack16(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      f[i] = __uint_as_float(w[i]);
    } else {
      f[2 * i] = bits_to_float(w[i] & 0xffffu, static_cast<T*>(nullptr));
      f[2 * i + 1] = bits_to_float(w[i] >> 16, static_cast<T*>(nullptr));
    }
  }
}

template <class T>
__device__ __forceinline__ uint4 pack16(const float* f) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(f[i]);
    } else {
      w[i] = float_to_bits(f[2 * i], static_cast<T*>(nullptr)) |
             (float_to_bits(f[2 * i + 1], static_cast<T*>(nullptr)) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------------
// Chunk k of thread t (of T) in a row: V elements.
//   kVec:  elements [(k*T + t)*V, +V), one (or two, for fp32 data of a 16-bit x) 16-byte
//          access; only used when hidden % V == 0 and everything is 16-byte aligned.
//   else:  elements (k*V + j)*T + t, j < V: scalar accesses, coalesced across the warp.
// Out-of-row elements load as 0 and are not stored. Loads are written as a bare guarded
// load followed by the conversion, so that ptxas predicates them and issues all the loads
// of a batch before the first one is used.
// ---------------------------------------------------------------------------------------
template <bool kVec, int V>
__device__ __forceinline__ int elem_index(int k, int j, int t, int T) {
  return kVec ? (k * T + t) * V + j : (k * V + j) * T + t;
}

// 16 bytes at row + i, or zeros when i is past the row (kVec layouts: whole vectors).
template <class T>
__device__ __forceinline__ uint4 load16_or_zero(const T* row, int i, int hidden) {
  return i < hidden ? *reinterpret_cast<const uint4*>(row + i) : make_uint4(0u, 0u, 0u, 0u);
}

template <class T, bool kVec, int V>
__device__ __forceinline__ void load_chunk(const T* row, int k, int t, int nt, int hidden,
                                           float (&f)[V]) {
  if constexpr (kVec) {
    constexpr int kPer16 = 16 / int(sizeof(T));
    const int i0 = elem_index<kVec, V>(k, 0, t, nt);
    uint4 q[V / kPer16];
#pragma unroll
    for (int n = 0; n < V / kPer16; ++n) q[n] = load16_or_zero(row, i0 + n * kPer16, hidden);
#pragma unroll
    for (int n = 0; n < V / kPer16; ++n) unpack16<T>(q[n], f + n * kPer16);
  } else {
    T v[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int i = elem_index<kVec, V>(k, j, t, nt);
      v[j] = i < hidden ? row[i] : Cvt<T>::store(0.0f);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = Cvt<T>::load(v[j]);
  }
}

template <class T, bool kVec, int V>
__device__ __forceinline__ void store_chunk(T* row, int k, int t, int nt, int hidden,
                                            const float (&f)[V]) {
  if constexpr (kVec) {
    const int i0 = elem_index<kVec, V>(k, 0, t, nt);
    if (i0 < hidden) {
      constexpr int kPer16 = 16 / int(sizeof(T));
#pragma unroll
      for (int n = 0; n < V / kPer16; ++n)
        *reinterpret_cast<uint4*>(row + i0 + n * kPer16) = pack16<T>(f + n * kPer16);
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int i = elem_index<kVec, V>(k, j, t, nt);
      if (i < hidden) row[i] = Cvt<T>::store(f[j]);
    }
  }
}

// Typed row pointers of one row.
template <class TX>
struct RowPtrs {
  const TX* x;
  const TX* res;
  TX* res_out;
  void* out;
  __device__ __forceinline__ RowPtrs(const NormParams& p, int64_t row)
      : x(static_cast<const TX*>(p.x) + row * p.x_stride),
        res(p.res ? static_cast<const TX*>(p.res) + row * p.res_stride : nullptr),
        res_out(p.res_out ? static_cast<TX*>(p.res_out) + row * p.res_out_stride : nullptr),
        out(p.out_f32 ? static_cast<void*>(static_cast<float*>(p.out) + row * p.out_stride)
                      : static_cast<void*>(static_cast<TX*>(p.out) + row * p.out_stride)) {}
};

// s = x, or round_x(x + residual) (fp32 add, one rounding: torch's same-dtype add), for
// the N chunks k0 .. k0 + N - 1 (kVec layout), kept as raw x-dtype vectors: one uint4 per
// chunk whatever the dtype (s is exactly representable in x's dtype). Every load of x and
// then of the residual is issued before the first add.
template <class TX, int N>
__device__ __forceinline__ void load_s_raw(const RowPtrs<TX>& r, int k0, int t, int nt,
                                           int hidden, uint4 (&s)[N]) {
  constexpr int V = 16 / int(sizeof(TX));
#pragma unroll
  for (int n = 0; n < N; ++n) s[n] = load16_or_zero(r.x, ((k0 + n) * nt + t) * V, hidden);
  if (r.res) {
    uint4 q[N];
#pragma unroll
    for (int n = 0; n < N; ++n) q[n] = load16_or_zero(r.res, ((k0 + n) * nt + t) * V, hidden);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float a[V], b[V];
      unpack16<TX>(s[n], a);
      unpack16<TX>(q[n], b);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] += b[j];
      s[n] = pack16<TX>(a);  // round to nearest even (exact for fp32)
    }
  }
}

template <class TX>
__device__ __forceinline__ void store16(TX* row, int k, int t, int nt, int hidden, uint4 q) {
  constexpr int V = 16 / int(sizeof(TX));
  const int i0 = (k * nt + t) * V;
  if (i0 < hidden) *reinterpret_cast<uint4*>(row + i0) = q;
}

// The same for U chunks in either layout, as fp32 (streaming kernels).
template <class TX, bool kVec, int U, int V>
__device__ __forceinline__ void load_s(const RowPtrs<TX>& r, int k0, int t, int nt, int hidden,
                                       float (&s)[U][V]) {
  if constexpr (kVec) {
    uint4 q[U];
    load_s_raw<TX>(r, k0, t, nt, hidden, q);
#pragma unroll
    for (int u = 0; u < U; ++u) unpack16<TX>(q[u], s[u]);
  } else {
#pragma unroll
    for (int u = 0; u < U; ++u) load_chunk<TX, kVec>(r.x, k0 + u, t, nt, hidden, s[u]);
    if (r.res) {
      float q[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) load_chunk<TX, kVec>(r.res, k0 + u, t, nt, hidden, q[u]);
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int j = 0; j < V; ++j) s[u][j] = Cvt<TX>::round(s[u][j] + q[u][j]);
    }
  }
}

// weight / bias chunk: float32 or x dtype (uniform branch); `fill` when absent.
template <class TX, bool kVec, int V>
__device__ __forceinline__ void load_param(const void* p, bool f32, float fill, int k, int t,
                                           int nt, int hidden, float (&f)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < V; ++j) f[j] = fill;
  } else if (f32) {
    load_chunk<float, kVec>(static_cast<const float*>(p), k, t, nt, hidden, f);
  } else {
    load_chunk<TX, kVec>(static_cast<const TX*>(p), k, t, nt, hidden, f);
  }
}

template <class TX, bool kVec, int V>
__device__ __forceinline__ void store_out(void* out, bool f32, int k, int t, int nt, int hidden,
                                          const float (&y)[V]) {
  if (f32)
    store_chunk<float, kVec>(static_cast<float*>(out), k, t, nt, hidden, y);
  else
    store_chunk<TX, kVec>(static_cast<TX*>(out), k, t, nt, hidden, y);
}

// ---------------------------------------------------------------------------------------
// Deterministic sum over the threads of one row (blockDim.x threads, row threadIdx.y).
// xor butterfly in the warp (every lane ends with the same bits: fp add commutes), then
// warp partials in smem, summed in lane order by every warp. Consecutive reductions use
// different smem buffers, so no barrier is needed after the read: a warp can only write a
// buffer again after the barrier of the next reduction, which every warp reaches only
// after reading.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

__device__ __forceinline__ float row_sum(float v, float (*buf)[32]) {
  v = warp_sum(v);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return v;
  const int lane = threadIdx.x & 31;
  if (lane == 0) buf[threadIdx.y][threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_sum(lane < nw ? buf[threadIdx.y][lane] : 0.0f);
}

// Two sums at once (layer_norm's sum(d), sum(d^2)): the same order as row_sum for each.
__device__ __forceinline__ void row_sum2(float& a, float& b, float (*buf_a)[32],
                                         float (*buf_b)[32]) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return;
  const int lane = threadIdx.x & 31;
  if (lane == 0) {
    buf_a[threadIdx.y][threadIdx.x >> 5] = a;
    buf_b[threadIdx.y][threadIdx.x >> 5] = b;
  }
  __syncthreads();
  a = warp_sum(lane < nw ? buf_a[threadIdx.y][lane] : 0.0f);
  b = warp_sum(lane < nw ? buf_b[threadIdx.y][lane] : 0.0f);
}

// Correctly rounded (but for ~2^-29 of inputs) 1 / sqrt(v): one double sqrt and divide per
// row, cheap next to the row's memory traffic; rsqrtf is off by up to 2 ulp.
__device__ __forceinline__ float rsqrt_rn(float v) { return float(1.0 / sqrt(double(v))); }

// ---------------------------------------------------------------------------------------
// Host dispatch: x dtype x launch shape. Kernel<TX, NC, kVec>::launch is provided by each
// op: NC > 0 register kernels (vector accesses only), NC = 0 the streaming kernel (vector
// accesses for rows too long for registers, scalar accesses for unaligned rows).
// 6 kernels per x dtype, 18 per op.
// ---------------------------------------------------------------------------------------
template <template <class, int, bool> class Kernel, class TX>
void dispatch_shape(const NormParams& a, int x_dtype, cudaStream_t st) {
  constexpr int V = 16 / int(sizeof(TX));
  const LaunchShape s = pick_shape((int64_t(a.hidden) + V - 1) / V);
  const dim3 block(s.threads, s.rows_per_block);
  const unsigned grid = grid_for(a.rows, s.rows_per_block);
  if (!can_vectorize(a, x_dtype)) {  // unaligned rows: scalar accesses, streaming kernel
    Kernel<TX, 0, false>::launch(a, grid, block, st);
    return;
  }
  switch (s.nc) {
    case 1: Kernel<TX, 1, true>::launch(a, grid, block, st); break;
    case 2: Kernel<TX, 2, true>::launch(a, grid, block, st); break;
    case 4: Kernel<TX, 4, true>::launch(a, grid, block, st); break;
    case 8: Kernel<TX, 8, true>::launch(a, grid, block, st); break;
    default: Kernel<TX, 0, true>::launch(a, grid, block, st); break;
  }
}

template <template <class, int, bool> class Kernel>
void dispatch(const char* op, const NormParams& a, int x_dtype, std::uintptr_t stream) {
  if (a.rows == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case kFloat16: dispatch_shape<Kernel, __half>(a, x_dtype, st); break;
    case kBFloat16: dispatch_shape<Kernel, __nv_bfloat16>(a, x_dtype, st); break;
    default: dispatch_shape<Kernel, float>(a, x_dtype, st); break;
  }
  check_launch(op);
}

}  // namespace ringfuse::cuda::detail
