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

static std::atomic<int> g_isa{-1};  // -1: not chosen yet -> auto

Isa active_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return Isa(v);
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
}

void set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    g_isa.store(-1);
  } else if (std::strcmp(name, "scalar") == 0) {
    g_isa.store(int(Isa::kScalar));
  } else if (std::strcmp(name, "avx2") == 0) {
    RINGFUSE_CHECK(cpu_has_avx2(), "isa 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    g_isa.store(int(Isa::kAvx2));
  } else {
    fail(std::string("ringfuse._C: isa must be 'auto', 'avx2' or 'scalar', got '") + name + "'");
  }
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

}  // namespace ringfuse::cpu
