// Persistent small-batch LSTM / GRU forward (inference): ONE launch runs all T
// steps. Block k owns hidden units [k U, k U + U) and keeps their rows of W_hh
// (all 4 LSTM / 3 GRU gates) in shared memory for the whole sequence, so the
// weights are read from HBM once instead of once per step (FlashRNN's idea).
// Per step a block stages h_{t-1} (B x H, small) from global memory, computes
// its slice of W_hh h_{t-1}, applies the gate math of attnkit/gate_math.h and
// writes its slice of h_t; then the whole grid meets at a barrier.
//
// The barrier is cooperative_groups' grid.sync() under cudaLaunchCooperativeKernel,
// not a hand-written generation counter: a cooperative launch is refused
// (cudaErrorCooperativeLaunchTooLarge) when the grid cannot be co-resident,
// where a hand-written barrier would hang the GPU; grid.sync() also carries the
// memory fences that make every block's h_t writes visible to every block.
//
// h is double-buffered in global memory: step t reads buffer t & 1 and writes
// buffer (t + 1) & 1. One barrier per step is enough: a block that runs ahead
// into step t + 1 writes buffer t & 1 only after every block has passed the
// barrier of step t, i.e. after every block finished reading it.
// The h pointers are deliberately not __restrict__/const-qualified for the whole
// kernel: buffers written by other blocks must not be read through the
// non-coherent read-only cache.
//
// Batch 1..8, float32 / float16 / bfloat16 storage, float accumulation. The
// host checks the shared-memory fit and co-residency first and reports "not
// taken" (an empty result) so the caller can fall back to the per-step path.
// With ATTNKIT_RNN_CLUSTER=1, float16 / bfloat16 run on one thread-block cluster
// instead where it fits (rnn_cluster.cu: no grid barrier, tensor cores).
#include "attnkit/rnn_persistent.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "attnkit/rnn_sequence.h"
#include "rnn_cluster.h"
#include "rnn_persistent_kernel.cuh"

namespace attnkit {
namespace cuda {
namespace {

using namespace grid_rnn;  // the kernel and its Params (rnn_persistent_kernel.cuh)

// Work split and fit for (G, B, H, dtype) on the current device; reason empty when it runs.
struct Plan {
  int units = 0, blocks = 0;
  size_t smem = 0;
  std::string reason;
};

template <typename S, int G>
Plan make_plan(int64_t B, int64_t H) {
  Plan plan;
  if (B < 1 || B > kMaxBatch) {
    plan.reason = "the persistent kernel takes batch 1.." + std::to_string(kMaxBatch) + ", got " + std::to_string(B);
    return plan;
  }
  const int device = c10::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  if (!prop->cooperativeLaunch) {
    plan.reason = std::string("the device (") + prop->name + ") does not support cooperative launches";
    return plan;
  }
  // One block per SM with as few units each as that allows: the smallest slice of W_hh per block.
  const int64_t sms = prop->multiProcessorCount;
  const int64_t units = (H + sms - 1) / sms;
  plan.units = static_cast<int>(units);
  plan.blocks = static_cast<int>((H + units - 1) / units);
  if (B * units > kThreads) {  // the kernel's one gate thread per (batch row, unit)
    plan.reason = "the persistent kernel takes at most " + std::to_string(kThreads) +
                  " (batch row, unit) pairs per block, got " + std::to_string(B * units);
    return plan;
  }
  plan.smem = smem_bytes<S>(G, B, H, units);
  if (plan.smem > prop->sharedMemPerBlockOptin) {
    plan.reason = "W_hh does not fit on chip: " + std::to_string(units) + " units per block over " +
                  std::to_string(sms) + " SMs need " + std::to_string(plan.smem) +
                  " bytes of shared memory per block, the device allows " +
                  std::to_string(prop->sharedMemPerBlockOptin);
    return plan;
  }
  const auto kernel = rnn_persistent_kernel<S, G>;
  // The device's limit, not this call's size: host threads planning other sizes set the same value (no race
  // between one thread's setting and another's launch); occupancy and launches take each call's own size.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(prop->sharedMemPerBlockOptin)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, plan.smem));
  if (int64_t(per_sm) * sms < plan.blocks) {
    plan.reason = "the grid of " + std::to_string(plan.blocks) + " blocks cannot be co-resident (" +
                  std::to_string(per_sm) + " per SM x " + std::to_string(sms) + " SMs)";
  }
  return plan;
}

template <int G, typename F>
auto with_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, "attnkit persistent rnn: dtype must be float32, float16 or bfloat16, got ", dtype);
  }
}

