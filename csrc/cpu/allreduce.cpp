// Ring all-reduce, reduce-scatter and all-gather between CPU processes on one host, over one
// POSIX shared-memory segment per group (the CPU transport, ARCHITECTURE.md "Distributed").
//
// Schedule (the classic ring; rank r receives from r-1 and sends to r+1, mod N):
//   data [numel] is split into N chunks (the first numel % N one element longer) and every
//   chunk into pieces of `piece` bytes; piece p of every chunk goes through the whole ring
//   (reduce-scatter N-1 steps, then all-gather N-1 steps) before piece p+1 starts, so
//   consecutive pieces pipeline across the ring (NCCL's slice loop). At reduce-scatter step
//   s rank r sends chunk (r-s-1) and receives chunk (r-s-2) = what it sends at step s+1, so
//   the combine is fused with the send: out = reduce(received partial, local) is written
//   straight into r's outgoing buffer; the last step writes the reduced chunk r into data
//   (and, for all_reduce, into the outgoing buffer: all-gather step 0). All-gather steps
//   copy the received piece into data and into the outgoing buffer in one pass. Chunk c is
//   reduced in the fixed order ((x_{c+1} op x_{c+2}) op x_{c+3}) ... op x_c, the partial
//   travelling in the tensor's dtype (fp16/bf16: each step upcasts both to fp32, combines,
//   rounds to nearest even), so results are bitwise identical on every rank and run. avg is
//   the rounded sum divided by N (in fp32 for fp16/bf16), once, by the chunk's owner.
//
// Segment layout (offsets from the mapping; every counter has its own 64-byte line):
//   [0, 1024)       SegHeader: magic (written last by the creator), version, world,
//                   slot_bytes, piece_bytes, nbuf, layout offsets; the abort line (status,
//                   reporting rank, message) set by the first rank that fails
//   [1024, ...)     RankBlock[world], 256 B each: info (pid, pid namespace, attached/closed),
//                   call (call sequence number + the call's (kind, numel, dtype, op) for the
//                   handshake, two records indexed by seq & 1), sent (messages this rank
//                   has written into its ring), acked (messages it has consumed from its
//                   predecessor's ring)
//   ring_offset + r * ring_stride: rank r's outgoing area, 2 * slot_bytes (the two
//                   double-buffer slots) used as a ring of nbuf = 2 * slot_bytes / piece
//                   piece buffers; message m goes into buffer m % nbuf.
// Flow control per link r -> r+1: r waits until r+1 acked message m - nbuf, writes buffer
// m % nbuf, then publishes sent = m + 1 (release); r+1 waits sent >= m + 1 (acquire), reads,
// publishes acked = m + 1. Every rank sends and receives the same number of messages per call
// (empty pieces of short chunks still travel as zero-length messages), so the per-link
// counters stay in step across calls. Waits spin a few _mm_pause, then sched_yield for up to
// 1 ms (on this 2-core box with 3-4 ranks, yielding hands the core to the peer we wait on:
// 4 B latency at world 3 goes from ~130 us with a 20 us pause-spin + sleep to ~11 us), then
// sleep in futex waits of at most 10 ms (the writer wakes only when a waiter flagged itself),
// checking the deadline, the abort line and the peer's liveness (kill(pid, 0),
// /proc/<pid>/stat for zombies, the closed flag) on the way.
//
// Handshake: every call first publishes (seq, kind, numel, dtype, op) and waits until every
// rank has published the same seq, then compares all records: a mismatch is seen by every
// rank before any data moves, and the handle stays usable (see the mismatch return). A
// rank can be at most one call ahead of another (call seq + 2 needs everybody's seq + 1),
// so record seq & 1 is stable while it is read.
//
// Napkin math (N ranks, S bytes per rank, all_reduce): each rank writes 2 (N-1)/N S into
// its shared-memory buffers and reads as much from its predecessor's, plus one read and one
// write of its S bytes of data (the combine reads data in place, the owner and the
// all-gather write it). The buffers are reused every nbuf pieces, so that traffic stays in
// cache: a piece is written on one core and read on the other through L2/L3 (copy within
// L3 ~124 GB/s, L2 ~174 GB/s on a 2-core EPYC VM). The data is what goes to DRAM once S is
// past the caches: 2 ranks x 2 S. 2 ranks, 64 MiB fp32: 256 MiB of DRAM traffic, ~12 ms at
// 22 GB/s of DRAM bandwidth, ~4 ms at the 62 GB/s `ringfuse bench limits` measured on this VM when
// the measured 4.5-5 ms were taken (busbw 13-15 GB/s). Pieces are 64 KiB: a rank's
// pieces in flight (its outgoing piece, the predecessor's incoming piece, the data piece) are
// ~200 KiB, well inside the 512 KiB-1 MiB L2 per core, so every byte is touched from L1/L2
// once it arrived, and each ~3 us piece pays one ~0.1-0.5 us hand-off; 32 KiB-1 MiB
// pieces measured the same within this VM's noise. Small messages (4 B .. 4 KiB) are bound by the
// handshake plus 2 (N-1) hand-offs between cores: ~0.6-0.9 us per call from Python with
// 2 ranks (gloo: ~200 us).
#include "cpu/allreduce.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <unordered_set>

