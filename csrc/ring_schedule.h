// The NCCL transport's ring schedule and element math, kept free of CUDA and NCCL so that
// one copy serves both csrc/cuda/allreduce.cu (which replays the schedule as CUDA / NCCL
// calls and compiles the element math into its combine kernel) and a host-only simulator
// (tests/distributed/nccl_schedule_sim.cpp: every rank's schedule checked for matching
// sends / receives, for races between the two streams, and for bitwise results, without a
// GPU).
//
// Schedule: the CPU ring's (csrc/cpu/allreduce.cpp). data [numel] is split into N chunks
// (all_reduce: the first numel % N one element longer; reduce_scatter / all_gather: equal).
// Reduce-scatter step s (0 .. N-2): rank r sends chunk (r-s-1) mod N to r+1 and receives
// chunk (r-s-2) mod N from r-1 into a staging buffer, then data[chunk] = op(received, local)
// (fp16 / bf16 in fp32, rounded to the dtype each step; avg: the owner's last step rounds
// the sum and divides it by N once). All-gather step s: send chunk (r-s) mod N, receive
// chunk (r-s-1) mod N straight into data. Chunk c is thus reduced in the fixed order
// ((x_{c+1} op x_{c+2}) op ...) op x_c on every rank and by every transport.
//
// Streams: NCCL runs on the communicator's own stream (kComm), the combine kernels on the
// caller's stream (kUser), so that the send / receive of piece p+1 overlaps the combine of
// piece p. Reduce-scatter steps go in pieces of `piece` elements (step-major: every piece
// of step s, then step s+1), alternating between two staging slots. Operation g (the g-th
// (step, piece) pair) receives into slot g % 2, which combine g-2 read last, and sends the
// piece combine g-P wrote (P pieces per step: the same piece one step earlier); combines
// run in order on kUser, so waiting for combine max(g-2, g-P) = (P == 1 ? g-1 : g-2) covers
// both. Two events (kEvRed0 / kEvRed1, recorded after combine g into kEvRed{g % 2}) are
// enough: the wait for combine g-2 is enqueued before combine g re-records its event.
// All-gather steps move whole chunks (nothing to overlap) after the last combine.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define RF_RING_HD __host__ __device__ __forceinline__
#else
#define RF_RING_HD inline
#endif

