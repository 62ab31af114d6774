// Persistent LSTM / GRU backward on thread-block clusters (float16 / bfloat16,
// sm_90+, opt-in ATTNKIT_RNN_CLUSTER=1): the reverse time loop of rnn.cu's
// per-step backward in one launch, on the forward's split (rnn_cluster.cu): one
// cluster for each 8 batch rows, block k owning units [k U, k U + U).
// Each step, walking t down:
// - each gate thread (batch row, unit) adds the step's output gradient to the
//   carried dh, applies the gate backward of attnkit/gate_math.h to the saved
//   gates (LSTM: and cell states; its dc stays in a register) and writes the
//   pre-activation gradients for the weight-gradient GEMMs after the loop;
// - the block multiplies its own gate rows' gradients by its rows of W_hh,
//   transposed (held in shared memory in mma.sync fragment order): a partial
//   dh_(t-1) over all H units, whose slices it writes into their owners'
//   shared memory (one slot per sending block, double-buffered);
// - one cluster barrier; the next step's owners sum their C slots.
// A stopped row (t >= length) passes dh (and dc) through with zero gradients.
// Written without a GPU (2026-11-27): opt-in until a GPU run has checked it.
#include "attnkit/rnn_persistent.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "attnkit/rnn_sequence.h"
#include "rnn_cluster.h"
#include "rnn_cluster_backward_kernel.cuh"

namespace attnkit {
namespace cuda {
namespace cluster_rnn {
namespace {

// The forward's split, if the backward's shared memory also fits and its clusters can run.
template <typename S, int G>
Plan back_plan(int64_t B, int64_t H, at::ScalarType dtype, at::Device device) {
  Plan plan = cluster_rnn::plan(G, B, H, dtype, device);
  if (!plan.reason.empty()) return plan;
  const auto kernel = rnn_cluster_backward_kernel<S, G>;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  plan.smem = back_smem_bytes(plan.cluster, plan.units, plan.row_tiles, plan.k_tiles);
  if (plan.smem > prop->sharedMemPerBlockOptin) {
    plan.reason = "the backward's shared memory (" + std::to_string(plan.smem) + " bytes) does not fit";
    return plan;
  }
  // The forward's cluster size was asked of the device with the forward's shared memory: ask again
  // with the backward's, so a cluster that cannot run falls back instead of failing its launch.
  if (clusters_at_once(kernel, plan.cluster, plan.smem, *prop) == 0) {
    plan.reason = "the backward's clusters (" + std::to_string(plan.cluster) + " blocks, " + std::to_string(plan.smem) +
                  " bytes of shared memory each) do not run on this device";
    return plan;
  }
  plan.k_split = back_k_split(plan.k_tiles);
  return plan;
}

template <int G>
std::vector<at::Tensor> run_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                     const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x,
                                     const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates, const c10::optional<at::Tensor>& cs) {
  TORCH_CHECK(x.is_cuda(), "attnkit cluster rnn backward: x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  // The per-step backward's checks (rnn_sequence.h): shapes, dtypes, devices, contiguity.
  rnn::check_forward(x, h0, G == 4 ? &*c0 : nullptr, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths, G);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  rnn::check_grad(grad_output, "grad_output", x, {T, B, H});
  rnn::check_grad(grad_hn, "grad_hn", x, {B, H});
  rnn::check_grad(output, "output", x, {T, B, H});
  rnn::check_grad(gates, "gates", x, {T, B, 4 * H});
  if (G == 4) {
    rnn::check_grad(*grad_cn, "grad_cn", x, {B, H});
    rnn::check_grad(*cs, "cs", x, {T, B, H});
  }
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return {};
  if (T == 0 || B == 0 || B * H > INT32_MAX || T > INT32_MAX) return {};
  Plan plan = with_half(x.scalar_type(), [&](auto s) { return back_plan<decltype(s), G>(B, H, x.scalar_type(), x.device()); });
  if (!plan.reason.empty()) return {};

  const at::Tensor &go = grad_output, &gn = grad_hn, &g = gates, &out_c = output, &h0_c = h0;  // contiguous (checked)
  const at::Tensor gcn = G == 4 ? *grad_cn : at::Tensor();
  const at::Tensor cs_c = G == 4 ? *cs : at::Tensor(), c0_c = G == 4 ? *c0 : at::Tensor();
  const at::Tensor len = rnn::present(lengths) ? lengths->to(x.device()) : at::Tensor();
  at::Tensor dpre = at::empty({T, B, (G == 4 ? 4 : 3) * H}, x.options());
  at::Tensor dgh = G == 3 ? at::empty({T, B, 3 * H}, x.options()) : at::Tensor();
  at::Tensor dh0 = at::empty({B, H}, x.options());
  at::Tensor dc0 = G == 4 ? at::empty({B, H}, x.options()) : at::Tensor();

  with_half(x.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<S>() : nullptr; };
    BackParams<S> p{w_hh.data_ptr<S>(), g.data_ptr<S>(), data(cs_c), data(c0_c), G == 3 ? h0_c.data_ptr<S>() : nullptr,
                    G == 3 ? out_c.data_ptr<S>() : nullptr, go.data_ptr<S>(), gn.data_ptr<S>(), data(gcn),
                    len.defined() ? len.data_ptr<int64_t>() : nullptr, dpre.data_ptr<S>(), data(dgh),
                    dh0.data_ptr<S>(), data(dc0), static_cast<int>(T), static_cast<int>(B), static_cast<int>(H),
                    plan.units, plan.row_tiles, plan.k_tiles, plan.k_split};
    cudaLaunchAttribute attribute;
    const cudaLaunchConfig_t config =
        cluster_config(plan.cluster, plan.cluster * ((B + kBatchTile - 1) / kBatchTile), plan.smem,
                       at::cuda::getCurrentCUDAStream(), attribute);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, rnn_cluster_backward_kernel<S, G>, p));
    return 0;
  });

  // The weight gradients and dx from the whole sequence's gate gradients, as rnn_sequence.h
  // does: h_(t-1) = h0, output[0], ..., output[T - 2] (a stopped row's gradients are 0).
  const at::Tensor x2 = x.reshape({T * B, I});
  const at::Tensor h_prev = at::cat({h0_c.unsqueeze(0), out_c.narrow(0, 0, T - 1)}, 0).view({T * B, H});
  const at::Tensor dgi2 = dpre.view({T * B, -1}), dgh2 = G == 4 ? dgi2 : dgh.view({T * B, 3 * H});
  at::Tensor dx = at::mm(dgi2, w_ih).view({T, B, I});
  at::Tensor dw_ih = at::mm(dgi2.t(), x2), dw_hh = at::mm(dgh2.t(), h_prev);
  if (G == 4) return {dx, dh0, dc0, dw_ih, dw_hh, dgi2.sum(0)};
  return {dx, dh0, dw_ih, dw_hh, dgi2.sum(0), dgh2.sum(0)};
}

}  // namespace
}  // namespace cluster_rnn

std::vector<at::Tensor> lstm_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                              const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                              const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                              const at::Tensor& gates, const at::Tensor& cs) {
  return cluster_rnn::run_backward<4>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, lengths, output, gates, cs);
}

std::vector<at::Tensor> gru_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                             const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& lengths,
                                             const at::Tensor& output, const at::Tensor& gates) {
  return cluster_rnn::run_backward<3>(grad_output, grad_hn, c10::nullopt, x, h0, c10::nullopt, w_ih, w_hh, lengths,
                                      output, gates, c10::nullopt);
}

}  // namespace cuda
}  // namespace attnkit