#include "cpu/vec.h"
#include "ring_schedule.h"  // the element math shared with the NCCL ring (ring::fop / ring::iop)

namespace ringfuse::cpu {
namespace {

constexpr uint64_t kMagic = 0x474e495246524853ull;  // "SHRFRING"
constexpr uint32_t kVersion = 1;
constexpr int kMaxWorld = 64;
constexpr int64_t kPieceBytes = 64 << 10;       // pipelining piece (capped by slot_bytes)
constexpr int kSpinIters = 64;                  // _mm_pause spins before yielding
constexpr int64_t kYieldNs = 1'000'000;         // sched_yield this long before sleeping
constexpr int64_t kSleepNs = 10'000'000;        // longest single futex sleep (liveness period)
constexpr int64_t kAttachWaitNs = 2'000'000'000;  // attach: wait for the creator's header
constexpr int64_t kParallelMinBytes = 64 << 10;  // OpenMP only for whole pieces

// ---------------------------------------------------------------------------------------
// Shared layout

struct alignas(64) CounterLine {
  uint64_t value;    // monotonic; written by one rank (release), read by others (acquire)
  uint32_t waiters;  // readers sleeping in futex on `value`
  uint32_t pad0;
  char pad[48];
};
static_assert(sizeof(CounterLine) == 64, "one line per counter");

struct CallRec {
  int32_t kind, dtype, op, pad;
  int64_t numel;
};

struct alignas(64) CallLine {
  uint64_t value;  // last call sequence number this rank published
  uint32_t waiters;
  uint32_t pad0;
  CallRec rec[2];  // rec[seq & 1]: the arguments of call seq
};
static_assert(sizeof(CallLine) == 64, "one line");

enum : uint32_t { kFree = 0, kAttached = 1, kClosed = 2 };

struct alignas(64) InfoLine {
  int32_t pid;
  uint32_t state;  // kFree / kAttached / kClosed
  uint64_t pidns;  // inode of /proc/self/ns/pid (0: unknown): pids compared only within one
  char pad[48];
};

struct RankBlock {
  InfoLine info;
  CallLine call;
  CounterLine sent;
  CounterLine acked;
};
static_assert(sizeof(RankBlock) == 256, "rank block");

struct alignas(64) AbortLine {
  uint32_t state;  // 0 none, 1 being written, 2 published
  int32_t status;
  int32_t rank;  // the rank that detected the failure
  uint32_t pad0;
  char msg[240];
};

struct alignas(64) SegHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t world;
  uint64_t slot_bytes;
  uint64_t piece_bytes;
  uint64_t nbuf;
  uint64_t blocks_offset;
  uint64_t ring_offset;
  uint64_t ring_stride;
  uint64_t total_bytes;
  AbortLine abort;
};
static_assert(sizeof(SegHeader) <= 1024, "header fits its page");

constexpr uint64_t kBlocksOffset = 1024;

uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

struct Layout {
  uint64_t ring_offset, ring_stride, total, piece, nbuf;
  Layout(int world, int64_t slot_bytes) {
    ring_offset = round_up(kBlocksOffset + uint64_t(world) * sizeof(RankBlock), 4096);
    ring_stride = round_up(2 * uint64_t(slot_bytes), 4096);
    total = ring_offset + uint64_t(world) * ring_stride;
    piece = uint64_t(std::min<int64_t>(slot_bytes, kPieceBytes)) / 64 * 64;
    nbuf = 2 * uint64_t(slot_bytes) / piece;
  }
};

// ---------------------------------------------------------------------------------------
// Process-local handle

struct Ring {
  std::string name;
  uint8_t* base = nullptr;
  size_t bytes = 0;
  int rank = 0, world = 1;
  SegHeader* hdr = nullptr;
  RankBlock* blocks = nullptr;
  uint64_t ring_offset = 0, ring_stride = 0, piece = 0, nbuf = 0;
  uint64_t pidns = 0;
  // per-link message counters (mirrors of this rank's sent / acked lines)
  uint64_t call_seq = 0, sent = 0, recvd = 0;
  uint64_t pred_sent_seen = 0, succ_acked_seen = 0;  // last values read from the neighbours
  bool broken = false;
  bool busy = false;  // inside shm_ring_run (guarded by g_mu): no concurrent call or close
  std::string last_error;
  // the current call, for messages
  int cur_kind = 0;

  uint8_t* ring(int r) const { return base + ring_offset + uint64_t(r) * ring_stride; }
};

std::mutex g_mu;
std::unordered_set<Ring*> g_rings;

Ring& lookup(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mu);
  Ring* r = reinterpret_cast<Ring*>(handle);
  RINGFUSE_CHECK(g_rings.count(r) != 0, "shm ring: invalid or closed handle");
  return *r;
}

// Marks a handle busy for one shm_ring_run: a second concurrent call or a close throws.
struct BusyGuard {
  Ring& R;
  explicit BusyGuard(int64_t handle) : R(lookup(handle)) {
    std::lock_guard<std::mutex> lock(g_mu);
    RINGFUSE_CHECK(!R.busy, "shm ring: concurrent calls on one handle");
    R.busy = true;
  }
  ~BusyGuard() {
    std::lock_guard<std::mutex> lock(g_mu);
    R.busy = false;
  }
};

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

