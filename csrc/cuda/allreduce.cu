// Ring all-reduce, reduce-scatter and all-gather of CUDA tensors over NCCL point-to-point
// (ncclSend / ncclRecv in groups) plus a CUDA combine kernel: the GPU transport (ARCHITECTURE.md,
// "Distributed"), with the CPU ring's schedule and results (csrc/cpu/allreduce.cpp).
//
// Schedule and streams: ring_schedule.h. In short, reduce-scatter steps move pieces of
// piece_bytes (default 4 MiB, from Python) with one NCCL group {send to rank+1, receive from
// rank-1} each on the communicator's own stream, the received piece landing in one of two
// staging slots; the combine kernel folds it into data on the caller's stream while the
// next piece's group runs. All-gather steps receive whole chunks straight into data. The
// caller's stream waits for the last NCCL group, so work queued after the call sees the
// result, and the host polls an event recorded after the ring: NCCL calls never time out on
// their own, so past the timeout (or on an asynchronous NCCL error) the communicator is
// aborted (ncclCommAbort), which makes NCCL's kernels return, and the call fails cleanly.
// The price of the timeout: a call returns only once the ring has finished on the device.
//
// libnccl.so.2 is dlopen'ed (nccl_api.h declares the symbols used): building ringfuse needs
// neither NCCL nor its headers, and importing it needs neither NCCL nor a driver.
//
// Napkin math (N ranks, S bytes per rank, all_reduce):
//   link: each rank sends and receives 2 (N-1)/N S (reduce-scatter, then all-gather), the
//     ring's minimum; 2 ranks, 256 MiB fp32 over H100 NVLink4 (~450 GB/s per direction,
//     ~370 GB/s reachable by NCCL point-to-point): 256 MiB each way -> ~0.7 ms.
//   HBM: NCCL reads 2 (N-1)/N S (sends) and writes as much (receives); the combines read
//     2 (N-1)/N S and write (N-1)/N S: for the example 384 MiB -> ~0.13 ms at ~3 TB/s,
//     hidden behind the transfers because piece p's combine overlaps piece p+1's exchange.
//   per piece (4 MiB): ~11 us on the link at 370 GB/s; its combine moves 12 MiB (fp32) in
//     ~4 us (H100) / ~7 us (A100, ~1.8 TB/s); the host enqueues a piece (a group, two event
//     waits, two records, a launch) in ~10-15 us, which is why pieces are not smaller.
//   small calls are latency-bound: the Python handshake over the store (tens to hundreds of
//     us), 2 (N-1) group launches (~5-10 us each) and the completion poll.
#include "cuda/allreduce.h"

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>

#include "common.h"
#include "cpu/allreduce.h"
#include "cuda/nccl_api.h"
#include "ring_schedule.h"

