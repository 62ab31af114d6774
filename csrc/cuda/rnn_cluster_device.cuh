// Pieces shared by the cluster kernels' forward (rnn_cluster.cu) and backward
// (rnn_cluster_backward.cu): block shape, 16-bit bit casts, the tensor-core tile product
// over a matrix held in fragment order, the half-precision dispatch and the launch config.
// With ATTNKIT_CUDA_EMULATION (tests/cuda_emulation/emulate.h) the same device code runs on
// CPU threads: the mma.sync and the cluster's operations come from the emulation there.
#pragma once

#include <ATen/ATen.h>
#ifndef ATTNKIT_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#endif

#include <cstdint>
#include <type_traits>

#include "device_shared.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {

namespace cg = cooperative_groups;

// The cluster kernels' bodies: sm_90 device code, or the emulation's.
#if defined(ATTNKIT_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define ATTNKIT_CLUSTER_DEVICE_CODE 1
#else
#define ATTNKIT_CLUSTER_DEVICE_CODE 0
#endif

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
#if defined(ATTNKIT_CUDA_EMULATION)
  cuda_emulation::mma_16x8x16<S>(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
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

// Where element (mm, kk) of 16 x 16 tile `tile` lives, in 16-bit halves, when the tiles are
// stored as 32 lanes x 4 registers in mma.sync m16n8k16's A layout: lane (mm % 8) * 4 + (kk % 8) / 2,
// register mm / 8 + 2 (kk / 8), the lower half for even kk.
__device__ __forceinline__ int a_fragment_half(int tile, int mm, int kk) {
  const int lane = (mm % 8) * 4 + (kk % 8) / 2, reg = mm / 8 + 2 * (kk / 8);
  return ((tile * 32 + lane) * 4 + reg) * 2 + kk % 2;
}

// part[ks][16 m_tiles][8] = the sum over k tiles kt = ks, ks + k_split, ... of A[mt][kt] B[kt]:
// A's tiles in fragment order (tile mt * k_tiles + kt), B as 8 rows (mma's n) of b_stride
// 16-bit values (k along the row). Warp w takes (m tile, residue) pairs w, w + 8, ...; two
// accumulator chains so consecutive mma.sync do not wait on each other.
template <typename S>
__device__ __forceinline__ void tiled_product(const uint4* a_frag, const uint16_t* b, int b_stride, int m_tiles,
                                              int k_tiles, int k_split, float* part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane >> 2, quad = lane & 3;  // mma fragment coordinates
  for (int item = warp; item < m_tiles * k_split; item += kWarps) {
    const int mt = item / k_split, ks = item % k_split;
    float acc[2][4] = {};
    const auto product = [&](float(&d)[4], int kt) {
      const uint16_t* bk = b + group * b_stride + kt * 16 + quad * 2;
      mma_16x8x16<S>(d, a_frag[(mt * k_tiles + kt) * 32 + lane], *reinterpret_cast<const uint32_t*>(bk),
                     *reinterpret_cast<const uint32_t*>(bk + 8));
    };
    int kt = ks;
    for (; kt + k_split < k_tiles; kt += 2 * k_split) {
      product(acc[0], kt);
      product(acc[1], kt + k_split);
    }
    if (kt < k_tiles) product(acc[0], kt);
    // acc[.][0..1]: row group, columns 2 quad + 0..1; acc[.][2..3]: row group + 8.
    float* dst = part + (ks * m_tiles * 16 + mt * 16 + group) * kBatchTile + quad * 2;
    *reinterpret_cast<float2*>(dst) = make_float2(acc[0][0] + acc[1][0], acc[0][1] + acc[1][1]);
    *reinterpret_cast<float2*>(dst + 8 * kBatchTile) = make_float2(acc[0][2] + acc[1][2], acc[0][3] + acc[1][3]);
  }
}

// Where a thread of a cluster kernel stands, the same for the forward and the backward: the
// block's rank among the cluster's C blocks, which own units [rank U, rank U + U) (`units` of
// them in this block, the last may have fewer); the cluster's batch rows b0 .. b0 + Bc - 1
// (clusters are consecutive blocks, kBatchTile rows each); and this thread's (batch row, unit)
// for the gate math, if it has one: gb among the cluster's rows (shared memory), row = b0 + gb
// in the batch and j = rank U + gu among the units (global memory).
struct ClusterPlace {
  int rank, C, b0, Bc, j0, units, gb, gu, row, j;
  bool gate_thread;
};

#if ATTNKIT_CLUSTER_DEVICE_CODE
__device__ __forceinline__ ClusterPlace cluster_place(const cg::cluster_group& cluster, int B, int H, int U) {
  ClusterPlace at;
  at.rank = static_cast<int>(cluster.block_rank());
  at.C = static_cast<int>(cluster.num_blocks());
  at.b0 = static_cast<int>(blockIdx.x / at.C) * kBatchTile;
  at.Bc = min(kBatchTile, B - at.b0);
  at.j0 = at.rank * U;
  at.units = max(0, min(U, H - at.j0));
  at.gb = threadIdx.x / U, at.gu = threadIdx.x % U;
  at.row = at.b0 + at.gb, at.j = at.j0 + at.gu;
  at.gate_thread = at.gb < at.Bc && at.gu < at.units;
  return at;
}
#endif

// f(at::Half{}) or f(at::BFloat16{}): the kernels' two storage types.
template <typename F>
auto with_half(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) return f(at::Half{});
  return f(at::BFloat16{});
}

#ifndef ATTNKIT_CUDA_EMULATION
// A launch of `blocks` blocks in clusters of `cluster` (1-D), kThreads each; `attribute`
// holds the cluster shape and must outlive the config.
inline cudaLaunchConfig_t cluster_config(int cluster, int64_t blocks, size_t smem, cudaStream_t stream,
                                         cudaLaunchAttribute& attribute) {
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// How many clusters of `cluster` blocks with `smem` bytes of shared memory each the device runs at
// once (0: none), after setting the attributes such a launch needs. The dynamic shared memory
// attribute takes the device's limit, not this call's size: host threads planning other sizes set
// the same value (no race between one thread's setting and another's launch).
template <typename Kernel>
inline int clusters_at_once(Kernel kernel, int cluster, size_t smem, const cudaDeviceProp& prop) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(prop.sharedMemPerBlockOptin)));
  if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attribute;
  const cudaLaunchConfig_t config = cluster_config(cluster, cluster, smem, nullptr, attribute);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
    (void)cudaGetLastError();  // a refused size is an answer, not an error to keep
    return 0;
  }
  return clusters;
}
#endif

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
