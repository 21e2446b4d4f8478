// Host-only checks of the NCCL transport's ring schedule (csrc/ring_schedule.h), the
// part of csrc/cuda/allreduce.cu that decides what every NCCL group and combine kernel
// does and which events order them. Built with g++ and run by
// tests/distributed/test_nccl_build.py; needs no GPU and no NCCL.
//
// For every (world, kind, dtype, op, numel, piece) it records each rank's schedule and:
//   1. matching: the k-th send on link r -> r+1 has the k-th receive's offset and size
//      (NCCL matches point-to-point operations per peer in order), no empty groups, and
//      every event wait follows a record of that event in the same call;
//   2. races: for two calls back to back (without the host's wait in between), every pair
//      of operations of a rank that touch overlapping memory (data, staging slot 0 / 1;
//      at least one writes) is ordered by stream order and event edges. The caller's work
//      before the call (writes data) and after it (reads data) are operations too;
//   3. results: the schedule executed by a randomized scheduler in which an NCCL group
//      completes only when its peers' matching groups have been posted (rendezvous), with
//      data moved at the match, gives, bit for bit, the fixed-order reduction computed
//      independently here (bf16 rounding and avg re-derived without ring_schedule.h).
// Prints "ok <configs>" and exits 0, or prints the first failure and exits 1.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <vector>

#include "ring_schedule.h"

using namespace ringfuse::ring;

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::printf("FAIL %s\n", msg.c_str());
  std::exit(1);
}

enum OpType { kRecord, kWait, kExchange, kCombine, kUserWrite, kUserRead };

struct Rec {
  OpType type;
  int stream = kUser, event = -1;
  int waits_for = -1;  // kWait: index of the record it waits for
  int64_t send_off = 0, ns = 0, recv_off = 0, nr = 0;
  int slot = -1;
  int64_t off = 0, n = 0;
  bool div = false;
  int call = 0;
};

struct Recorder {
  std::vector<Rec> ops;
  int last_record[kNumEvents];
  int call = 0;
  Recorder() {
    for (int& x : last_record) x = -1;
  }
  void begin_call(int c, int64_t numel) {
    call = c;
    for (int& x : last_record) x = -1;  // a wait must follow a record of the same call
    Rec r{kUserWrite};
    r.off = 0, r.n = numel, r.call = c;
    ops.push_back(r);
  }
  void end_call(int64_t numel) {
    Rec r{kUserRead};
    r.off = 0, r.n = numel, r.call = call;
    ops.push_back(r);
  }
  void record(Stream s, Event e) {
    Rec r{kRecord};
    r.stream = s, r.event = e, r.call = call;
    ops.push_back(r);
    last_record[e] = int(ops.size()) - 1;
  }
  void wait(Stream s, Event e) {
    if (last_record[e] < 0) die("wait on event " + std::to_string(e) + " before any record in the call");
    Rec r{kWait};
    r.stream = s, r.event = e, r.waits_for = last_record[e], r.call = call;
    ops.push_back(r);
  }
  void exchange(int64_t so, int64_t ns, int64_t ro, int64_t nr, int slot) {
    if (ns <= 0 && nr <= 0) die("empty exchange");
    if (ns < 0 || nr < 0) die("negative count");
    Rec r{kExchange};
    r.stream = kComm, r.send_off = so, r.ns = ns, r.recv_off = ro, r.nr = nr, r.slot = slot, r.call = call;
    ops.push_back(r);
  }
  void combine(int slot, int64_t off, int64_t n, bool div) {
    if (slot < 0 || slot > 1 || n <= 0) die("bad combine");
    Rec r{kCombine};
    r.stream = kUser, r.slot = slot, r.off = off, r.n = n, r.div = div, r.call = call;
    ops.push_back(r);
  }
};

// memory regions: buffer 0 = data, 1 = staging slot 0, 2 = staging slot 1
struct Access {
  int buf;
  int64_t b, e;
  bool write;
};

