// Pieces shared by the cluster kernels' forward (rnn_cluster.cu) and backward
// (rnn_cluster_backward.cu): block shape, 16-bit bit casts and one tensor-core product.
#pragma once

#include <ATen/ATen.h>
#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

namespace attnkit {
namespace cuda {
namespace cluster_rnn {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatchTile = 8;  // mma's n: a cluster's batch rows, the missing ones zero

template <typename S>
__device__ __forceinline__ uint16_t bits_of(S v) {
  return v.x;
}
template <typename S>
__device__ __forceinline__ float float_of(uint16_t bits) {
  return static_cast<float>(S(bits, S::from_bits()));
}

// D = A B + D for one 16 x 8 tile, fp32 accumulators.
template <typename S>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (std::is_same<S, at::Half>::value) {
    asm(  // not volatile: the compiler may interleave the two accumulator chains
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
  }
#endif
}

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