namespace ringfuse::cuda {

static_assert(int(ring::kAllReduce) == int(cpu::kShmAllReduce) &&
                  int(ring::kReduceScatter) == int(cpu::kShmReduceScatter) &&
                  int(ring::kAllGather) == int(cpu::kShmAllGather),
              "kind codes of the CPU ring");
static_assert(int(ring::kSum) == int(cpu::kShmSum) && int(ring::kAvg) == int(cpu::kShmAvg) &&
                  int(ring::kMax) == int(cpu::kShmMax) && int(ring::kMin) == int(cpu::kShmMin),
              "op codes of the CPU ring");
static_assert(int(kNcclOk) == int(cpu::kShmOk) && int(kNcclFailed) == int(cpu::kShmTimeout) &&
                  int(kNcclMismatch) == int(cpu::kShmMismatch) && int(kNcclBroken) == int(cpu::kShmBroken),
              "status codes of the CPU ring");

namespace {

using nccl::ncclResult_t;
constexpr ncclResult_t kSuccess = nccl::ncclSuccess;

// ---------------------------------------------------------------------------------------
// The combine kernel: local[i] = combine(received[i], local[i]) for i < n (ring_schedule.h's
// element math; avg divides on the owner's last step).
//
// Napkin math: per element 1 flop against 3 x sizeof(T) bytes (read received and local,
// write local): purely memory-bound. One 16-byte vector per thread per iteration: a 4 MiB
// piece is 262144 vectors = 1024 blocks of 256 threads, enough loads in flight to approach
// the copy bandwidth (~12 MiB in ~4 us on an H100). `received` sits in a staging slot at
// the same address mod 16 as `local`, so both are aligned after the same `head` elements:
// every piece is vectorized whatever its offset in the tensor.

// fp16 through cuda_fp16's round-to-nearest-even conversions (the F16C ones of the CPU ring).
struct F16 {
  using T = uint16_t;
  static constexpr bool kFloat = true;
  RF_RING_HD static float load(T v) { return __half2float(__ushort_as_half(v)); }
  RF_RING_HD static T store(float v) { return __half_as_ushort(__float2half_rn(v)); }
  RF_RING_HD static float round(float v) { return load(store(v)); }
};

constexpr int kCombineThreads = 256;
constexpr int64_t kMaxCombineBlocks = 4096;  // the grid-stride loop covers the rest

template <class E, int OP>
__global__ void __launch_bounds__(kCombineThreads)
    ring_combine_kernel(typename E::T* __restrict__ local,           // [n] data, updated in place
                        const typename E::T* __restrict__ received,  // [n] staging slot
                        int64_t n,                                   // elements
                        int head,                                    // elements before 16-byte alignment
                        bool div,                                    // avg: / w after the sum
                        float w) {                                   // world size
  using T = typename E::T;
  constexpr int V = 16 / int(sizeof(T));
  union Vec {
    uint4 v;
    T e[V];
  };
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = int64_t(gridDim.x) * blockDim.x;
  if (tid < head) local[tid] = ring::combine<E, OP>(received[tid], local[tid], div, w);
  const int64_t nvec = (n - head) / V;
  const uint4* rv = reinterpret_cast<const uint4*>(received + head);
  uint4* lv = reinterpret_cast<uint4*>(local + head);
  for (int64_t i = tid; i < nvec; i += nthreads) {
    Vec a, b;
    a.v = rv[i];
    b.v = lv[i];
#pragma unroll
    for (int j = 0; j < V; ++j) b.e[j] = ring::combine<E, OP>(a.e[j], b.e[j], div, w);
    lv[i] = b.v;
  }
  const int64_t t0 = head + nvec * V;  // tail: fewer than V elements
  if (tid < n - t0) local[t0 + tid] = ring::combine<E, OP>(received[t0 + tid], local[t0 + tid], div, w);
}

using CombineLaunch = cudaError_t (*)(void* local, const void* received, int64_t n, bool div, float w,
                                      cudaStream_t stream);

template <class E, int OP>
cudaError_t launch_combine(void* local, const void* received, int64_t n, bool div, float w, cudaStream_t stream) {
  using T = typename E::T;
  constexpr int64_t V = 16 / int64_t(sizeof(T));
  const auto addr = reinterpret_cast<std::uintptr_t>(local);
  const int head = int(std::min<int64_t>(n, int64_t((16 - (addr & 15)) & 15) / int64_t(sizeof(T))));
  const int64_t nvec = (n - head) / V;
  const auto blocks =
      unsigned(std::clamp<int64_t>((nvec + kCombineThreads - 1) / kCombineThreads, 1, kMaxCombineBlocks));
  ring_combine_kernel<E, OP><<<blocks, kCombineThreads, 0, stream>>>(static_cast<T*>(local),
                                                                     static_cast<const T*>(received), n, head, div, w);
  return cudaGetLastError();
}

template <int OP>
CombineLaunch pick_for_op(int dtype) {
  switch (dtype) {
    case kFloat32: return &launch_combine<ring::F32, OP>;
    case kFloat16: return &launch_combine<F16, OP>;
    case kBFloat16: return &launch_combine<ring::BF16, OP>;
    case kInt32: return &launch_combine<ring::Int<int32_t>, OP>;
    case kInt64: return &launch_combine<ring::Int<int64_t>, OP>;
    default: return nullptr;
  }
}

CombineLaunch pick_combine(int dtype, int op) {
  switch (op) {
    case ring::kMax: return pick_for_op<ring::kMax>(dtype);
    case ring::kMin: return pick_for_op<ring::kMin>(dtype);
    default: return pick_for_op<ring::kSum>(dtype);  // sum and avg (avg divides at the end)
  }
}

// ---------------------------------------------------------------------------------------
// The library

std::mutex g_api_mu;
nccl::Api g_api;  // written once under g_api_mu, read-only afterwards

std::string version_string(int code) {
  const int x = code >= 10000 ? code / 10000 : code / 1000;
  const int y = code >= 10000 ? code / 100 % 100 : code / 100 % 10;
  return std::to_string(x) + "." + std::to_string(y) + "." + std::to_string(code % 100);
}

const nccl::Api& api() {
  std::lock_guard<std::mutex> lock(g_api_mu);
  RINGFUSE_CHECK(g_api.lib != nullptr, "nccl: libnccl.so.2 is not loaded (nccl_load first)");
  return g_api;
}

std::string cuda_error(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

std::string nccl_error(const nccl::Api& A, ncclResult_t e, nccl::ncclComm_t comm = nullptr) {
  std::string s = A.get_error_string(e);
  if (A.get_last_error != nullptr) {
    const char* last = A.get_last_error(comm);
    if (last != nullptr && last[0] != 0) s += std::string(" (") + last + ")";
  }
  return s;
}

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------
// Process-local communicator

struct NcclRing {
  nccl::ncclComm_t comm = nullptr;  // null once aborted
  int rank = 0, world = 1, device = 0, succ = 0, pred = 0;
  cudaStream_t stream = nullptr;  // NCCL's stream (ring_schedule.h kComm)
  cudaEvent_t events[ring::kNumEvents] = {};
  char* staging = nullptr;  // two slots of slot_stride bytes
  int64_t piece_bytes = 0, slot_stride = 0;
  uint64_t calls = 0;
  bool broken = false;
  bool busy = false;  // inside nccl_ring_run (guarded by g_mu)
  std::string last_error;
};

std::mutex g_mu;
std::unordered_set<NcclRing*> g_rings;

NcclRing& lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto* R = reinterpret_cast<NcclRing*>(handle);
  RINGFUSE_CHECK(g_rings.count(R) != 0, "nccl ring: invalid or closed handle");
  return *R;
}

struct BusyGuard {
  NcclRing& R;
  explicit BusyGuard(int64_t handle) : R(lookup(handle)) {
    std::lock_guard<std::mutex> lock(g_mu);
    RINGFUSE_CHECK(!R.busy, "nccl ring: concurrent calls on one handle");
    R.busy = true;
  }
  ~BusyGuard() {
    std::lock_guard<std::mutex> lock(g_mu);
    R.busy = false;
  }
};

// Makes `device` current for the scope; the caller's device comes back afterwards.
struct DeviceGuard {
  int prev = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    if (prev != device) err = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev >= 0 && err == cudaSuccess) cudaSetDevice(prev);
  }
};

