// Run-time ISA selection for the CPU kernels.
#include <atomic>
#include <cstring>
#include <string>

#include "cpu/vec.h"

namespace ringfuse::cpu {

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
}

bool cpu_has_avx512_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

constexpr int kVnni = 2;                // g_isa value of "avx512vnni": kAvx2 + the VNNI int8 GEMM
static std::atomic<int> g_isa{-1};  // -1: not chosen yet -> auto

Isa active_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return v == kVnni ? Isa::kAvx2 : Isa(v);
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
}

bool int8_use_vnni() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v == kVnni || (v < 0 && cpu_has_avx512_vnni());
}

void set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    g_isa.store(-1);
  } else if (std::strcmp(name, "scalar") == 0) {
    g_isa.store(int(Isa::kScalar));
  } else if (std::strcmp(name, "avx512vnni") == 0) {
    RINGFUSE_CHECK(cpu_has_avx512_vnni(), "isa 'avx512vnni' requested but this CPU lacks AVX-512 VNNI");
    g_isa.store(kVnni);
  } else if (std::strcmp(name, "avx2") == 0) {
    RINGFUSE_CHECK(cpu_has_avx2(), "isa 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    g_isa.store(int(Isa::kAvx2));
  } else {
    fail(std::string("ringfuse._C: isa must be 'auto', 'avx512vnni', 'avx2' or 'scalar', got '") + name + "'");
  }
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

}  // namespace ringfuse::cpu
