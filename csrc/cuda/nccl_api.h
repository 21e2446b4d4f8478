// The part of the NCCL API the ring transport uses, declared here so that neither nccl.h nor
// libnccl.so.2 is needed to build ringfuse: csrc/cuda/allreduce.cu loads libnccl.so.2 at
// run time with dlopen (from the path Python finds: the nvidia-nccl-cu13 wheel's
// nvidia/nccl/lib/libnccl.so.2, else "libnccl.so.2" from the loader's search path) and
// looks these symbols up with dlsym.
//
// Values and signatures are copied from nccl.h of NCCL 2.32.3 (nvidia-nccl-cu13 2.32.3);
// they have been stable since NCCL 2.10 (the first with bfloat16), but for ncclTimeout,
// which NCCL 2.28 lacks (there ncclNumResults is 8); ringfuse uses neither. The declarations live in
// namespace ringfuse::nccl, so a translation unit can include both this file and the real
// nccl.h: tests/distributed/test_nccl_build.py does that and static_asserts that every enum
// value, the ncclUniqueId size and every function type below match the real header
// (`RINGFUSE_NCCL_INCLUDE=/path/to/nvidia/nccl/include pytest tests/distributed/test_nccl_build.py`,
// or with the nvidia-nccl-cu13 wheel installed).
#pragma once
#include <cuda_runtime_api.h>  // cudaStream_t

#include <cstddef>

namespace ringfuse::nccl {

// NCCL_VERSION(X, Y, Z) of nccl.h: the code ncclGetVersion reports.
constexpr int version_code(int x, int y, int z) {
  return (x <= 2 && y <= 8) ? x * 1000 + y * 100 + z : x * 10000 + y * 100 + z;
}
constexpr int kMinVersion = version_code(2, 10, 0);  // bfloat16, ncclSend/ncclRecv, async errors

constexpr int kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES

struct ncclComm;  // opaque
typedef ncclComm* ncclComm_t;

typedef struct {
  char internal[kUniqueIdBytes];
} ncclUniqueId;

typedef enum {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
  ncclTimeout = 8,
  ncclNumResults = 9
} ncclResult_t;

// The ring moves raw bytes (ncclUint8) and reduces with its own kernel; the other values
// are listed so the ABI test pins them all.
typedef enum {
  ncclInt8 = 0,
  ncclChar = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclInt = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclHalf = 6,
  ncclFloat32 = 7,
  ncclFloat = 7,
  ncclFloat64 = 8,
  ncclDouble = 8,
  ncclBfloat16 = 9,
  ncclFloat8e4m3 = 10,
  ncclFloat8e5m2 = 11,
  ncclNumTypes = 12
} ncclDataType_t;

// Function types, one per symbol (extern "C" in libnccl.so.2).
using GetVersionFn = ncclResult_t (*)(int* version);
using GetUniqueIdFn = ncclResult_t (*)(ncclUniqueId* uniqueId);
using CommInitRankFn = ncclResult_t (*)(ncclComm_t* comm, int nranks, ncclUniqueId commId, int rank);
using CommDestroyFn = ncclResult_t (*)(ncclComm_t comm);
using CommAbortFn = ncclResult_t (*)(ncclComm_t comm);
using CommGetAsyncErrorFn = ncclResult_t (*)(ncclComm_t comm, ncclResult_t* asyncError);
using GetErrorStringFn = const char* (*)(ncclResult_t result);
using GetLastErrorFn = const char* (*)(ncclComm_t comm);  // NCCL >= 2.13; optional
using SendFn = ncclResult_t (*)(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                                ncclComm_t comm, cudaStream_t stream);
using RecvFn = ncclResult_t (*)(void* recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                                cudaStream_t stream);
using GroupStartFn = ncclResult_t (*)();
using GroupEndFn = ncclResult_t (*)();

// The loaded library: every pointer non-null once loaded (get_last_error may stay null).
struct Api {
  void* lib = nullptr;
  int version = 0;
  GetVersionFn get_version = nullptr;
  GetUniqueIdFn get_unique_id = nullptr;
  CommInitRankFn comm_init_rank = nullptr;
  CommDestroyFn comm_destroy = nullptr;
  CommAbortFn comm_abort = nullptr;
  CommGetAsyncErrorFn comm_get_async_error = nullptr;
  GetErrorStringFn get_error_string = nullptr;
  GetLastErrorFn get_last_error = nullptr;
  SendFn send = nullptr;
  RecvFn recv = nullptr;
  GroupStartFn group_start = nullptr;
  GroupEndFn group_end = nullptr;
};

// The symbol names, in the order the loader looks them up (all required but the last).
#define RINGFUSE_NCCL_SYMBOLS(X)                         \
  X(get_version, GetVersionFn, "ncclGetVersion")          \
  X(get_unique_id, GetUniqueIdFn, "ncclGetUniqueId")      \
  X(comm_init_rank, CommInitRankFn, "ncclCommInitRank")   \
  X(comm_destroy, CommDestroyFn, "ncclCommDestroy")       \
  X(comm_abort, CommAbortFn, "ncclCommAbort")             \
  X(comm_get_async_error, CommGetAsyncErrorFn, "ncclCommGetAsyncError") \
  X(get_error_string, GetErrorStringFn, "ncclGetErrorString") \
  X(send, SendFn, "ncclSend")                             \
  X(recv, RecvFn, "ncclRecv")                             \
  X(group_start, GroupStartFn, "ncclGroupStart")          \
  X(group_end, GroupEndFn, "ncclGroupEnd")

}  // namespace ringfuse::nccl