uint64_t self_pidns() {
  struct stat st;
  if (stat("/proc/self/ns/pid", &st) != 0) return 0;
  return uint64_t(st.st_ino) | 1;  // never 0 when known
}

template <class T>
T load_acquire(const T* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

void futex_wake_all(uint64_t* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

// Publish a counter value: a full-barrier store (release for the data written before it),
// then wake sleepers if any flagged themselves (Dekker with the reader's waiters increment).
void publish(uint64_t* value, uint32_t* waiters, uint64_t v) {
  __atomic_store_n(value, v, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(waiters, __ATOMIC_SEQ_CST) != 0) futex_wake_all(value);
}

const char* kind_name(int kind) {
  switch (kind) {
    case kShmAllReduce: return "all_reduce";
    case kShmReduceScatter: return "reduce_scatter";
    case kShmAllGather: return "all_gather";
    default: return "unknown";
  }
}

const char* op_name(int op) {
  switch (op) {
    case kShmSum: return "sum";
    case kShmAvg: return "avg";
    case kShmMax: return "max";
    case kShmMin: return "min";
    default: return "unknown";
  }
}

std::string describe_rank(const Ring& R, int who) {
  const int pid = load_acquire(&R.blocks[who].info.pid);
  if (pid <= 0) return "rank " + std::to_string(who) + " (not attached)";
  return "rank " + std::to_string(who) + " (pid " + std::to_string(pid) + ")";
}

// 0: alive (or cannot tell), 1: exited, 2: closed its handle.
int peer_state(const Ring& R, int who) {
  const InfoLine& inf = R.blocks[who].info;
  if (load_acquire(&inf.state) == kClosed) return 2;
  const int pid = load_acquire(&inf.pid);
  if (pid <= 0 || R.pidns == 0 || load_acquire(&inf.pidns) != R.pidns) return 0;
  if (kill(pid, 0) != 0 && errno == ESRCH) return 1;
  // an exited child that its parent has not reaped yet still answers kill(): a zombie
  char path[64], buf[512];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno == ENOENT ? 1 : 0;
  const ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  const char* paren = std::strrchr(buf, ')');
  if (paren != nullptr && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X')) return 1;
  return 0;
}

// Record a failure of this rank: the handle is broken, and the first failing rank tells
// every other rank through the abort line (so nobody waits for the full timeout on a rank
// that has already given up).
int fail_call(Ring& R, int status, const std::string& msg) {
  R.broken = true;
  R.last_error = msg;
  AbortLine& a = R.hdr->abort;
  uint32_t expected = 0;
  if (__atomic_compare_exchange_n(&a.state, &expected, 1u, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    a.status = status;
    a.rank = R.rank;
    std::snprintf(a.msg, sizeof(a.msg), "%s", msg.c_str());
    __atomic_store_n(&a.state, 2u, __ATOMIC_RELEASE);
  }
  return status;
}

// The abort line, if another rank published a failure: its status (else 0).
int check_abort(Ring& R) {
  AbortLine& a = R.hdr->abort;
  if (load_acquire(&a.state) != 2) return 0;
  R.broken = true;
  char msg[sizeof(a.msg) + 1];
  std::memcpy(msg, a.msg, sizeof(a.msg));
  msg[sizeof(a.msg)] = 0;
  R.last_error = std::string(msg);  // names the rank that detected it
  return a.status;
}

// Wait until *value >= target; rank `who` advances it. deadline 0: now + timeout on the
// first miss. Returns 0 or a status (with R.last_error set).
int wait_ge(Ring& R, uint64_t* value, uint32_t* waiters, uint64_t target, int who, int64_t timeout_ns,
            int64_t deadline, const char* what) {
  if (load_acquire(value) >= target) return 0;
  // spin briefly: a peer on another core is often well under a microsecond away
  for (int i = 0; i < kSpinIters; ++i) {
    _mm_pause();
    if (load_acquire(value) >= target) return 0;
  }
  // then yield: with more ranks than cores (or another process on ours) the peer we wait on
  // may need this core; sched_yield hands it over at once, where spinning would starve it
  // and a futex sleep would add a wake-up latency to every hand-off
  const int64_t start = now_ns();
  if (deadline == 0) deadline = start + timeout_ns;
  for (int k = 0;; ++k) {
    sched_yield();
    if (load_acquire(value) >= target) return 0;
    if ((k & 15) == 15) {
      if (load_acquire(&R.hdr->abort.state) == 2) return check_abort(R);
      if (now_ns() - start > kYieldNs) break;
    }
  }
  // sleep: futex waits of at most kSleepNs, checking the deadline, aborts and liveness
  const auto context = [&] {
    return std::string(" (rank ") + std::to_string(R.rank) + " waiting for its " + what + " in " +
           kind_name(R.cur_kind) + " call " + std::to_string(R.call_seq) + ")";
  };
  for (;;) {
    const int64_t t = now_ns();
    if (const int s = check_abort(R)) return s;
    const int gone = peer_state(R, who);
    if (gone != 0) {
      if (load_acquire(value) >= target) return 0;
      return fail_call(R, kShmPeerGone,
                       describe_rank(R, who) + (gone == 2 ? " closed its communicator" : " exited") + context());
    }
    if (t >= deadline) {
      if (load_acquire(value) >= target) return 0;
      return fail_call(R, kShmTimeout,
                       describe_rank(R, who) + " did not answer within " + std::to_string(timeout_ns / 1'000'000) +
                           " ms" + context());
    }
    __atomic_fetch_add(waiters, 1u, __ATOMIC_SEQ_CST);
    const uint64_t v = __atomic_load_n(value, __ATOMIC_SEQ_CST);
    if (v >= target) {
      __atomic_fetch_sub(waiters, 1u, __ATOMIC_SEQ_CST);
      return 0;
    }
    const int64_t sleep = std::min<int64_t>(deadline - t, kSleepNs);
    timespec ts{time_t(sleep / 1'000'000'000), long(sleep % 1'000'000'000)};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(value), FUTEX_WAIT, uint32_t(v), &ts, nullptr, 0);
    __atomic_fetch_sub(waiters, 1u, __ATOMIC_SEQ_CST);
    if (load_acquire(value) >= target) return 0;
  }
}

// ---------------------------------------------------------------------------------------
// Piece kernels. reduce: r = op(in, loc) elementwise (fp16/bf16 in fp32), divided by `w`
// when div (avg: the sum rounded to the dtype first), stored to d1 and, when non-null, d2.
// loc may alias d1 (in-place update of data).

using ReduceFn = void (*)(const void* in, const void* loc, void* d1, void* d2, int64_t n, bool div, float w);

template <class E, int OP>
void reduce_float_scalar(const void* in_, const void* loc_, void* d1_, void* d2_, int64_t n, bool div, float w) {
  using T = typename E::T;
  const T* in = static_cast<const T*>(in_);
  const T* loc = static_cast<const T*>(loc_);
  T* d1 = static_cast<T*>(d1_);
  T* d2 = static_cast<T*>(d2_);
  for (int64_t i = 0; i < n; ++i) {
    float r = ring::fop<OP>(E::load(in + i), E::load(loc + i));
    if (div) r = E::round(r) / w;
    E::store(d1 + i, r);
    if (d2) E::store(d2 + i, r);
  }
}

template <class T, int OP>
void reduce_int_scalar(const void* in_, const void* loc_, void* d1_, void* d2_, int64_t n, bool, float) {
  const T* in = static_cast<const T*>(in_);
  const T* loc = static_cast<const T*>(loc_);
  T* d1 = static_cast<T*>(d1_);
  T* d2 = static_cast<T*>(d2_);
  for (int64_t i = 0; i < n; ++i) {
    const T r = ring::iop<T, OP>(in[i], loc[i]);
    d1[i] = r;
    if (d2) d2[i] = r;
  }
}

template <int OP>
RF_AVX2 RF_INLINE __m256 fop_avx2(__m256 a, __m256 b) {
  if constexpr (OP == kShmMax || OP == kShmMin) {
    // maxps(a, b) = a > b ? a : b (b on equality or NaN): same as the scalar path; NaN -> a + b
    const __m256 m = OP == kShmMax ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b);
    return _mm256_blendv_ps(m, _mm256_add_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
  } else {
    return _mm256_add_ps(a, b);
  }
}

// 16 fp32 lanes -> 16 elements of E, rounded to nearest even, stored at d1 (and d2).
template <class E>
RF_AVX2 RF_INLINE void store16(typename E::T* d1, typename E::T* d2, __m256 a, __m256 b) {
  if constexpr (E::code == kFloat32) {
    _mm256_storeu_ps(d1, a);
    _mm256_storeu_ps(d1 + 8, b);
    if (d2) {
      _mm256_storeu_ps(d2, a);
      _mm256_storeu_ps(d2 + 8, b);
    }
  } else {
    __m256i packed;
    if constexpr (E::code == kBFloat16) {
      packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(f32x8_to_bf16_lanes(a), f32x8_to_bf16_lanes(b)),
                                        0b11011000);
    } else {
      packed = _mm256_set_m128i(_mm256_cvtps_ph(b, _MM_FROUND_TO_NEAREST_INT),
                                _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1), packed);
    if (d2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2), packed);
  }
}

template <class E, int OP>
RF_AVX2 RF_INLINE void reduce16(const typename E::T* in, const typename E::T* loc, typename E::T* d1,
                                typename E::T* d2, bool div, __m256 wv) {
  __m256 r0 = fop_avx2<OP>(V8<E>::load(in), V8<E>::load(loc));
  __m256 r1 = fop_avx2<OP>(V8<E>::load(in + 8), V8<E>::load(loc + 8));
  if (div) {
    r0 = _mm256_div_ps(V8<E>::round(r0), wv);
    r1 = _mm256_div_ps(V8<E>::round(r1), wv);
  }
  store16<E>(d1, d2, r0, r1);
}

template <class E, int OP>
RF_AVX2 void reduce_float_avx2(const void* in_, const void* loc_, void* d1_, void* d2_, int64_t n, bool div, float w) {
  using T = typename E::T;
  const T* in = static_cast<const T*>(in_);
  const T* loc = static_cast<const T*>(loc_);
  T* d1 = static_cast<T*>(d1_);
  T* d2 = static_cast<T*>(d2_);
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    reduce16<E, OP>(in + i, loc + i, d1 + i, d2 ? d2 + i : nullptr, div, wv);
    reduce16<E, OP>(in + i + 16, loc + i + 16, d1 + i + 16, d2 ? d2 + i + 16 : nullptr, div, wv);
  }
  for (; i + 16 <= n; i += 16) reduce16<E, OP>(in + i, loc + i, d1 + i, d2 ? d2 + i : nullptr, div, wv);
  if (i < n) {  // tail through stack buffers: same instructions, never past the end
    const int64_t m = n - i;
    T a[16] = {}, b[16] = {}, o[16];
    std::memcpy(a, in + i, size_t(m) * sizeof(T));
    std::memcpy(b, loc + i, size_t(m) * sizeof(T));
    reduce16<E, OP>(a, b, o, nullptr, div, wv);
    std::memcpy(d1 + i, o, size_t(m) * sizeof(T));
    if (d2) std::memcpy(d2 + i, o, size_t(m) * sizeof(T));
  }
}

