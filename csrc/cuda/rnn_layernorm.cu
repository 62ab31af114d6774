// Layer-normalized LSTM / GRU with zoneout on the GPU (attnkit/rnn_layernorm.h): the
// time loops of attnkit/rnn_layernorm_sequence.h, shared with the CPU code, with cuBLAS
// GEMMs through ATen and the per-row kernels of rnn_layernorm_kernels.cuh. float32 and
// float64. Written without a GPU to run it (2026-11-27): opt-in (ATTNKIT_RNN_LN_CUDA=1,
// backends/rnn_layernorm.py) until a GPU run has checked it against the CPU kernels.
#include "attnkit/rnn_layernorm.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "rnn_layernorm_kernels.cuh"

namespace attnkit {
namespace cuda {
namespace {

struct CudaLaunch {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr const char* kOp = "attnkit._C_cuda layer-norm rnn";

  template <typename... Params, typename... Args>
  static void run(void (*kernel)(Params...), unsigned int blocks, Args... args) {
    kernel<<<blocks, ln_rnn::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using Rows = ln_rnn::KernelRows<CudaLaunch>;

}  // namespace

std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                        const at::Tensor& g_ih, const at::Tensor& be_ih, const at::Tensor& g_hh,
                                        const at::Tensor& be_hh, const at::Tensor& g_c, const at::Tensor& be_c,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, bool save) {
  rnn_ln::check_x<Rows>(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn_ln::lstm_forward<Rows>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths,
                                    zoneout, save);
}

std::vector<at::Tensor> ln_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                         const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const at::Tensor& g_ih, const at::Tensor& g_hh, const at::Tensor& g_c,
                                         const at::Tensor& be_c, const c10::optional<at::Tensor>& lengths,
                                         const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                         const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                         const at::Tensor& cs, const at::Tensor& chat, const at::Tensor& rstd) {
  rnn_ln::check_x<Rows>(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn_ln::lstm_backward<Rows>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c, be_c,
                                     lengths, zoneout, output, xhat, hhat, gates, cs, chat, rstd);
}

std::vector<at::Tensor> ln_gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& g_ih,
                                       const at::Tensor& be_ih, const at::Tensor& g_hh, const at::Tensor& be_hh,
                                       const c10::optional<at::Tensor>& lengths,
                                       const c10::optional<at::Tensor>& zoneout, bool save) {
  rnn_ln::check_x<Rows>(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn_ln::gru_forward<Rows>(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save);
}

std::vector<at::Tensor> ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                        const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                        const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                        const at::Tensor& rstd) {
  rnn_ln::check_x<Rows>(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn_ln::gru_backward<Rows>(grad_output, grad_hn, x, h0, w_ih, w_hh, g_ih, g_hh, lengths, zoneout, output,
                                    xhat, hhat, gates, rstd);
}

}  // namespace cuda
}  // namespace attnkit
