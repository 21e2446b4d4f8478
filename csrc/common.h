// Shared definitions for every ringfuse kernel: dtype codes and the CHECK macro.
// _C never links libtorch: kernels take raw data pointers, sizes, strides and these codes.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace ringfuse {

// Keep in sync with python/ringfuse/ops/_dtypes.py.
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kInt32 = 4,
  kInt64 = 5,
};

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    case kInt8: return "int8";
    case kInt32: return "int32";
    case kInt64: return "int64";
    default: return "unknown";
  }
}

// Thrown as std::invalid_argument, which pybind11 turns into Python's ValueError.
[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace ringfuse

// CHECK(cond, "message"): re-checks at the C++ boundary what would corrupt memory.
#define RINGFUSE_CHECK(cond, msg)                                                    \
  do {                                                                               \
    if (!(cond)) ::ringfuse::fail(std::string("ringfuse._C: ") + (msg));             \
  } while (0)