template <class T, int OP>
RF_AVX2 RF_INLINE __m256i iop_avx2(__m256i a, __m256i b) {
  if constexpr (sizeof(T) == 4) {
    if constexpr (OP == kShmMax) return _mm256_max_epi32(a, b);
    else if constexpr (OP == kShmMin) return _mm256_min_epi32(a, b);
    else return _mm256_add_epi32(a, b);
  } else {
    if constexpr (OP == kShmMax) return _mm256_blendv_epi8(b, a, _mm256_cmpgt_epi64(a, b));
    else if constexpr (OP == kShmMin) return _mm256_blendv_epi8(a, b, _mm256_cmpgt_epi64(a, b));
    else return _mm256_add_epi64(a, b);
  }
}

template <class T, int OP>
RF_AVX2 void reduce_int_avx2(const void* in_, const void* loc_, void* d1_, void* d2_, int64_t n, bool, float) {
  const T* in = static_cast<const T*>(in_);
  const T* loc = static_cast<const T*>(loc_);
  T* d1 = static_cast<T*>(d1_);
  T* d2 = static_cast<T*>(d2_);
  constexpr int64_t kL = 32 / sizeof(T);
  int64_t i = 0;
  for (; i + 2 * kL <= n; i += 2 * kL) {
    const __m256i r0 = iop_avx2<T, OP>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(loc + i)));
    const __m256i r1 = iop_avx2<T, OP>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i + kL)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(loc + i + kL)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i), r0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i + kL), r1);
    if (d2) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i), r0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i + kL), r1);
    }
  }
  reduce_int_scalar<T, OP>(in + i, loc + i, d1 + i, d2 ? d2 + i : nullptr, n - i, false, 1.f);
}

