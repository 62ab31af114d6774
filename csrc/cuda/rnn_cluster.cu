// Persistent LSTM / GRU forward (inference, or training's forward saving what
// rnn.cu's per-step backward reads) on thread-block clusters, float16 /
// bfloat16, sm_90+: one cluster for each 8 batch rows (rows never interact, so
// the clusters need not run at the same time). The grid kernel of
// rnn_persistent.cu spreads W_hh over every SM and pays a grid-wide barrier
// (atomics through L2) each step; at H = 128..512 that barrier and the L2 round trips for h and the input
// projections are most of its 3-4 us a step. Here C = 1..16 blocks of one
// cluster share the work:
// - block k keeps its units' rows of W_hh in shared memory, pre-arranged in
//   mma.sync fragment order, and computes W_hh h_(t-1) on tensor cores
//   (m16n8k16: 16 gate rows x 8 batch columns, the batch padded to 8);
// - each block writes its slice of h_t straight into every block's shared
//   memory (distributed shared memory), double-buffered, and the cluster
//   meets at its hardware barrier (arrive.release / wait.acquire), one per
//   step: a block in step t + 1 writes buffer t & 1 of the others only after
//   all of them have passed step t's barrier, i.e. finished reading it;
// - each gate thread owns one (batch row, unit): its cell state stays in a
//   register and the next step's input projections are loaded while this
//   step's product runs.
// Opt-in (ATTNKIT_RNN_CLUSTER=1) until a GPU run has checked and timed it;
// written without one (2026-11-27).
#include "rnn_cluster.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "rnn_cluster_kernel.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {
namespace {

template <typename S, int G>
auto kernel_of() {
  return rnn_cluster_kernel<S, G>;
}

int forced_cluster_size() {
  const char* value = std::getenv("ATTNKIT_RNN_CLUSTER_SIZE");
  return value == nullptr ? 0 : std::atoi(value);
}

// The cluster's work split for (G, B, H), and whether this device takes it.
template <typename S, int G>
Plan make_plan(int64_t B, int64_t H) {
  Plan plan;
  const int device = c10::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (prop->major < 9) {
    plan.reason = std::string("the cluster kernel needs sm_90 or newer, the device (") + prop->name + ") is sm_" +
                  std::to_string(prop->major * 10 + prop->minor);
    return plan;
  }
  const auto kernel = kernel_of<S, G>();
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.ptxVersion < 90) {
    plan.reason = "attnkit._C_cuda was built without sm_90 code for the cluster kernel (TORCH_CUDA_ARCH_LIST)";
    return plan;
  }
  // The smallest cluster that split_fits takes and the device can run.
  // ATTNKIT_RNN_CLUSTER_SIZE forces one.
  const int forced = forced_cluster_size();
  for (int C = 1; C <= kMaxCluster; C *= 2) {
    if (forced != 0 && C != forced) continue;
    const Split split = split_for(G, H, C);
    const size_t smem = split.smem;
    if (!split_fits(split, B, C, prop->sharedMemPerBlockOptin, forced != 0)) continue;
    const int clusters = clusters_at_once(kernel, C, smem, *prop);
    if (clusters == 0) continue;
    plan.cluster = C;
    plan.units = split.units;
    plan.row_tiles = split.row_tiles;
    plan.k_tiles = split.k_tiles;
    plan.k_split = split.k_split;
    plan.smem = smem;
    plan.clusters_at_once = clusters;
    return plan;
  }
  plan.reason = forced != 0 ? "ATTNKIT_RNN_CLUSTER_SIZE=" + std::to_string(forced) +
                                  " is not a cluster size (1, 2, 4, 8, 16) this device takes for batch " +
                                  std::to_string(B) + ", hidden size " + std::to_string(H)
                            : "no cluster of up to 16 blocks holds W_hh of hidden size " + std::to_string(H) +
                                  " with one gate thread per (batch row, unit) at batch " +
                                  std::to_string(std::min<int64_t>(B, kBatchTile));
  return plan;
}

}  // namespace

Plan plan(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype, at::Device device) {
  Plan refused;
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    refused.reason = std::string("the cluster kernel takes float16 and bfloat16, got ") + c10::toString(dtype);
    return refused;
  }
  if (batch < 1 || batch > INT32_MAX / kBatchTile) {
    refused.reason = "the cluster kernel takes batch >= 1, got " + std::to_string(batch);
    return refused;
  }
  const c10::cuda::CUDAGuard guard(device);
  return with_half(dtype, [&](auto s) {
    using S = decltype(s);
    return gates == 4 ? make_plan<S, 4>(batch, hidden) : make_plan<S, 3>(batch, hidden);
  });
}

bool enabled() {
  const char* value = std::getenv("ATTNKIT_RNN_CLUSTER");
  return value != nullptr && std::string(value) == "1";
}

void launch(int64_t gates, const Plan& plan, const at::Tensor& w_hh, const at::Tensor& pre,
            const c10::optional<at::Tensor>& b_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output,
            const at::Tensor& len, at::Tensor& saved_gates, at::Tensor& saved_cs, int64_t T, int64_t B, int64_t H) {
  with_half(w_hh.scalar_type(), [&](auto s) {
    using S = decltype(s);
    Params<S> p{w_hh.data_ptr<S>(),
                pre.data_ptr<S>(),
                gates == 3 && b_hh.has_value() && b_hh->defined() ? b_hh->data_ptr<S>() : nullptr,
                h.data_ptr<S>(),
                c.defined() ? c.data_ptr<float>() : nullptr,
                output.data_ptr<S>(),
                len.defined() ? len.data_ptr<int64_t>() : nullptr,
                saved_gates.defined() ? saved_gates.data_ptr<S>() : nullptr,
                saved_cs.defined() ? saved_cs.data_ptr<S>() : nullptr,
                static_cast<int>(T),
                static_cast<int>(B),
                static_cast<int>(H),
                plan.units,
                plan.row_tiles,
                plan.k_tiles,
                plan.k_split};
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(plan.cluster, plan.cluster * ((B + kBatchTile - 1) / kBatchTile), plan.smem,
                       at::cuda::getCurrentCUDAStream(), attribute);
    if (gates == 4) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_of<S, 4>(), p));
    } else {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel_of<S, 3>(), p));
    }
    return 0;
  });
}

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
