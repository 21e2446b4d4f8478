// A CPU emulator of the CUDA execution model, enough to run ringfuse's CUDA C++ kernels
// (csrc/cuda) in CI, which has no GPU; built and wrapped by tests/cuda_emu/build.py.
//
// Blocks run one after another; a block's threads are cooperative fibers on one OS thread
// (x86-64 only: a 14-instruction stack switch, emu_switch in entry.cpp; ucontext's
// swapcontext makes two system calls per switch, which made the tests 5x slower). A fiber
// runs until it reaches a warp barrier (either half of a warp shuffle),
// a block barrier (__syncthreads) or its end. The scheduler advances one warp at a time,
// picked at random (seeded) among the warps not waiting at the block barrier, so warps
// interleave between barriers as they may on a device: a kernel that reads shared memory
// another warp has not written yet, or overwrites what it still reads, gets different
// results from run to run (and shared memory is filled with NaN bytes before each block).
// Checked, because the device would hang or misbehave: the lanes of a warp reach the same
// shuffles, and all threads of a block the same __syncthreads (none skips one by exiting).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
// __shared__ declarations are rewritten before compilation (build.py) to static storage
// registered with emu::shared, which poisons it before every block.

namespace emu {

enum class Wait { kNone, kWarp, kBlock, kDone };

// emu_switch(&save, to): saves the callee-saved registers and the stack pointer into save,
// then resumes the stack `to` (a fiber's, or the scheduler's) where it last switched.
extern "C" void emu_switch(void** save, void* to);

struct Fiber {
  void* sp = nullptr;
  std::vector<char> stack;
  uint3 idx;
  Wait wait = Wait::kNone;
  long block_barriers = 0;
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  std::function<void()> body;
  std::vector<uint32_t> exchange;  // one slot per thread: warp shuffles
  std::mt19937 rng{12345};
  std::string error;               // first emulation error (thrown after the block)
};

inline Launch& state() {
  static Launch s;
  return s;
}

inline void yield_to_scheduler(Wait why) {
  Launch& s = state();
  Fiber* f = s.cur;
  f->wait = why;
  if (why == Wait::kBlock) ++f->block_barriers;
  emu_switch(&f->sp, s.sched_sp);
}

[[noreturn]] inline void fiber_main() {
  Launch& s = state();
  s.body();
  s.cur->wait = Wait::kDone;
  emu_switch(&s.cur->sp, s.sched_sp);  // never resumed
  __builtin_unreachable();
}

// A fresh fiber's stack: emu_switch pops six registers and returns into fiber_main, which
// then sees the stack alignment of a function entry (rsp = 8 mod 16).
inline void* initial_sp(std::vector<char>& stack) {
  auto top = (reinterpret_cast<std::uintptr_t>(stack.data()) + stack.size()) & ~std::uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                   // fiber_main's (unused) return address
  *--sp = reinterpret_cast<void*>(&fiber_main);      // emu_switch's ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
  return sp;
}

inline unsigned linear_tid() {
  const Launch& s = state();
  const uint3 i = s.cur->idx;
  return i.x + s.block.x * (i.y + s.block.y * i.z);
}

inline void fail(Launch& s, const std::string& what) {
  if (s.error.empty()) s.error = what;
}

// Runs the live lanes of warp w until each reaches a barrier or ends; an error when some
// lanes wait at a shuffle and others do not.
inline void step_warp(Launch& s, size_t w) {
  const size_t lo = w * 32, hi = std::min(s.fibers.size(), lo + 32);
  for (size_t t = lo; t < hi; ++t) {
    Fiber& f = s.fibers[t];
    if (f.wait == Wait::kDone) continue;
    s.cur = &f;
    f.wait = Wait::kNone;
    emu_switch(&s.sched_sp, f.sp);
  }
  bool shuffle = false, other = false;
  for (size_t t = lo; t < hi; ++t) (s.fibers[t].wait == Wait::kWarp ? shuffle : other) = true;
  if (shuffle && other) fail(s, "lanes of a warp diverge at a warp shuffle");
}

template <class F>
void run_block(Launch& s, F&& kernel_call) {
  s.body = kernel_call;
  const unsigned n = s.block.x * s.block.y * s.block.z;
  s.fibers.resize(n);
  s.exchange.assign(n, 0u);
  constexpr size_t kStack = 256 * 1024;
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    f.stack.resize(kStack);
    f.idx = make_uint3(t % s.block.x, (t / s.block.x) % s.block.y, t / (s.block.x * s.block.y));
    f.wait = Wait::kNone;
    f.block_barriers = 0;
    f.sp = initial_sp(f.stack);
  }
  const size_t warps = (n + 31) / 32;
  std::vector<size_t> ready;
  for (;;) {
    ready.clear();
    bool live = false;
    for (size_t w = 0; w < warps; ++w) {
      bool runnable = false;
      for (size_t t = w * 32; t < std::min<size_t>(n, w * 32 + 32); ++t) {
        const Wait st = s.fibers[t].wait;
        live |= st != Wait::kDone;
        runnable |= st == Wait::kNone || st == Wait::kWarp;
      }
      if (runnable) ready.push_back(w);
    }
    if (!live || !s.error.empty()) break;
    if (ready.empty()) {  // every live thread waits at __syncthreads: release them
      long count = -1;
      for (Fiber& f : s.fibers) {
        if (f.wait == Wait::kDone) continue;
        if (count >= 0 && f.block_barriers != count)
          fail(s, "threads of a block wait at different __syncthreads (divergent barrier)");
        count = f.block_barriers;
        f.wait = Wait::kNone;
      }
      for (const Fiber& f : s.fibers)
        if (f.wait == Wait::kDone && f.block_barriers < count)
          fail(s, "threads of a block exited before a __syncthreads the others wait at");
      continue;
    }
    step_warp(s, ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(s.rng)]);
  }
  s.cur = nullptr;
}

