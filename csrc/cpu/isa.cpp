// Run-time ISA selection for the CPU kernels.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

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

bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}

// AMX needs the CPU's AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) with
// AVX-512 BF16 (the path's softmax rounds P with it), the OS's XSAVE support for the tile
// state (XCR0 bits 17 and 18), and Linux's per-process permission for the 8 KiB tile data (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16; a
// tile instruction without it is SIGILL). The permission is asked for once, here.
bool cpu_has_amx() {
  static const bool has = [] {
#if defined(RINGFUSE_HAVE_AMX) && defined(__linux__)
    if (!cpu_has_avx512_vnni() || !__builtin_cpu_supports("avx512bf16") || __get_cpuid_max(0, nullptr) < 7)
      return false;
    unsigned eax, ebx, ecx, edx;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return has;
}

constexpr int kVnni = 2;            // g_isa value of "avx512vnni": kAvx2 + the AVX-512 kernels
constexpr int kAmx = 3;             // g_isa value of "amx": kVnni + the AMX bf16 prefill attention
static std::atomic<int> g_isa{-1};  // -1: not chosen yet -> auto

Isa active_isa() {
  const int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return v >= kVnni ? Isa::kAvx2 : Isa(v);
  return cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;
}

bool int8_use_vnni() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v >= kVnni || (v < 0 && cpu_has_avx512_vnni());
}

bool avx512_kernels() { return int8_use_vnni(); }

bool attention_use_amx() {
  const int v = g_isa.load(std::memory_order_relaxed);
  return v == kAmx || (v < 0 && cpu_has_amx());
}

void set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    g_isa.store(-1);
  } else if (std::strcmp(name, "scalar") == 0) {
    g_isa.store(int(Isa::kScalar));
  } else if (std::strcmp(name, "amx") == 0) {
    RINGFUSE_CHECK(cpu_has_amx(), "isa 'amx' requested but this CPU (or OS, or build) has no AMX-BF16");
    g_isa.store(kAmx);
  } else if (std::strcmp(name, "avx512vnni") == 0) {
    RINGFUSE_CHECK(cpu_has_avx512_vnni(), "isa 'avx512vnni' requested but this CPU lacks AVX-512 VNNI");
    g_isa.store(kVnni);
  } else if (std::strcmp(name, "avx2") == 0) {
    RINGFUSE_CHECK(cpu_has_avx2(), "isa 'avx2' requested but this CPU lacks AVX2/FMA/F16C");
    g_isa.store(int(Isa::kAvx2));
  } else {
    fail(std::string("ringfuse._C: isa must be 'auto', 'amx', 'avx512vnni', 'avx2' or 'scalar', got '") + name + "'");
  }
}

const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2" : "scalar"; }

}  // namespace ringfuse::cpu