// Frees what open created. `drained`: nothing can still run on the stream (else the staging
// memory is left allocated: cudaFree would wait for work that may never finish).
void release(NcclRing& R, bool drained) {
  for (cudaEvent_t& e : R.events) {
    if (e != nullptr) cudaEventDestroy(e);
    e = nullptr;
  }
  if (R.staging != nullptr && drained) cudaFree(R.staging);
  R.staging = nullptr;
  if (R.stream != nullptr) cudaStreamDestroy(R.stream);  // returns at once; freed when idle
  R.stream = nullptr;
}

// A failure in the middle of the ring: peers may be blocked on this rank, so abort the
// communicator (its kernels return, the peers' see a remote error or time out) and keep the
// handle broken.
int fail_run(NcclRing& R, const std::string& msg) {
  R.broken = true;
  R.last_error = "rank " + std::to_string(R.rank) + ": " + msg;
  if (R.comm != nullptr) {
    g_api.comm_abort(R.comm);
    R.comm = nullptr;
    R.last_error += "; the NCCL communicator was aborted";
  }
  return kNcclFailed;
}

// Poll `ev` until it completes, NCCL reports an asynchronous error, or the timeout passes.
int wait_done(NcclRing& R, cudaEvent_t ev, int64_t timeout_ms, const std::string& what) {
  const nccl::Api& A = g_api;
  const int64_t start = now_ns();
  const int64_t deadline = start + std::min<int64_t>(timeout_ms, int64_t(1) << 40) * 1'000'000;
  const auto async_error = [&]() -> std::string {
    ncclResult_t state = kSuccess;
    const ncclResult_t e = A.comm_get_async_error(R.comm, &state);
    if (e != kSuccess) return "ncclCommGetAsyncError failed: " + nccl_error(A, e, R.comm);
    if (state != kSuccess && state != nccl::ncclInProgress)
      return "NCCL reported an asynchronous error: " + nccl_error(A, state, R.comm);
    return "";
  };
  for (;;) {
    const cudaError_t q = cudaEventQuery(ev);
    if (q == cudaSuccess) break;
    if (q != cudaErrorNotReady) return fail_run(R, what + ": CUDA error while waiting: " + cuda_error(q));
    const std::string err = async_error();
    if (!err.empty()) return fail_run(R, what + ": " + err);
    const int64_t t = now_ns();
    if (t >= deadline) {
      if (cudaEventQuery(ev) == cudaSuccess) break;
      return fail_run(R, what + " did not complete within " + std::to_string(timeout_ms) +
                             " ms: a peer died, stopped calling or is stuck");
    }
    // yield for the first 200 us (small calls finish within tens of us), then sleep
    // 10 us .. 1 ms: long calls cost a core little, and the timeout stays precise
    const int64_t waited = t - start;
    if (waited < 200'000) {
      sched_yield();
    } else {
      const int64_t ns = std::min<int64_t>(std::min<int64_t>(waited / 16, 1'000'000), deadline - t);
      timespec ts{0, long(std::max<int64_t>(ns, 10'000))};
      nanosleep(&ts, nullptr);
    }
  }
  const std::string err = async_error();  // a failure reported as the last kernel ended
  if (!err.empty()) return fail_run(R, what + ": " + err);
  return kNcclOk;
}

// ring_schedule.h's executor: the schedule as CUDA and NCCL calls. Records the first failure
// and issues nothing after it.
struct CudaExec {
  NcclRing& R;
  const nccl::Api& A;
  cudaStream_t user;
  char* data;
  int64_t esize;
  CombineLaunch launch;
  float w;
  std::string error;

  bool ok() const { return error.empty(); }
  cudaStream_t stream(ring::Stream s) const { return s == ring::kUser ? user : R.stream; }
  void check(cudaError_t e, const char* what) {
    if (e != cudaSuccess && ok()) error = std::string(what) + " failed: " + cuda_error(e);
  }
  char* at(int64_t off) const { return data + off * esize; }
  // the staging slot, at the same address mod 16 as the data it is combined into
  char* staging(int slot, int64_t off) const {
    return R.staging + slot * R.slot_stride + (reinterpret_cast<std::uintptr_t>(at(off)) & 15);
  }

  void record(ring::Stream s, ring::Event ev) {
    if (ok()) check(cudaEventRecord(R.events[ev], stream(s)), "cudaEventRecord");
  }
  void wait(ring::Stream s, ring::Event ev) {
    if (ok()) check(cudaStreamWaitEvent(stream(s), R.events[ev], 0), "cudaStreamWaitEvent");
  }
  void exchange(int64_t send_off, int64_t ns, int64_t recv_off, int64_t nr, int slot) {
    if (!ok()) return;
    ncclResult_t e = A.group_start();
    if (e != kSuccess) {
      error = "ncclGroupStart failed: " + nccl_error(A, e, R.comm);
      return;
    }
    const char* what = "ncclSend";
    if (ns > 0) e = A.send(at(send_off), size_t(ns * esize), nccl::ncclUint8, R.succ, R.comm, R.stream);
    if (e == kSuccess && nr > 0) {
      what = "ncclRecv";
      e = A.recv(slot < 0 ? at(recv_off) : staging(slot, recv_off), size_t(nr * esize), nccl::ncclUint8, R.pred,
                 R.comm, R.stream);
    }
    const ncclResult_t end = A.group_end();  // always: closes the group
    if (e != kSuccess) {
      error = std::string(what) + " failed: " + nccl_error(A, e, R.comm);
    } else if (end != kSuccess) {
      error = "ncclGroupEnd failed: " + nccl_error(A, end, R.comm);
    }
  }
  void combine(int slot, int64_t off, int64_t n, bool div) {
    if (ok()) check(launch(at(off), staging(slot, off), n, div, w, user), "the combine kernel launch");
  }
};

const char* kind_name(int kind) {
  switch (kind) {
    case ring::kAllReduce: return "all_reduce";
    case ring::kReduceScatter: return "reduce_scatter";
    case ring::kAllGather: return "all_gather";
    default: return "unknown";
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------

int nccl_load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_api_mu);
  if (g_api.lib != nullptr) return g_api.version;
  RINGFUSE_CHECK(!path.empty(), "nccl: library path is empty");
  dlerror();
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* e = dlerror();
    fail("ringfuse._C: nccl: cannot load '" + path + "': " + (e != nullptr ? e : "unknown dlopen error"));
  }
  nccl::Api a;
  a.lib = lib;
#define RINGFUSE_NCCL_LOOKUP(field, type, name)                                                   \
  a.field = reinterpret_cast<nccl::type>(dlsym(lib, name));                                       \
  if (a.field == nullptr) {                                                                       \
    dlclose(lib);                                                                                 \
    fail("ringfuse._C: nccl: '" + path + "' has no symbol " name " (not an NCCL library, or too old)"); \
  }
  RINGFUSE_NCCL_SYMBOLS(RINGFUSE_NCCL_LOOKUP)
#undef RINGFUSE_NCCL_LOOKUP
  a.get_last_error = reinterpret_cast<nccl::GetLastErrorFn>(dlsym(lib, "ncclGetLastError"));  // optional
  int v = 0;
  const ncclResult_t e = a.get_version(&v);
  if (e != kSuccess || v < nccl::kMinVersion) {
    dlclose(lib);
    fail("ringfuse._C: nccl: '" + path + "' is NCCL " + (e == kSuccess ? version_string(v) : "of unknown version") +
         "; the ring needs NCCL >= " + version_string(nccl::kMinVersion));
  }
  a.version = v;
  g_api = a;
  return v;
}

std::string nccl_unique_id() {
  const nccl::Api& A = api();
  nccl::ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  const ncclResult_t e = A.get_unique_id(&id);
  if (e != kSuccess) fail("ringfuse._C: nccl: ncclGetUniqueId failed: " + nccl_error(A, e));
  return std::string(id.internal, sizeof(id.internal));
}

int64_t nccl_comm_open(const std::string& unique_id, int rank, int world, int device, int64_t piece_bytes,
                       int64_t timeout_ms) {
  const nccl::Api& A = api();
  RINGFUSE_CHECK(unique_id.size() == size_t(nccl::kUniqueIdBytes),
                 "nccl ring: unique_id must have " + std::to_string(nccl::kUniqueIdBytes) + " bytes, got " +
                     std::to_string(unique_id.size()));
  RINGFUSE_CHECK(world >= 1, "nccl ring: world must be >= 1, got " + std::to_string(world));
  RINGFUSE_CHECK(rank >= 0 && rank < world, "nccl ring: rank must be in [0, world), got rank " + std::to_string(rank) +
                                                " world " + std::to_string(world));
  RINGFUSE_CHECK(device >= 0, "nccl ring: device must be >= 0, got " + std::to_string(device));
  RINGFUSE_CHECK(piece_bytes >= 4096 && piece_bytes % 256 == 0 && piece_bytes <= (int64_t(1) << 30),
                 "nccl ring: piece_bytes must be a multiple of 256 in [4096, 2^30], got " +
                     std::to_string(piece_bytes));
  RINGFUSE_CHECK(timeout_ms > 0, "nccl ring: timeout_ms must be > 0");

  DeviceGuard dev(device);
  if (dev.err != cudaSuccess)
    fail("ringfuse._C: nccl ring: cudaSetDevice(" + std::to_string(device) + ") failed: " + cuda_error(dev.err));
  auto R = std::make_unique<NcclRing>();
  R->rank = rank;
  R->world = world;
  R->device = device;
  R->succ = (rank + 1) % world;
  R->pred = (rank - 1 + world) % world;
  R->piece_bytes = piece_bytes;
  R->slot_stride = (piece_bytes + 16 + 255) / 256 * 256;  // + the alignment shift
  const auto bail = [&](const std::string& msg) {
    release(*R, true);
    fail("ringfuse._C: nccl ring: " + msg);
  };
  cudaError_t ce = cudaStreamCreateWithFlags(&R->stream, cudaStreamNonBlocking);
  if (ce != cudaSuccess) bail("cudaStreamCreate on cuda:" + std::to_string(device) + " failed: " + cuda_error(ce));
  for (cudaEvent_t& e : R->events) {
    ce = cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
    if (ce != cudaSuccess) bail("cudaEventCreate failed: " + cuda_error(ce));
  }
  ce = cudaMalloc(reinterpret_cast<void**>(&R->staging), size_t(2 * R->slot_stride));
  if (ce != cudaSuccess)
    bail("allocating " + std::to_string(2 * R->slot_stride) + " bytes of staging failed: " + cuda_error(ce));

  nccl::ncclUniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  const ncclResult_t e = A.comm_init_rank(&R->comm, world, id, rank);
  if (e != kSuccess) {
    R->comm = nullptr;
    bail("ncclCommInitRank(rank " + std::to_string(rank) + " of " + std::to_string(world) + ", cuda:" +
         std::to_string(device) + ") failed: " + nccl_error(A, e));
  }
  if (world > 1) {  // connect the ring now: one piece from every rank to the next
    ce = cudaMemsetAsync(R->staging, 0, size_t(2 * R->slot_stride), R->stream);
    std::string err = ce == cudaSuccess ? "" : "cudaMemsetAsync failed: " + cuda_error(ce);
    if (err.empty()) {
      ncclResult_t r1 = A.group_start();
      if (r1 == kSuccess) {
        r1 = A.send(R->staging, size_t(piece_bytes), nccl::ncclUint8, R->succ, R->comm, R->stream);
        if (r1 == kSuccess)
          r1 = A.recv(R->staging + R->slot_stride, size_t(piece_bytes), nccl::ncclUint8, R->pred, R->comm, R->stream);
        const ncclResult_t r2 = A.group_end();
        if (r1 == kSuccess) r1 = r2;
      }
      if (r1 != kSuccess) err = "connecting the ring failed: " + nccl_error(A, r1, R->comm);
    }
    if (err.empty()) {
      ce = cudaEventRecord(R->events[ring::kEvDone], R->stream);
      if (ce != cudaSuccess) err = "cudaEventRecord failed: " + cuda_error(ce);
    }
    if (!err.empty()) {
      A.comm_abort(R->comm);
      R->comm = nullptr;
      release(*R, false);
      fail("ringfuse._C: nccl ring: rank " + std::to_string(rank) + ": " + err);
    }
    if (wait_done(*R, R->events[ring::kEvDone], timeout_ms, "connecting the ring (rank " + std::to_string(R->pred) +
                                                                 " -> " + std::to_string(rank) + " -> " +
                                                                 std::to_string(R->succ) + ")") != kNcclOk) {
      const std::string msg = R->last_error;  // wait_done aborted the communicator
      release(*R, false);
      fail("ringfuse._C: nccl ring: " + msg);
    }
  }
  NcclRing* raw = R.release();
  std::lock_guard<std::mutex> lock(g_mu);
  g_rings.insert(raw);
  return reinterpret_cast<int64_t>(raw);
}

void nccl_comm_close(int64_t handle, bool abort) {
  auto* R = reinterpret_cast<NcclRing*>(handle);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    RINGFUSE_CHECK(g_rings.count(R) == 1, "nccl ring: invalid or already closed handle");
    RINGFUSE_CHECK(!R->busy, "nccl ring: close while a call is running on the handle");
    g_rings.erase(R);
  }
  DeviceGuard dev(R->device);
  const bool healthy = R->comm != nullptr && !R->broken;
  if (R->comm != nullptr) {
    if (abort || g_api.comm_destroy(R->comm) != kSuccess) g_api.comm_abort(R->comm);
    R->comm = nullptr;
  }
  release(*R, healthy);
  delete R;
}

std::string nccl_last_error(int64_t handle) { return lookup(handle).last_error; }

int nccl_ring_run(int64_t handle, int kind, std::uintptr_t data, int64_t numel, int dtype, int op,
                  std::uintptr_t stream, int64_t timeout_ms) {
  BusyGuard guard(handle);
  NcclRing& R = guard.R;
  const int N = R.world;
  RINGFUSE_CHECK(kind == ring::kAllReduce || kind == ring::kReduceScatter || kind == ring::kAllGather,
                 "nccl ring: kind must be 0 (all_reduce), 1 (reduce_scatter) or 2 (all_gather), got " +
                     std::to_string(kind));
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16 || dtype == kInt32 || dtype == kInt64,
                 std::string("nccl ring: dtype must be float32, float16, bfloat16, int32 or int64, got ") +
                     dtype_name(dtype));
  if (kind == ring::kAllGather) op = ring::kSum;  // ignored
  RINGFUSE_CHECK(op >= ring::kSum && op <= ring::kMin,
                 "nccl ring: op must be 0 (sum), 1 (avg), 2 (max) or 3 (min), got " + std::to_string(op));
  const bool is_float = dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16;
  RINGFUSE_CHECK(op != ring::kAvg || is_float,
                 std::string("nccl ring: avg needs a float dtype, got ") + dtype_name(dtype));
  RINGFUSE_CHECK(numel >= 0, "nccl ring: numel must be >= 0");
  RINGFUSE_CHECK(data != 0 || numel == 0, "nccl ring: data is null");
  RINGFUSE_CHECK(kind == ring::kAllReduce || numel % N == 0,
                 std::string("nccl ring: ") + kind_name(kind) + " needs numel divisible by world, got numel " +
                     std::to_string(numel) + " world " + std::to_string(N));
  RINGFUSE_CHECK(timeout_ms > 0, "nccl ring: timeout_ms must be > 0");
  const int64_t esize = dtype == kInt64 ? 8 : (dtype == kFloat16 || dtype == kBFloat16) ? 2 : 4;
  RINGFUSE_CHECK(data % uintptr_t(esize) == 0, "nccl ring: data is not aligned to its element size");

  if (R.broken) {
    if (R.last_error.rfind("communicator is broken", 0) != 0)
      R.last_error = "communicator is broken by an earlier failure: " + R.last_error;
    return kNcclBroken;
  }
  const uint64_t call = ++R.calls;
  if (N == 1 || numel == 0) return kNcclOk;  // world 1: sum, avg (x / 1), max, min are the identity

  DeviceGuard dev(R.device);
  if (dev.err != cudaSuccess)
    return fail_run(R, "cudaSetDevice(" + std::to_string(R.device) + ") failed: " + cuda_error(dev.err));
  // what would corrupt memory: data must live on the communicator's device, and the stream too
  cudaPointerAttributes attr;
  const cudaError_t pe = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(data));
  if (pe != cudaSuccess) cudaGetLastError();  // not sticky: clear it
  RINGFUSE_CHECK(pe == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) &&
                     attr.device == R.device,
                 "nccl ring: data must be device memory of cuda:" + std::to_string(R.device) +
                     " (the communicator's device)" +
                     (pe != cudaSuccess ? ": " + cuda_error(pe)
                                        : ", got memory type " + std::to_string(int(attr.type)) + " on device " +
                                              std::to_string(attr.device)));