std::vector<Access> accesses(const Rec& r) {
  std::vector<Access> a;
  switch (r.type) {
    case kExchange:
      if (r.ns > 0) a.push_back({0, r.send_off, r.send_off + r.ns, false});
      if (r.nr > 0) {
        if (r.slot < 0) a.push_back({0, r.recv_off, r.recv_off + r.nr, true});
        else a.push_back({1 + r.slot, 0, r.nr, true});
      }
      break;
    case kCombine:
      a.push_back({1 + r.slot, 0, r.n, false});
      a.push_back({0, r.off, r.off + r.n, true});
      break;
    case kUserWrite: a.push_back({0, r.off, r.off + r.n, true}); break;
    case kUserRead: a.push_back({0, r.off, r.off + r.n, false}); break;
    default: break;
  }
  return a;
}

std::string where(const Plan& p) {
  static const char* kinds[] = {"all_reduce", "reduce_scatter", "all_gather"};
  return std::string(kinds[p.kind]) + " world " + std::to_string(p.world) + " rank " + std::to_string(p.rank) +
         " numel " + std::to_string(p.numel) + " piece " + std::to_string(p.piece) + (p.avg ? " avg" : "");
}

// 2. every conflicting pair ordered by happens-before
void check_races(const Plan& p, const std::vector<Rec>& ops) {
  const size_t n = ops.size(), words = (n + 63) / 64;
  std::vector<std::vector<uint64_t>> hb(n, std::vector<uint64_t>(words, 0));
  int last_on[2] = {-1, -1};
  for (size_t i = 0; i < n; ++i) {
    const Rec& r = ops[i];
    const auto inherit = [&](int j) {
      if (j < 0) return;
      for (size_t w = 0; w < words; ++w) hb[i][w] |= hb[j][w];
      hb[i][size_t(j) / 64] |= uint64_t(1) << (size_t(j) % 64);
    };
    inherit(last_on[r.stream]);
    if (r.type == kWait) inherit(r.waits_for);
    last_on[r.stream] = int(i);
  }
  for (size_t j = 0; j < n; ++j) {
    const auto aj = accesses(ops[j]);
    if (aj.empty()) continue;
    for (size_t i = 0; i < j; ++i) {
      if (hb[j][i / 64] >> (i % 64) & 1) continue;
      for (const Access& x : accesses(ops[i]))
        for (const Access& y : aj)
          if (x.buf == y.buf && x.b < y.e && y.b < x.e && (x.write || y.write))
            die(where(p) + ": race between op " + std::to_string(i) + " (type " + std::to_string(ops[i].type) +
                ", call " + std::to_string(ops[i].call) + ") and op " + std::to_string(j) + " (type " +
                std::to_string(ops[j].type) + ", call " + std::to_string(ops[j].call) + ") on buffer " +
                std::to_string(x.buf));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Independent element math for the reference

uint16_t bf16_round_ref(float v) {  // nearest bf16, ties to even, by comparing neighbours
  if (std::isnan(v)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t lo = uint16_t(u >> 16);
  const uint16_t hi = uint16_t(lo + 1);
  const auto as_f = [](uint16_t h) { return double(bf16_to_f32(h)); };
  const double dl = std::fabs(double(v) - as_f(lo));
  if ((lo & 0x7fff) == 0x7f7f || (lo & 0x7f80) == 0x7f80) {  // at the top of the finite range / inf
    const uint32_t rest = u & 0xffff;
    return (rest > 0x8000 || (rest == 0x8000 && (lo & 1))) ? hi : lo;
  }
  const double dh = std::fabs(as_f(hi) - double(v));
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo & 1) ? hi : lo;
}

template <class T>
struct Ref;
template <>
struct Ref<float> {
  static float step(int op, float acc, float x) {
    if (op == kMax) return std::isnan(acc) || std::isnan(x) ? acc + x : (acc > x ? acc : x);
    if (op == kMin) return std::isnan(acc) || std::isnan(x) ? acc + x : (acc < x ? acc : x);
    return acc + x;
  }
  static float avg(float acc, int n) { return acc / float(n); }
};
template <>
struct Ref<uint16_t> {  // bf16
  static uint16_t step(int op, uint16_t acc, uint16_t x) {
    return bf16_round_ref(Ref<float>::step(op, bf16_to_f32(acc), bf16_to_f32(x)));
  }
  static uint16_t avg(uint16_t acc, int n) { return bf16_round_ref(bf16_to_f32(acc) / float(n)); }
};
template <>
struct Ref<int64_t> {
  static int64_t step(int op, int64_t acc, int64_t x) {
    if (op == kMax) return acc > x ? acc : x;
    if (op == kMin) return acc < x ? acc : x;
    return int64_t(uint64_t(acc) + uint64_t(x));
  }
  static int64_t avg(int64_t, int) { die("avg of integers"); }
};

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// ---------------------------------------------------------------------------------------
// 3. execution

template <class E>
struct Sim {
  using T = typename E::T;
  int N, op;
  Plan base;
  std::vector<std::vector<Rec>> ops;        // per rank, one call
  std::vector<std::vector<T>> data, slot[2];

  struct Posted {
    int rank;
    size_t op;
    std::vector<T> payload;  // sends: the data at the post
  };
  // links[r]: r -> r+1
  std::vector<std::vector<Posted>> sends, recvs;

  void run(std::mt19937& rng) {
    sends.assign(N, {});
    recvs.assign(N, {});
    // per rank and stream: the op indices in order, a cursor, and the started flag of the head
    std::vector<std::vector<std::vector<size_t>>> lanes(N, std::vector<std::vector<size_t>>(2));
    for (int r = 0; r < N; ++r)
      for (size_t i = 0; i < ops[r].size(); ++i) lanes[r][ops[r][i].stream].push_back(i);
    std::vector<std::vector<size_t>> cur(N, std::vector<size_t>(2, 0));
    std::vector<std::vector<bool>> started(N, std::vector<bool>(2, false));
    std::vector<std::vector<bool>> done(N);
    std::vector<std::vector<int>> send_idx(N), recv_idx(N);  // per op: index in its link list
    for (int r = 0; r < N; ++r) {
      done[r].assign(ops[r].size(), false);
      send_idx[r].assign(ops[r].size(), -1);
      recv_idx[r].assign(ops[r].size(), -1);
    }
    for (;;) {
      struct Action {
        int r, s;
      };
      std::vector<Action> can;
      bool all_done = true;
      for (int r = 0; r < N; ++r)
        for (int s = 0; s < 2; ++s) {
          if (cur[r][s] >= lanes[r][s].size()) continue;
          all_done = false;
          const size_t i = lanes[r][s][cur[r][s]];
          const Rec& o = ops[r][i];
          bool ok = true;
          if (o.type == kWait) ok = done[r][size_t(o.waits_for)];
          if (o.type == kExchange && started[r][s]) {
            const int pred = (r - 1 + N) % N;
            if (o.ns > 0 && int(recvs[r].size()) <= send_idx[r][i]) ok = false;
            if (o.nr > 0 && int(sends[pred].size()) <= recv_idx[r][i]) ok = false;
          }
          if (ok) can.push_back({r, s});
        }
      if (all_done) return;
      if (can.empty()) die(where(base) + ": deadlock");
      const Action a = can[std::uniform_int_distribution<size_t>(0, can.size() - 1)(rng)];
      const int r = a.r, s = a.s;
      const size_t i = lanes[r][s][cur[r][s]];
      const Rec& o = ops[r][i];
      if (o.type == kExchange && !started[r][s]) {  // post
        if (o.ns > 0) {
          send_idx[r][i] = int(sends[r].size());
          sends[r].push_back({r, i, std::vector<T>(data[r].begin() + o.send_off, data[r].begin() + o.send_off + o.ns)});
        }
        if (o.nr > 0) {
          const int pred = (r - 1 + N) % N;
          recv_idx[r][i] = int(recvs[pred].size());
          recvs[pred].push_back({r, i, {}});
        }
        started[r][s] = true;
        continue;
      }
      if (o.type == kExchange) {  // complete: the receive takes the matched send's payload
        if (o.nr > 0) {
          const int pred = (r - 1 + N) % N;
          const Posted& m = sends[pred][size_t(recv_idx[r][i])];
          const Rec& so = ops[pred][m.op];
          if (int64_t(m.payload.size()) != o.nr || so.send_off != o.recv_off)
            die(where(base) + ": a receive got the wrong message");
          if (o.slot < 0) std::copy(m.payload.begin(), m.payload.end(), data[r].begin() + o.recv_off);
          else std::copy(m.payload.begin(), m.payload.end(), slot[o.slot][r].begin());
        }
        started[r][s] = false;
      } else if (o.type == kCombine) {
        for (int64_t k = 0; k < o.n; ++k) {
          T& loc = data[r][size_t(o.off + k)];
          loc = combine_dispatch(slot[o.slot][r][size_t(k)], loc, o.div);
        }
      }
      done[r][i] = true;
      ++cur[r][s];
    }
  }

  T combine_dispatch(T received, T local, bool div) {
    const float w = float(N);
    switch (op) {
      case kMax: return combine<E, kMax>(received, local, div, w);
      case kMin: return combine<E, kMin>(received, local, div, w);
      default: return combine<E, kSum>(received, local, div, w);
    }
  }
};

template <class E>
typename E::T make_value(std::mt19937& rng, int op);
template <>
float make_value<F32>(std::mt19937& rng, int) {
  return std::uniform_real_distribution<float>(-3.f, 3.f)(rng) * (rng() % 5 == 0 ? 1e-3f : 1.f);
}
template <>
uint16_t make_value<BF16>(std::mt19937& rng, int) {
  return f32_to_bf16(std::uniform_real_distribution<float>(-3.f, 3.f)(rng));
}
template <>
int64_t make_value<Int<int64_t>>(std::mt19937& rng, int) {
  return int64_t(rng()) << 31 ^ int64_t(rng());  // large: sums wrap
}

int g_configs = 0;

template <class E>
void check_config(int N, int kind, int op, int64_t numel, int64_t piece, unsigned seed) {
  using T = typename E::T;
  Plan p;
  p.kind = kind, p.world = N, p.avg = op == kAvg, p.numel = numel, p.piece = piece;
  std::mt19937 rng(seed);
  // 1 + 2: two calls back to back per rank; matching of the first call
  std::vector<std::vector<Rec>> one(N);
  for (int r = 0; r < N; ++r) {
    Plan pr = p;
    pr.rank = r;
    Recorder two;
    for (int c = 0; c < 2; ++c) {
      two.begin_call(c, numel);
      emit_ring(pr, two);
      two.end_call(numel);
    }
    check_races(pr, two.ops);
    Recorder rec;
    rec.begin_call(0, numel);
    emit_ring(pr, rec);
    rec.end_call(numel);
    one[r] = rec.ops;
  }
  for (int r = 0; r < N; ++r) {  // link r -> r+1
    std::vector<std::pair<int64_t, int64_t>> s, v;
    for (const Rec& o : one[r])
      if (o.type == kExchange && o.ns > 0) s.push_back({o.send_off, o.ns});
    for (const Rec& o : one[(r + 1) % N])
      if (o.type == kExchange && o.nr > 0) v.push_back({o.recv_off, o.nr});
    if (s != v) die(where(p) + ": sends of rank " + std::to_string(r) + " do not match the receives of rank " +
                    std::to_string((r + 1) % N));
  }
  // 3: results
  std::vector<std::vector<T>> in(N, std::vector<T>(static_cast<size_t>(numel)));
  for (auto& v : in)
    for (T& x : v) x = make_value<E>(rng, op);
  const int64_t base = numel / N, rem = kind == kAllReduce ? numel % N : 0;
  const auto cstart = [&](int c) { return c * base + std::min<int64_t>(c, rem); };
  const auto clen = [&](int c) { return base + (c < rem ? 1 : 0); };
  std::vector<T> reduced(static_cast<size_t>(numel));
  for (int c = 0; c < N; ++c)
    for (int64_t k = cstart(c); k < cstart(c) + clen(c); ++k) {
      T acc = in[(c + 1) % N][size_t(k)];
      for (int j = 2; j <= N; ++j) acc = Ref<T>::step(op, acc, in[(c + j) % N][size_t(k)]);
      if (op == kAvg) acc = Ref<T>::avg(acc, N);
      reduced[size_t(k)] = acc;
    }
  for (int trial = 0; trial < 2; ++trial) {
    Sim<E> sim;
    sim.N = N, sim.op = op, sim.base = p, sim.ops = one, sim.data = in;
    const int64_t max_len = numel / N + (numel % N ? 1 : 0);
    for (auto& s : sim.slot) s.assign(N, std::vector<T>(size_t(std::min(piece, max_len)), T{}));
    sim.run(rng);
    for (int r = 0; r < N; ++r)
      for (int64_t k = 0; k < numel; ++k) {
        const int c = [&] {
          for (int q = 0; q < N; ++q)
            if (k < cstart(q) + clen(q)) return q;
          return N - 1;
        }();
        T want;
        if (kind == kAllGather) {
          want = in[c][size_t(k)];
        } else if (kind == kReduceScatter && c != r) {
          continue;  // scratch
        } else {
          want = reduced[size_t(k)];
        }
        if (!same_bits(sim.data[r][size_t(k)], want))
          die(where(p) + ": rank " + std::to_string(r) + " element " + std::to_string(k) + " differs (op " +
              std::to_string(op) + ", sizeof " + std::to_string(sizeof(T)) + ")");
      }
  }
  ++g_configs;
}

template <class E>
void sweep(bool is_float) {
  unsigned seed = 1;
  for (int N : {2, 3, 4, 5})
    for (int kind : {kAllReduce, kReduceScatter, kAllGather})
      for (int op : {kSum, kAvg, kMax, kMin}) {
        if (op == kAvg && !is_float) continue;
        if (kind == kAllGather && op != kSum) continue;
        for (int64_t m : {int64_t(1), int64_t(2), int64_t(7), int64_t(N - 1), int64_t(100), int64_t(1003)}) {
          const int64_t numel = kind == kAllReduce ? m : m * N;
          if (numel == 0) continue;
          const int64_t max_len = numel / N + (numel % N ? 1 : 0);
          for (int64_t piece : {int64_t(1), int64_t(3), int64_t(16), int64_t(max_len), int64_t(1) << 20}) {
            if ((max_len + piece - 1) / piece > 24) continue;  // keep the O(ops^2) race check small
            check_config<E>(N, kind, op, numel, piece, seed++);
          }
        }
      }
}

}  // namespace

int main() {
  // the independent bf16 rounding agrees with ring_schedule.h's on awkward values
  for (float v : {0.f, -0.f, 1.f, 1.00390625f, 1.005859375f, 3.4e38f, -3.4e38f, 3.3961e38f, 1e-40f, INFINITY, -INFINITY,
                  NAN}) {
    if (bf16_round_ref(v) != f32_to_bf16(v)) die("bf16 rounding of " + std::to_string(v));
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng();
    float v;
    std::memcpy(&v, &u, 4);
    if (!std::isnan(v) && bf16_round_ref(v) != f32_to_bf16(v)) die("bf16 rounding of bits " + std::to_string(u));
  }
  sweep<F32>(true);
  sweep<BF16>(true);
  sweep<Int<int64_t>>(false);
  std::printf("ok %d\n", g_configs);
  return 0;
}