template <int G>
Plan plan_for(at::ScalarType dtype, int64_t B, int64_t H) {
  return with_dtype<G>(dtype, [&](auto s) { return make_plan<decltype(s), G>(B, H); });
}

// The grid kernel on the prepared buffers (see run).
template <int G>
void launch_grid(const Plan& plan, const at::Tensor& w_hh, const at::Tensor& pre, const c10::optional<at::Tensor>& b_hh,
                 at::Tensor& h, at::Tensor& c, at::Tensor& output, const at::Tensor& len, int64_t T, int64_t B,
                 int64_t H) {
  with_dtype<G>(w_hh.scalar_type(), [&](auto s) {
    using S = decltype(s);
    Params<S> p{w_hh.data_ptr<S>(),
                pre.data_ptr<S>(),
                G == 3 && rnn::present(b_hh) ? b_hh->data_ptr<S>() : nullptr,
                h.data_ptr<S>(),
                c.defined() ? c.data_ptr<float>() : nullptr,
                output.data_ptr<S>(),
                len.defined() ? len.data_ptr<int64_t>() : nullptr,
                static_cast<int>(T),
                static_cast<int>(B),
                static_cast<int>(H),
                plan.units};
    void* args[] = {&p};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(rnn_persistent_kernel<S, G>),
                                               dim3(plan.blocks), dim3(kThreads), args, plan.smem,
                                               at::cuda::getCurrentCUDAStream()));
    return 0;
  });
}

// Runs the layer when the plan allows; returns {} (not taken) otherwise. save (training):
// the cluster kernel only, which also returns the saved gates (and LSTM cell states).
template <int G>
std::vector<at::Tensor> run(const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                            const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
                            bool save = false) {
  TORCH_CHECK(x.is_cuda(), "attnkit persistent rnn: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  rnn::check_forward(x, h0, G == 4 ? &*c0 : nullptr, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths, G);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  TORCH_CHECK(T <= INT32_MAX && B * H <= INT32_MAX, "attnkit persistent rnn: sizes too large");
  cluster_rnn::Plan cluster_plan;
  cluster_plan.reason = "off";
  if (x.scalar_type() != at::kFloat && cluster_rnn::enabled()) {
    cluster_plan = cluster_rnn::plan(G, B, H, x.scalar_type(), x.device());
  }
  const bool on_cluster = cluster_plan.reason.empty();
  Plan plan;
  if (!on_cluster) {
    if (save) return {};
    plan = plan_for<G>(x.scalar_type(), B, H);
    if (!plan.reason.empty()) return {};
  }

  // The input projections of all steps: one cuBLAS GEMM (LSTM: both biases folded in).
  c10::optional<at::Tensor> bias = b_ih;
  if (G == 4 && rnn::present(b_hh)) bias = rnn::present(b_ih) ? *b_ih + *b_hh : *b_hh;
  const at::Tensor x2 = x.view({T * B, I});
  const at::Tensor pre = (rnn::present(bias) ? at::addmm(*bias, x2, w_ih.t()) : at::mm(x2, w_ih.t())).contiguous();
  at::Tensor h = at::empty({2, B, H}, x.options());
  h[0].copy_(h0);
  // A copy even when c0 is float32 already: the kernel updates c in place.
  at::Tensor c = G == 4 ? c0->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous() : at::Tensor();
  at::Tensor output = at::empty({T, B, H}, x.options());
  const at::Tensor len = rnn::present(lengths) ? lengths->to(x.device()) : at::Tensor();

  // Saved gates of stopped rows are never read (the backward skips those rows).
  at::Tensor saved_gates = save ? at::empty({T, B, 4 * H}, x.options()) : at::Tensor();
  at::Tensor saved_cs = save && G == 4 ? at::empty({T, B, H}, x.options()) : at::Tensor();
  if (on_cluster) {
    cluster_rnn::launch(G, cluster_plan, w_hh, pre, b_hh, h, c, output, len, saved_gates, saved_cs, T, B, H);
  } else {
    launch_grid<G>(plan, w_hh, pre, b_hh, h, c, output, len, T, B, H);
  }
  at::Tensor h_n = h[T & 1].clone();
  if (G == 4) {
    if (save) return {output, h_n, c.to(x.scalar_type()), saved_gates, saved_cs};
    return {output, h_n, c.to(x.scalar_type())};
  }
  if (save) return {output, h_n, saved_gates};
  return {output, h_n};
}

}  // namespace