template <int OP>
ReduceFn pick_op(int dtype, bool avx2) {
  switch (dtype) {
    case kFloat32: return avx2 ? &reduce_float_avx2<F32, OP> : &reduce_float_scalar<F32, OP>;
    case kFloat16: return avx2 ? &reduce_float_avx2<F16, OP> : &reduce_float_scalar<F16, OP>;
    case kBFloat16: return avx2 ? &reduce_float_avx2<BF16, OP> : &reduce_float_scalar<BF16, OP>;
    case kInt32: return avx2 ? &reduce_int_avx2<int32_t, OP> : &reduce_int_scalar<int32_t, OP>;
    case kInt64: return avx2 ? &reduce_int_avx2<int64_t, OP> : &reduce_int_scalar<int64_t, OP>;
    default: return nullptr;
  }
}

ReduceFn pick_reduce(int dtype, int op, bool avx2) {
  switch (op) {
    case kShmMax: return pick_op<kShmMax>(dtype, avx2);
    case kShmMin: return pick_op<kShmMin>(dtype, avx2);
    default: return pick_op<kShmSum>(dtype, avx2);  // sum and avg (avg divides at the end)
  }
}

// d1 = src and d2 = src (when non-null) in one pass over src.
RF_AVX2 void copy2_avx2(char* d1, char* d2, const char* src, int64_t n) {
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i + 32), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i + 64), c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + i + 96), d);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i + 32), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i + 64), c);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + i + 96), d);
  }
  std::memcpy(d1 + i, src + i, size_t(n - i));
  std::memcpy(d2 + i, src + i, size_t(n - i));
}

void copy2(void* d1, void* d2, const void* src, int64_t bytes, bool avx2) {
  if (bytes <= 0) return;
  if (d2 == nullptr) {
    std::memcpy(d1, src, size_t(bytes));
  } else if (avx2) {
    copy2_avx2(static_cast<char*>(d1), static_cast<char*>(d2), static_cast<const char*>(src), bytes);
  } else {
    std::memcpy(d1, src, size_t(bytes));
    std::memcpy(d2, src, size_t(bytes));
  }
}

// Split a piece of n elements over threads (only when large: an OpenMP fork costs more than
// a small piece).
template <class Fn>
void split_piece(int64_t n, int64_t esize, int num_threads, Fn&& fn) {
  if (num_threads <= 1 || n * esize < kParallelMinBytes) {
    fn(int64_t(0), n);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t blocks = (n + 31) / 32;  // 32-element blocks keep vectors whole
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    const int64_t begin = std::min(n, b0 * 32), end = std::min(n, b1 * 32);
    if (begin < end) fn(begin, end);
  }
}

