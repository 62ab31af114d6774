// Just enough of CUDA to run simple kernels on CPU threads, for tests on machines
// without a GPU: every block's threads are std::threads, __syncthreads a
// std::barrier over them, __shfl_xor_sync an exchange through memory between two
// barriers of the warp; blocks run one after another, so __shared__ (a static) is
// the block's own. A barrier that some thread never reaches hangs, as it may on a
// GPU: run emulated kernels under a timeout.
#pragma once

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct EmulatedDim3 {
  unsigned int x = 0, y = 0, z = 0;
};

inline thread_local EmulatedDim3 threadIdx;
inline EmulatedDim3 blockIdx;

namespace cuda_emulation {

inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<double> exchange;

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int blocks, unsigned int threads, Args... args) {
  std::barrier<> block(threads);
  block_barrier = &block;
  warp_barriers.clear();
  for (unsigned int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  exchange.assign(threads, 0.0);
  for (unsigned int b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    std::vector<std::thread> pool;
    for (unsigned int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        kernel(args...);
      });
    }
    for (auto& thread : pool) thread.join();
  }
  block_barrier = nullptr;
}

}  // namespace cuda_emulation

inline void __syncthreads() { cuda_emulation::block_barrier->arrive_and_wait(); }

inline double __shfl_xor_sync(unsigned int, double v, int offset) {
  auto& warp = *cuda_emulation::warp_barriers[threadIdx.x / 32];
  cuda_emulation::exchange[threadIdx.x] = v;
  warp.arrive_and_wait();
  const double other = cuda_emulation::exchange[threadIdx.x ^ offset];
  warp.arrive_and_wait();
  return other;
}