// The __shared__ arrays met so far (address, bytes), poisoned before every block.
inline std::vector<std::pair<void*, size_t>>& shared_regions() {
  static std::vector<std::pair<void*, size_t>> r;
  return r;
}

template <class Kernel>
struct Launcher {
  Kernel* kernel;
  dim3 grid, block;
  template <class... Args>
  void operator()(Args... args) const {
    Launch& s = state();
    s.grid = grid;
    s.block = block;
    s.error.clear();
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          for (auto& r : shared_regions()) std::memset(r.first, 0xff, r.second);  // NaN
          s.block_idx = make_uint3(x, y, z);
          run_block(s, [&] { kernel(args...); });
          if (!s.error.empty()) throw std::runtime_error("cuda_emu: " + s.error);
        }
  }
};

// kernel<<<grid, block, smem, stream>>>(args) is rewritten to
// ::emu::launch(kernel, grid, block, smem, stream)(args) before compilation.
template <class Kernel>
Launcher<Kernel> launch(Kernel* k, dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return {k, grid, block};
}

// Registers a __shared__ array for poisoning; returns its address unchanged.
template <class T>
T& shared(T& v) {
  auto& r = shared_regions();
  for (auto& e : r)
    if (e.first == static_cast<void*>(&v)) return v;
  r.emplace_back(static_cast<void*>(&v), sizeof(T));
  std::memset(&v, 0xff, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::state().cur->idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block)
#define gridDim (::emu::state().grid)

inline void __syncthreads() { ::emu::yield_to_scheduler(::emu::Wait::kBlock); }

// The 32 lanes of the warp take part (mask 0xffffffff; emu checks they all arrive):
// publish, warp barrier, read the partner's slot, warp barrier (before the slot is reused).
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  ::emu::Launch& s = ::emu::state();
  const unsigned me = ::emu::linear_tid();
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  s.exchange[me] = bits;
  ::emu::yield_to_scheduler(::emu::Wait::kWarp);
  const unsigned partner = (me & ~31u) | ((me & 31u) ^ unsigned(lane_mask));
  bits = partner < s.exchange.size() ? s.exchange[partner] : bits;
  ::emu::yield_to_scheduler(::emu::Wait::kWarp);
  T r;
  std::memcpy(&r, &bits, 4);
  return r;
}

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Runtime API: cudaGetLastError & co. are declared by the real cuda_runtime_api.h (pulled
// in by cuda_fp16.h) and defined in entry.cpp: emulated launches never fail.
