// Ring all-reduce / reduce-scatter / all-gather between CPU processes on one host over a
// POSIX shared-memory segment (the CPU transport, ARCHITECTURE.md "Distributed"); see
// allreduce.cpp for the segment layout, the schedule and the napkin math.
//
// The Python side (ringfuse.distributed) is the only caller: it exchanges the segment name
// through the torch.distributed store, opens the segment on every rank (rank 0 creates),
// unlinks it on rank 0 once every rank has attached, and turns nonzero statuses into
// exceptions carrying shm_ring_last_error().
#pragma once
#include <cstdint>
#include <string>

namespace ringfuse::cpu {

// Status codes of shm_ring_run.
enum ShmRingStatus : int {
  kShmOk = 0,
  kShmTimeout = 1,   // a peer did not answer within timeout_ms
  kShmPeerGone = 2,  // a peer process exited (or closed its handle)
  kShmMismatch = 3,  // ranks passed different (kind, numel, dtype, op); no data touched, handle usable
  kShmBroken = 4,    // an earlier call on this handle failed
};

// Collective kinds and ops of shm_ring_run.
enum ShmRingKind : int { kShmAllReduce = 0, kShmReduceScatter = 1, kShmAllGather = 2 };
enum ShmRingOp : int { kShmSum = 0, kShmAvg = 1, kShmMax = 2, kShmMin = 3 };

// Create (rank 0: O_CREAT | O_EXCL, mode 0600) or attach to the segment `name` ("/x" or
// "x"); returns an opaque handle. `slot_bytes` is the size of each of the two
// double-buffer slots per rank (>= 4 KiB, a multiple of 64); world in [1, 64]. Attaching
// validates the header (magic, version, world, slot_bytes) and throws on a mismatch or when
// `rank` is already attached by another live process.
int64_t shm_ring_open(const std::string& name, int rank, int world, bool create, int64_t slot_bytes);

// shm_unlink(name); a missing segment (ENOENT) is not an error.
void shm_ring_unlink(const std::string& name);

// Unmap and free the handle; peers waiting on this rank then see it as gone (status 2).
void shm_ring_close(int64_t handle);

// One collective on `data` (in place, `numel` elements of ringfuse dtype code `dtype`).
// kind: 0 all_reduce, 1 reduce_scatter (numel % world == 0; chunk `rank` gets the result,
// other chunks untouched), 2 all_gather (numel % world == 0; chunk `rank` is the input; op
// ignored). op: 0 sum, 1 avg (float dtypes), 2 max, 3 min. Returns an ShmRingStatus; bad
// arguments throw (ValueError) before any communication.
int shm_ring_run(int64_t handle, int kind, std::uintptr_t data, int64_t numel, int dtype, int op,
                 int64_t timeout_ms, int num_threads);

// A sentence describing the last nonzero status of shm_ring_run on this handle ("" if none).
std::string shm_ring_last_error(int64_t handle);

}  // namespace ringfuse::cpu
