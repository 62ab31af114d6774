// Just enough of CUDA to run simple kernels on CPU threads, for tests on machines
// without a GPU: every block's threads are std::threads, __syncthreads a
// std::barrier over them, __shfl_xor_sync an exchange through memory between two
// barriers of the warp. `launch` runs the blocks one after another, so __shared__
// (a static) is the block's own; `launch_clusters` runs the blocks of a thread-block
// cluster at once, each with its dynamic shared memory, with the cluster's barrier,
// distributed shared memory and the warp's mma.sync m16n8k16 (a product of the
// fragments the warp's lanes hold, in PTX's layout); a grid of one such cluster has
// the cluster's barrier as grid.sync(). A barrier that some thread never
// reaches hangs, as it may on a GPU: run emulated kernels under a timeout.
#pragma once

#define ATTNKIT_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local EmulatedDim3 threadIdx;
inline thread_local EmulatedDim3 blockIdx;

struct uint4 {
  unsigned int x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace cuda_emulation {

struct MmaLanes {  // one warp's mma.sync operands, lane by lane
  uint4 a[32];
  uint32_t b0[32], b1[32];
};

struct Block {
  explicit Block(unsigned int threads, size_t smem_bytes)
      : barrier(threads), exchange(threads), mma(threads / 32), smem((smem_bytes + 15) / 16) {
    for (unsigned int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    std::memset(smem.data(), 0xCD, smem.size() * sizeof(uint4));  // not zero: a read before a write shows
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;
  std::vector<MmaLanes> mma;
  std::vector<uint4> smem;  // dynamic shared memory, 16-byte aligned
};

struct Cluster {
  explicit Cluster(unsigned int threads) : barrier(threads) {}
  std::barrier<> barrier;
  std::vector<Block*> blocks;
};

inline thread_local Block* block = nullptr;
inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned int rank = 0;

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(block->smem.data());
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args... args) {
  for (unsigned int b = 0; b < blocks; ++b) {
    Block state(threads, 0);
    std::vector<std::thread> pool;
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        block = &state;
        kernel(args...);
      });
    }
    for (auto& thread : pool) thread.join();
  }
}

// `blocks` blocks in clusters of `size` consecutive ones; the clusters one after another.
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), unsigned int blocks, unsigned int size, unsigned int threads,
                     size_t smem_bytes, Args... args) {
  for (unsigned int first = 0; first < blocks; first += size) {
    Cluster group(size * threads);
    std::vector<std::unique_ptr<Block>> states;
    for (unsigned int r = 0; r < size; ++r) {
      states.push_back(std::make_unique<Block>(threads, smem_bytes));
      group.blocks.push_back(states.back().get());
    }
    std::vector<std::thread> pool;
    for (unsigned int r = 0; r < size; ++r) {
      for (unsigned int t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = first + r;
          block = group.blocks[r];
          cluster = &group;
          rank = r;
          kernel(args...);
        });
      }
    }
    for (auto& thread : pool) thread.join();
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + D for the warp's 16 x 16 A
// and 16 x 8 B, each lane holding its fragments (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"): a register i of lane l holds A[l / 4 + 8 (i % 2)][2 (l % 4) + 8 (i / 2) + {0, 1}]
// (low half first), b0 B[2 (l % 4) + {0, 1}][l / 4], b1 the same 8 rows down; d[i]
// D[l / 4 + 8 (i / 2)][2 (l % 4) + i % 2]. Summed in float, in k order.
template <typename S>
void mma_16x8x16(float (&d)[4], const uint4& a, uint32_t b0, uint32_t b1) {
  const unsigned int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  MmaLanes& lanes = block->mma[warp];
  lanes.a[lane] = a;
  lanes.b0[lane] = b0;
  lanes.b1[lane] = b1;
  block->warps[warp]->arrive_and_wait();
  const auto value = [](uint32_t reg, int half) {
    return static_cast<float>(S(static_cast<uint16_t>(reg >> (16 * half)), S::from_bits()));
  };
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t regs[4] = {lanes.a[l].x, lanes.a[l].y, lanes.a[l].z, lanes.a[l].w};
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) A[l / 4 + 8 * (i % 2)][2 * (l % 4) + 8 * (i / 2) + h] = value(regs[i], h);
    }
    for (int h = 0; h < 2; ++h) {
      B[2 * (l % 4) + h][l / 4] = value(lanes.b0[l], h);
      B[2 * (l % 4) + 8 + h][l / 4] = value(lanes.b1[l], h);
    }
  }
  block->warps[warp]->arrive_and_wait();  // every lane has read the operands before they change
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] = sum;
  }
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block->barrier.arrive_and_wait(); }

inline double __shfl_xor_sync(unsigned int, double v, int offset) {
  auto& state = *cuda_emulation::block;
  auto& warp = *state.warps[threadIdx.x / 32];
  state.exchange[threadIdx.x] = v;
  warp.arrive_and_wait();
  const double other = state.exchange[threadIdx.x ^ offset];
  warp.arrive_and_wait();
  return other;
}

namespace cooperative_groups {

// this_cluster(): the cluster of launch_clusters (1-D), its barrier and its blocks' shared memory.
struct cluster_group {
  unsigned int block_rank() const { return cuda_emulation::rank; }
  unsigned int num_blocks() const { return static_cast<unsigned int>(cuda_emulation::cluster->blocks.size()); }
  void sync() const { cuda_emulation::cluster->barrier.arrive_and_wait(); }
  // The address in block `r`'s shared memory of `p` in this block's.
  template <typename T>
  T* map_shared_rank(T* p, unsigned int r) const {
    const auto offset = reinterpret_cast<char*>(p) - reinterpret_cast<char*>(cuda_emulation::block->smem.data());
    return reinterpret_cast<T*>(reinterpret_cast<char*>(cuda_emulation::cluster->blocks[r]->smem.data()) + offset);
  }
};

inline cluster_group this_cluster() { return {}; }

// this_grid() of a kernel launched with launch_clusters as one cluster of all its blocks.
struct grid_group {
  void sync() const { cuda_emulation::cluster->barrier.arrive_and_wait(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