namespace ringfuse::ring {

// Codes of csrc/cpu/allreduce.h (ShmRingKind / ShmRingOp); allreduce.cu static_asserts it.
enum Kind : int { kAllReduce = 0, kReduceScatter = 1, kAllGather = 2 };
enum Op : int { kSum = 0, kAvg = 1, kMax = 2, kMin = 3 };

// ---------------------------------------------------------------------------------------
// Element math: the same results as the CPU ring's AVX2 path, bit for bit (NaN payloads
// aside: max / min return received + local when either is NaN, as the CPU ring does, and
// that NaN's payload is the hardware's).

RF_RING_HD uint32_t f32_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

RF_RING_HD float f32_from_bits(uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

RF_RING_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// Round to nearest even; NaN -> 0x7fc0 (csrc/cpu/vec.h f32x8_to_bf16_lanes).
RF_RING_HD uint16_t f32_to_bf16(float v) {
  if (v != v) return 0x7fc0;
  const uint32_t u = f32_bits(v);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <int OP>
RF_RING_HD float fop(float a, float b) {
  if constexpr (OP == kMax) {
    if (a != a || b != b) return a + b;  // NaN propagates
    return a > b ? a : b;                // b on equality (+0 / -0), like maxps
  } else if constexpr (OP == kMin) {
    if (a != a || b != b) return a + b;
    return a < b ? a : b;
  } else {
    return a + b;  // sum and avg
  }
}

template <class T, int OP>
RF_RING_HD T iop(T a, T b) {
  if constexpr (OP == kMax) {
    return a > b ? a : b;
  } else if constexpr (OP == kMin) {
    return a < b ? a : b;
  } else {
    using U = std::make_unsigned_t<T>;
    return T(U(a) + U(b));  // two's complement wrap
  }
}

// Element types: T (storage), kFloat, load / store / round for floats.
struct F32 {
  using T = float;
  static constexpr bool kFloat = true;
  RF_RING_HD static float load(T v) { return v; }
  RF_RING_HD static T store(float v) { return v; }
  RF_RING_HD static float round(float v) { return v; }
};

struct BF16 {
  using T = uint16_t;
  static constexpr bool kFloat = true;
  RF_RING_HD static float load(T v) { return bf16_to_f32(v); }
  RF_RING_HD static T store(float v) { return f32_to_bf16(v); }
  RF_RING_HD static float round(float v) { return bf16_to_f32(f32_to_bf16(v)); }
};

template <class I>
struct Int {
  using T = I;
  static constexpr bool kFloat = false;
};

// One element of a combine: op(received, local); avg (div) on the owner's last step: the
// sum rounded to the dtype, divided by w = N (IEEE division: no fast math anywhere).
template <class E, int OP>
RF_RING_HD typename E::T combine(typename E::T received, typename E::T local, bool div, float w) {
  if constexpr (E::kFloat) {
    float r = fop<OP>(E::load(received), E::load(local));
    if (div) r = E::round(r) / w;
    return E::store(r);
  } else {
    return iop<typename E::T, OP>(received, local);
  }
}

// ---------------------------------------------------------------------------------------
// The schedule

enum Stream : int { kUser = 0, kComm = 1 };
enum Event : int { kEvStart = 0, kEvRecv, kEvRed0, kEvRed1, kEvCommDone, kEvDone, kNumEvents };

struct Plan {
  int kind = kAllReduce;
  int rank = 0, world = 1;
  bool avg = false;
  int64_t numel = 0;
  int64_t piece = 1;  // elements per reduce-scatter piece (> 0)
};

struct Chunks {
  int64_t base, rem;
  explicit Chunks(const Plan& p) : base(p.numel / p.world), rem(p.kind == kAllReduce ? p.numel % p.world : 0) {}
  int64_t start(int c) const { return int64_t(c) * base + std::min<int64_t>(c, rem); }
  int64_t len(int c) const { return base + (c < rem ? 1 : 0); }
  int64_t max_len() const { return base + (rem > 0 ? 1 : 0); }
};

// Replays the ring of `p` (world >= 2, numel >= 1) through X, whose members are
//   record(Stream, Event)          cudaEventRecord
//   wait(Stream, Event)            cudaStreamWaitEvent (the event's latest record)
//   exchange(send_off, send_n, recv_off, recv_n, slot)
//       on kComm, one NCCL group: send data[send_off, +send_n) to rank + 1 and receive
//       recv_n elements from rank - 1, into staging slot `slot` (0 / 1: to be combined into
//       data[recv_off, +recv_n)) or, for slot < 0, into data[recv_off, +recv_n) itself;
//       a count of 0 means no send (no receive); never both 0
//   combine(slot, off, n, div)     on kUser: data[off, +n) = op(slot, data[off, +n)) (/ N)
// Offsets and counts are in elements. X stops issuing work after its first failure.
template <class X>
void emit_ring(const Plan& p, X& x) {
  const int N = p.world, r = p.rank;
  const Chunks ch(p);
  const auto mod = [N](int v) { return ((v % N) + N) % N; };
  const auto red_event = [](int64_t g) { return g % 2 ? kEvRed1 : kEvRed0; };

  x.record(kUser, kEvStart);  // the caller's work on data comes first
  x.wait(kComm, kEvStart);
  int64_t g = 0;  // (step, piece) operations so far
  if (p.kind != kAllGather) {
    const int64_t P = (ch.max_len() + p.piece - 1) / p.piece;  // pieces per step
    for (int s = 0; s < N - 1; ++s) {
      const int cs = mod(r - s - 1), cr = mod(r - s - 2);
      for (int64_t q = 0; q < P; ++q, ++g) {
        const int64_t off = q * p.piece;
        const int64_t ns = std::clamp<int64_t>(ch.len(cs) - off, 0, p.piece);
        const int64_t nr = std::clamp<int64_t>(ch.len(cr) - off, 0, p.piece);
        const int64_t need = P == 1 ? g - 1 : g - 2;  // combine that frees slot g % 2 and wrote the send
        if (need >= 0) x.wait(kComm, red_event(need));
        if (ns > 0 || nr > 0) {
          x.exchange(ch.start(cs) + off, ns, ch.start(cr) + off, nr, int(g % 2));
          x.record(kComm, kEvRecv);
          x.wait(kUser, kEvRecv);
        }
        if (nr > 0) x.combine(int(g % 2), ch.start(cr) + off, nr, p.avg && s == N - 2);
        x.record(kUser, red_event(g));
      }
    }
  }
  if (p.kind != kReduceScatter) {
    if (g > 0) x.wait(kComm, red_event(g - 1));  // every combine done: chunk r is final
    for (int s = 0; s < N - 1; ++s) {
      const int cs = mod(r - s), cr = mod(r - s - 1);
      if (ch.len(cs) > 0 || ch.len(cr) > 0) x.exchange(ch.start(cs), ch.len(cs), ch.start(cr), ch.len(cr), -1);
    }
  }
  x.record(kComm, kEvCommDone);  // the caller's stream continues after the last receive,
  x.wait(kUser, kEvCommDone);
  x.record(kUser, kEvDone);  // which the host polls for completion (timeout),
  x.wait(kComm, kEvDone);    // and the next call's NCCL work waits for this call's combines
}

}  // namespace ringfuse::ring
