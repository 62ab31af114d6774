// Where the persistent kernels' device code comes from: CUDA, or with
// ATTNKIT_CUDA_EMULATION the CPU threads of tests/cuda_emulation/emulate.h, which supply
// cooperative_groups' grid and cluster, the warp's mma.sync and dynamic shared memory.
#pragma once

#ifdef ATTNKIT_CUDA_EMULATION
#define ATTNKIT_DYNAMIC_SHARED(type, name) type* name = cuda_emulation::dynamic_shared<type>()
#else
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#define ATTNKIT_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