#if CUDART_VERSION >= 12080
  if (stream != 0) {
    int sdev = -1;
    const cudaError_t se = cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &sdev);
    if (se != cudaSuccess) cudaGetLastError();
    RINGFUSE_CHECK(se == cudaSuccess && sdev == R.device,
                   "nccl ring: the stream must belong to cuda:" + std::to_string(R.device) +
                       (se != cudaSuccess ? ": " + cuda_error(se) : ", it belongs to cuda:" + std::to_string(sdev)));
  }
#endif

  ring::Plan plan;
  plan.kind = kind;
  plan.rank = R.rank;
  plan.world = N;
  plan.avg = op == ring::kAvg;
  plan.numel = numel;
  plan.piece = R.piece_bytes / esize;
  CudaExec x{R, g_api, reinterpret_cast<cudaStream_t>(stream), reinterpret_cast<char*>(data), esize,
             pick_combine(dtype, op), float(N), {}};
  const std::string what = std::string(kind_name(kind)) + " call " + std::to_string(call) + " (" +
                           std::to_string(numel) + " x " + dtype_name(dtype) + ")";
  ring::emit_ring(plan, x);
  if (!x.ok()) return fail_run(R, what + ": " + x.error);
  return wait_done(R, R.events[ring::kEvDone], timeout_ms, what);
}

}  // namespace ringfuse::cuda