std::string rnn_persistent_unsupported(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype,
                                       at::Device device) {
  TORCH_CHECK(device.is_cuda(), "attnkit persistent rnn: device must be a CUDA device, got ", device);
  TORCH_CHECK(gates == 3 || gates == 4, "attnkit persistent rnn: gates must be 4 (LSTM) or 3 (GRU), got ", gates);
  TORCH_CHECK(hidden >= 1 && hidden <= INT32_MAX, "attnkit persistent rnn: hidden_size must be >= 1, got ", hidden);
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) {
    return std::string("the persistent kernel takes float32, float16, bfloat16, got ") + c10::toString(dtype);
  }
  if (dtype != at::kFloat && cluster_rnn::enabled() && cluster_rnn::plan(gates, batch, hidden, dtype, device).reason.empty()) {
    return "";  // run() takes the cluster kernel, at any batch
  }
  const c10::cuda::CUDAGuard guard(device);
  return gates == 4 ? plan_for<4>(dtype, batch, hidden).reason : plan_for<3>(dtype, batch, hidden).reason;
}

std::vector<std::string> rnn_cluster_plan(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype,
                                          at::Device device) {
  TORCH_CHECK(device.is_cuda(), "attnkit cluster rnn: device must be a CUDA device");
  TORCH_CHECK(gates == 3 || gates == 4, "attnkit cluster rnn: gates must be 4 (LSTM) or 3 (GRU)");
  TORCH_CHECK(hidden >= 1 && hidden <= INT32_MAX, "attnkit cluster rnn: hidden_size must be >= 1");
  const cluster_rnn::Plan plan = cluster_rnn::plan(gates, batch, hidden, dtype, device);
  return {std::to_string(plan.cluster), plan.reason, std::to_string(plan.clusters_at_once)};
}

std::vector<at::Tensor> lstm_forward_persistent(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                const c10::optional<at::Tensor>& b_ih,
                                                const c10::optional<at::Tensor>& b_hh,
                                                const c10::optional<at::Tensor>& lengths) {
  return run<4>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths);
}

std::vector<at::Tensor> gru_forward_persistent(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                               const c10::optional<at::Tensor>& b_hh,
                                               const c10::optional<at::Tensor>& lengths) {
  return run<3>(x, h0, c10::nullopt, w_ih, w_hh, b_ih, b_hh, lengths);
}

std::vector<at::Tensor> lstm_forward_cluster_save(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& b_ih,
                                                  const c10::optional<at::Tensor>& b_hh,
                                                  const c10::optional<at::Tensor>& lengths) {
  return run<4>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, /*save=*/true);
}

std::vector<at::Tensor> gru_forward_cluster_save(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                 const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                 const c10::optional<at::Tensor>& b_hh,
                                                 const c10::optional<at::Tensor>& lengths) {
  return run<3>(x, h0, c10::nullopt, w_ih, w_hh, b_ih, b_hh, lengths, /*save=*/true);
}

}  // namespace cuda
}  // namespace attnkit