std::string normalize_name(const std::string& name) {
  std::string nm = name.empty() || name[0] != '/' ? "/" + name : name;
  RINGFUSE_CHECK(nm.size() >= 2 && nm.size() <= 250, "shm ring: segment name must have 1 to 249 characters");
  RINGFUSE_CHECK(nm.find('/', 1) == std::string::npos,
                 "shm ring: segment name must not contain '/' after the first character");
  return nm;
}

std::string errno_str(int e) { return std::string(std::strerror(e)); }

}  // namespace

// ---------------------------------------------------------------------------------------

int64_t shm_ring_open(const std::string& name, int rank, int world, bool create, int64_t slot_bytes) {
  RINGFUSE_CHECK(world >= 1 && world <= kMaxWorld, "shm ring: world must be in [1, 64], got " + std::to_string(world));
  RINGFUSE_CHECK(rank >= 0 && rank < world,
                 "shm ring: rank must be in [0, world), got rank " + std::to_string(rank) + " world " +
                     std::to_string(world));
  RINGFUSE_CHECK(slot_bytes >= 4096 && slot_bytes % 64 == 0 && slot_bytes <= (int64_t(1) << 30),
                 "shm ring: slot_bytes must be a multiple of 64 in [4096, 2^30], got " + std::to_string(slot_bytes));
  const std::string nm = normalize_name(name);
  const Layout lay(world, slot_bytes);

  int fd;
  if (create) {
    fd = shm_open(nm.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) fail("ringfuse._C: shm ring: shm_open('" + nm + "', create) failed: " + errno_str(errno));
    // allocate every page now: a full /dev/shm then fails here with ENOSPC instead of a
    // SIGBUS on first touch in the middle of a collective
    int e = ftruncate(fd, off_t(lay.total)) != 0 ? errno : posix_fallocate(fd, 0, off_t(lay.total));
    if (e != 0) {
      close(fd);
      shm_unlink(nm.c_str());
      fail("ringfuse._C: shm ring: allocating " + std::to_string(lay.total) + " bytes for '" + nm +
           "' failed: " + errno_str(e));
    }
  } else {
    fd = shm_open(nm.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) fail("ringfuse._C: shm ring: shm_open('" + nm + "') failed: " + errno_str(errno));
    // the creator may still be between shm_open and ftruncate (size 0)
    const int64_t until = now_ns() + kAttachWaitNs;
    struct stat st;
    for (;;) {
      if (fstat(fd, &st) != 0) {
        const int e = errno;
        close(fd);
        fail("ringfuse._C: shm ring: fstat('" + nm + "') failed: " + errno_str(e));
      }
      if (st.st_size != 0 || now_ns() > until) break;
      usleep(1000);
    }
    if (uint64_t(st.st_size) != lay.total) {
      close(fd);
      fail("ringfuse._C: shm ring: segment '" + nm + "' has " + std::to_string(st.st_size) + " bytes, expected " +
           std::to_string(lay.total) + " for world " + std::to_string(world) + " and slot_bytes " +
           std::to_string(slot_bytes) + ": ranks passed different arguments");
    }
  }
  void* p = mmap(nullptr, lay.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  close(fd);
  if (p == MAP_FAILED) {
    if (create) shm_unlink(nm.c_str());
    fail("ringfuse._C: shm ring: mmap of '" + nm + "' (" + std::to_string(lay.total) + " bytes) failed: " +
         errno_str(map_errno));
  }

  auto* R = new Ring();
  R->name = nm;
  R->base = static_cast<uint8_t*>(p);
  R->bytes = lay.total;
  R->rank = rank;
  R->world = world;
  R->hdr = reinterpret_cast<SegHeader*>(p);
  R->blocks = reinterpret_cast<RankBlock*>(R->base + kBlocksOffset);
  R->ring_offset = lay.ring_offset;
  R->ring_stride = lay.ring_stride;
  R->piece = lay.piece;
  R->nbuf = lay.nbuf;
  R->pidns = self_pidns();
  const auto bail = [&](const std::string& msg) {
    munmap(p, lay.total);
    delete R;
    fail("ringfuse._C: shm ring: " + msg);
  };

  SegHeader* h = R->hdr;
  if (create) {  // the file is zero-filled: counters, flags and the abort line start at 0
    h->version = kVersion;
    h->world = uint32_t(world);
    h->slot_bytes = uint64_t(slot_bytes);
    h->piece_bytes = lay.piece;
    h->nbuf = lay.nbuf;
    h->blocks_offset = kBlocksOffset;
    h->ring_offset = lay.ring_offset;
    h->ring_stride = lay.ring_stride;
    h->total_bytes = lay.total;
    __atomic_store_n(&h->magic, kMagic, __ATOMIC_RELEASE);
  } else {
    const int64_t until = now_ns() + kAttachWaitNs;
    while (load_acquire(&h->magic) != kMagic && now_ns() < until) usleep(1000);
    if (load_acquire(&h->magic) != kMagic) bail("segment '" + nm + "' is not a ringfuse shm ring (bad magic)");
    if (h->version != kVersion) bail("segment '" + nm + "' has layout version " + std::to_string(h->version) +
                                     ", this build expects " + std::to_string(kVersion));
    if (h->world != uint32_t(world) || h->slot_bytes != uint64_t(slot_bytes))
      bail("segment '" + nm + "' was created for world " + std::to_string(h->world) + " and slot_bytes " +
           std::to_string(h->slot_bytes) + ", rank " + std::to_string(rank) + " passed world " +
           std::to_string(world) + " and slot_bytes " + std::to_string(slot_bytes));
    if (h->piece_bytes != lay.piece || h->nbuf != lay.nbuf || h->ring_offset != lay.ring_offset ||
        h->ring_stride != lay.ring_stride || h->total_bytes != lay.total)
      bail("segment '" + nm + "' has a different layout (built by another ringfuse version?)");
  }

  // claim the rank: a rank slot is attached once per segment
  InfoLine& inf = R->blocks[rank].info;
  int32_t expected = 0;
  const int32_t me = int32_t(getpid());
  if (!__atomic_compare_exchange_n(&inf.pid, &expected, me, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    bail("rank " + std::to_string(rank) + " of segment '" + nm + "' is already attached (pid " +
         std::to_string(expected) + ")");
  }
  __atomic_store_n(&inf.pidns, R->pidns, __ATOMIC_RELEASE);
  __atomic_store_n(&inf.state, uint32_t(kAttached), __ATOMIC_RELEASE);
  // fault in this rank's outgoing buffers now rather than in the first call
  std::memset(R->ring(rank), 0, size_t(2 * slot_bytes));

  std::lock_guard<std::mutex> lock(g_mu);
  g_rings.insert(R);
  return reinterpret_cast<int64_t>(R);
}

void shm_ring_unlink(const std::string& name) {
  const std::string nm = normalize_name(name);
  if (shm_unlink(nm.c_str()) != 0 && errno != ENOENT)
    fail("ringfuse._C: shm ring: shm_unlink('" + nm + "') failed: " + errno_str(errno));
}

void shm_ring_close(int64_t handle) {
  Ring* R = reinterpret_cast<Ring*>(handle);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    RINGFUSE_CHECK(g_rings.count(R) == 1, "shm ring: invalid or already closed handle");
    RINGFUSE_CHECK(!R->busy, "shm ring: close while a call is running on the handle");
    g_rings.erase(R);
  }
  RankBlock& b = R->blocks[R->rank];
  __atomic_store_n(&b.info.state, uint32_t(kClosed), __ATOMIC_SEQ_CST);
  // wake anyone sleeping on this rank's lines so they notice quickly
  futex_wake_all(&b.call.value);
  futex_wake_all(&b.sent.value);
  futex_wake_all(&b.acked.value);
  munmap(R->base, R->bytes);
  delete R;
}

std::string shm_ring_last_error(int64_t handle) { return lookup(handle).last_error; }

int shm_ring_run(int64_t handle, int kind, std::uintptr_t data, int64_t numel, int dtype, int op,
                 int64_t timeout_ms, int num_threads) {
  BusyGuard guard(handle);
  Ring& R = guard.R;
  const int N = R.world, r = R.rank;
  RINGFUSE_CHECK(kind == kShmAllReduce || kind == kShmReduceScatter || kind == kShmAllGather,
                 "shm ring: kind must be 0 (all_reduce), 1 (reduce_scatter) or 2 (all_gather), got " +
                     std::to_string(kind));
  RINGFUSE_CHECK(dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16 || dtype == kInt32 || dtype == kInt64,
                 std::string("shm ring: dtype must be float32, float16, bfloat16, int32 or int64, got ") +
                     dtype_name(dtype));
  if (kind == kShmAllGather) op = kShmSum;  // ignored
  RINGFUSE_CHECK(op >= kShmSum && op <= kShmMin,
                 "shm ring: op must be 0 (sum), 1 (avg), 2 (max) or 3 (min), got " + std::to_string(op));
  const bool is_float = dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16;
  RINGFUSE_CHECK(op != kShmAvg || is_float, std::string("shm ring: avg needs a float dtype, got ") + dtype_name(dtype));
  RINGFUSE_CHECK(numel >= 0, "shm ring: numel must be >= 0");
  RINGFUSE_CHECK(data != 0 || numel == 0, "shm ring: data is null");
  RINGFUSE_CHECK(kind == kShmAllReduce || numel % N == 0,
                 std::string("shm ring: ") + kind_name(kind) + " needs numel divisible by world, got numel " +
                     std::to_string(numel) + " world " + std::to_string(N));
  RINGFUSE_CHECK(timeout_ms > 0, "shm ring: timeout_ms must be > 0");

  if (R.broken) {
    if (R.last_error.rfind("communicator is broken", 0) != 0)
      R.last_error = "communicator is broken by an earlier failure: " + R.last_error;
    return kShmBroken;
  }
  if (check_abort(R) != 0) {
    R.last_error = "communicator is broken by an earlier failure: " + R.last_error;
    return kShmBroken;
  }
  R.cur_kind = kind;
  const int64_t timeout_ns = std::min<int64_t>(timeout_ms, int64_t(1) << 40) * 1'000'000;  // no overflow

  // handshake: publish this call, wait for every rank's, compare
  const uint64_t seq = ++R.call_seq;
  CallLine& mine = R.blocks[r].call;
  mine.rec[seq & 1] = CallRec{kind, dtype, op, 0, numel};
  publish(&mine.value, &mine.waiters, seq);
  const int64_t hs_deadline = now_ns() + timeout_ns;
  for (int q = 0; q < N; ++q) {
    if (q == r) continue;
    CallLine& other = R.blocks[q].call;
    if (const int s = wait_ge(R, &other.value, &other.waiters, seq, q, timeout_ns, hs_deadline, "handshake"))
      return s;
  }
  const CallRec ref = R.blocks[0].call.rec[seq & 1];
  for (int q = 1; q < N; ++q) {
    const CallRec c = R.blocks[q].call.rec[seq & 1];
    if (c.kind != ref.kind || c.numel != ref.numel || c.dtype != ref.dtype || c.op != ref.op) {
      const auto desc = [](const CallRec& x) {
        std::string s = std::string(kind_name(x.kind)) + " numel " + std::to_string(x.numel) + " dtype " +
                        dtype_name(x.dtype);
        if (x.kind != kShmAllGather) s += std::string(" op ") + op_name(x.op);
        return s;
      };
      // not broken: every rank compared the same records and returns here before any data
      // moved, so the per-link counters are untouched and the next call starts in step
      R.last_error = "ranks called different collectives: rank " + std::to_string(q) + " passed " + desc(c) +
                     ", rank 0 passed " + desc(ref);
      return kShmMismatch;
    }
  }
  if (N == 1 || numel == 0) return kShmOk;  // world 1: sum, avg (x / 1), max, min are the identity

  // data movement
  const bool avx2 = active_isa() == Isa::kAvx2;
  const ReduceFn reduce = pick_reduce(dtype, op, avx2);
  const int64_t esize = dtype == kInt64 ? 8 : (dtype == kFloat16 || dtype == kBFloat16) ? 2 : 4;
  const int64_t base = numel / N, rem = kind == kShmAllReduce ? numel % N : 0;
  const int64_t max_len = base + (rem > 0 ? 1 : 0);
  const int64_t pe = int64_t(R.piece) / esize;  // elements per piece
  const int64_t pieces = (max_len + pe - 1) / pe;
  const int T = kind == kShmAllReduce ? 2 * N - 2 : N - 1;  // send steps per piece
  const int pred = (r - 1 + N) % N, succ = (r + 1) % N;
  RankBlock& me = R.blocks[r];
  RankBlock& pb = R.blocks[pred];
  RankBlock& sb = R.blocks[succ];
  uint8_t* my_ring = R.ring(r);
  const uint8_t* pred_ring = R.ring(pred);
  uint8_t* d = reinterpret_cast<uint8_t*>(data);
  const float wf = float(N);
  const bool avg = op == kShmAvg;

  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t off = p * pe;
    for (int t = 0; t <= T; ++t) {
      const int c = kind == kShmAllGather ? ((r - t) % N + N) % N : ((r - t - 1) % N + 2 * N) % N;
      const int64_t clen = base + (c < rem ? 1 : 0);
      const int64_t cstart = int64_t(c) * base + std::min<int64_t>(c, rem);
      const int64_t n = std::max<int64_t>(0, std::min<int64_t>(pe, clen - off));
      uint8_t* loc = d + (cstart + off) * esize;

      const uint8_t* in = nullptr;
      if (t > 0) {  // message R.recvd from the predecessor
        const uint64_t m = R.recvd;
        if (R.pred_sent_seen < m + 1) {
          if (const int s = wait_ge(R, &pb.sent.value, &pb.sent.waiters, m + 1, pred, timeout_ns, 0, "data"))
            return s;
          R.pred_sent_seen = load_acquire(&pb.sent.value);
        }
        in = pred_ring + (m % R.nbuf) * R.piece;
      }
      uint8_t* out = nullptr;
      if (t < T) {  // message R.sent to the successor: buffer free once it acked m - nbuf
        const uint64_t m = R.sent;
        if (m + 1 > R.nbuf && R.succ_acked_seen < m + 1 - R.nbuf) {
          if (const int s = wait_ge(R, &sb.acked.value, &sb.acked.waiters, m + 1 - R.nbuf, succ, timeout_ns, 0,
                                    "acknowledgement"))
            return s;
          R.succ_acked_seen = load_acquire(&sb.acked.value);
        }
        out = my_ring + (m % R.nbuf) * R.piece;
      }

      if (n > 0) {
        if (t == 0) {  // first send: this rank's own piece
          std::memcpy(out, loc, size_t(n * esize));
        } else if (kind != kShmAllGather && t < N - 1) {  // reduce-scatter: combine and pass on
          split_piece(n, esize, num_threads, [&](int64_t b, int64_t e) {
            reduce(in + b * esize, loc + b * esize, out + b * esize, nullptr, e - b, false, wf);
          });
        } else if (kind != kShmAllGather && t == N - 1) {  // owner: final combine (+ avg) into data
          split_piece(n, esize, num_threads, [&](int64_t b, int64_t e) {
            reduce(in + b * esize, loc + b * esize, loc + b * esize, out ? out + b * esize : nullptr, e - b, avg, wf);
          });
        } else {  // all-gather: keep and pass on
          split_piece(n, esize, num_threads, [&](int64_t b, int64_t e) {
            copy2(loc + b * esize, out ? out + b * esize : nullptr, in + b * esize, (e - b) * esize, avx2);
          });
        }
      }
      if (out) publish(&me.sent.value, &me.sent.waiters, ++R.sent);
      if (in) publish(&me.acked.value, &me.acked.waiters, ++R.recvd);
    }
  }
  return kShmOk;
}

}  // namespace ringfuse::cpu
