// Stand-in for <cuda_runtime.h> when csrc/cuda/*.cu is compiled by the host compiler for
// the CUDA emulator (tests/cuda_emu): the CUDA keywords, thread indices, __syncthreads,
// warp shuffles and kernel launches, run on the CPU by emu.h's cooperative scheduler.
// The real <cuda_fp16.h> / <cuda_bf16.h> / <vector_types.h> are used as they are: they
// have host implementations of every conversion the kernels call.
#pragma once
#include <vector_functions.h>
#include <vector_types.h>

#include "../emu.h"
