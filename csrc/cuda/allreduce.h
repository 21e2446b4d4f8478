// Ring all-reduce / reduce-scatter / all-gather of CUDA tensors over NCCL point-to-point
// (the GPU transport, ARCHITECTURE.md "Distributed"); see allreduce.cu for the streams, the
// combine kernel and the napkin math, ring_schedule.h for the schedule.
//
// libnccl.so.2 is loaded at run time (nccl_load), never linked: ringfuse builds and imports
// without NCCL. The Python side (ringfuse.distributed.NcclTransport) is the only caller: it
// loads the library it finds (the nvidia-nccl-cu13 wheel), sends rank 0's ncclUniqueId
// through the group's store, opens the communicator on every rank, checks every call with a
// handshake over the store (so status 3 never comes from here) and turns nonzero statuses
// into exceptions carrying nccl_last_error().
//
// Declarations only (included by bindings.cpp, compiled by the host compiler).
#pragma once
#include <cstdint>
#include <string>

namespace ringfuse::cuda {

// Status codes of nccl_ring_run (the numbering of csrc/cpu/allreduce.h's ShmRingStatus).
enum NcclRingStatus : int {
  kNcclOk = 0,
  kNcclFailed = 1,    // timed out, NCCL reported an asynchronous error, or a CUDA / NCCL call
                      // failed mid-ring; the communicator was aborted
  kNcclMismatch = 3,  // (ranks disagree: detected by the Python handshake, not here)
  kNcclBroken = 4,    // an earlier call on this handle failed
};

// dlopen(path) and look up the NCCL symbols (csrc/cuda/nccl_api.h); returns the library's
// version code (NCCL_VERSION: 2.32.3 -> 23203). The first successful load stays for the
// process (later calls return its version). Throws (ValueError) with dlerror's text when the
// library cannot be loaded, lacks a symbol, or is older than NCCL 2.10.
int nccl_load(const std::string& path);

// ncclGetUniqueId: 128 bytes, to send from rank 0 to every rank. Needs nccl_load.
std::string nccl_unique_id();

// ncclCommInitRank on `device` (collective: every rank of the group calls it with the same
// id), plus the communicator's stream, events and two staging slots of piece_bytes (> 0,
// a multiple of 256). With world > 1 it then exchanges one piece around the ring so that the
// peer connections exist before the first call, waiting at most timeout_ms for it. Returns
// an opaque handle. Throws (ValueError) on bad arguments and on CUDA / NCCL failures.
int64_t nccl_comm_open(const std::string& unique_id, int rank, int world, int device, int64_t piece_bytes,
                       int64_t timeout_ms);

// Free the handle: ncclCommDestroy, which waits for the other ranks to close theirs too
// (NCCL's finalize), or with `abort` ncclCommAbort, which does not (for a group whose peers
// may be gone). A communicator that a failed call already aborted needs neither; its
// staging memory is then left allocated (its stream may never drain).
void nccl_comm_close(int64_t handle, bool abort);

// One collective on `data` (device memory of the communicator's device, in place, `numel`
// elements of ringfuse dtype code `dtype`), ordered on the CUDA stream `stream` (a
// cudaStream_t; 0: the legacy default stream): it starts after the work already queued on
// it, and work queued later sees the result. kind: 0 all_reduce, 1 reduce_scatter (numel %
// world == 0; chunk `rank` gets the result, the other chunks hold partial sums afterwards),
// 2 all_gather (numel % world == 0; chunk `rank` is the input; op ignored). op: 0 sum, 1 avg
// (float dtypes), 2 max, 3 min. The call returns once the ring has completed on the device
// (polling an event; NCCL calls never time out by themselves): past timeout_ms, or when NCCL
// reports an asynchronous error, it aborts the communicator and returns kNcclFailed. Bad
// arguments throw (ValueError) before any communication.
int nccl_ring_run(int64_t handle, int kind, std::uintptr_t data, int64_t numel, int dtype, int op,
                  std::uintptr_t stream, int64_t timeout_ms);

// A sentence describing the last nonzero status of nccl_ring_run on this handle ("" if none).
std::string nccl_last_error(int64_t handle);

}  // namespace ringfuse::cuda
