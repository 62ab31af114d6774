// Fused LSTM cell step on the GPU: the GEMMs go to cuBLAS through ATen; the
// gate nonlinearities and state update are one elementwise kernel per
// direction, using the gate math shared with the CPU code.
#include "attnkit/lstm_cell.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attnkit/gate_math.h"

namespace attnkit {
namespace cuda {

namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t units) {
  const int64_t max_blocks = 65535;
  return std::min<int64_t>((units + kThreads - 1) / kThreads, max_blocks);
}

// b_ih / b_hh: (4H) biases or null, added here rather than by a separate
// b_ih + b_hh kernel and the GEMM's epilogue (one launch fewer a step, as torch's fused cell).
template <typename scalar_t>
__global__ void lstm_forward_kernel(const scalar_t* __restrict__ pre, const scalar_t* __restrict__ b_ih,
                                    const scalar_t* __restrict__ b_hh, const scalar_t* __restrict__ c,
                                    scalar_t* __restrict__ gates_out, scalar_t* __restrict__ h_new,
                                    scalar_t* __restrict__ c_new, int64_t units, int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / hidden, j = u % hidden;
    const int64_t row = b * 4 * hidden + j;
    const auto gate = [&](int64_t g) {
      acc_t value = static_cast<acc_t>(pre[row + g * hidden]);
      if (b_ih != nullptr) value += static_cast<acc_t>(b_ih[j + g * hidden]);
      if (b_hh != nullptr) value += static_cast<acc_t>(b_hh[j + g * hidden]);
      return value;
    };
    const auto a = gates::lstm_activate<acc_t>(gate(0), gate(1), gate(2), gate(3));
    const acc_t c_next = gates::lstm_cell_state<acc_t>(a, static_cast<acc_t>(c[u]));
    gates_out[row] = a.i;
    gates_out[row + hidden] = a.f;
    gates_out[row + 2 * hidden] = a.g;
    gates_out[row + 3 * hidden] = a.o;
    c_new[u] = c_next;
    h_new[u] = gates::lstm_hidden_state<acc_t>(a, c_next);
  }
}

template <typename scalar_t>
__global__ void lstm_backward_kernel(const scalar_t* __restrict__ gates_in, const scalar_t* __restrict__ c,
                                     const scalar_t* __restrict__ c_new, const scalar_t* __restrict__ grad_h,
                                     const scalar_t* __restrict__ grad_c, scalar_t* __restrict__ grad_pre,
                                     scalar_t* __restrict__ grad_c_prev, int64_t units, int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < units;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = u / hidden, j = u % hidden;
    const int64_t row = b * 4 * hidden + j;
    const gates::LstmGates<acc_t> a{gates_in[row], gates_in[row + hidden], gates_in[row + 2 * hidden],
                                    gates_in[row + 3 * hidden]};
    const auto d = gates::lstm_backward<acc_t>(a, c[u], c_new[u], grad_h[u], grad_c[u]);
    grad_pre[row] = d.pre_i;
    grad_pre[row + hidden] = d.pre_f;
    grad_pre[row + 2 * hidden] = d.pre_g;
    grad_pre[row + 3 * hidden] = d.pre_o;
    grad_c_prev[u] = d.c_prev;
  }
}

}  // namespace

std::vector<at::Tensor> lstm_cell_forward(const at::Tensor& x, const at::Tensor& h,
                                          const at::Tensor& c, const at::Tensor& w_ih,
                                          const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& b_ih,
                                          const c10::optional<at::Tensor>& b_hh) {
  check_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh);
  const c10::cuda::CUDAGuard device_guard(x.device());
  // The GEMMs below skip autograd's dispatch layers: the op's autograd is its own.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor pre = linear_gates(x, h, w_ih, w_hh, c10::nullopt, c10::nullopt);  // the kernel adds the biases
  const at::Tensor bias_ih = b_ih.has_value() && b_ih->defined() ? b_ih->contiguous() : at::Tensor();
  const at::Tensor bias_hh = b_hh.has_value() && b_hh->defined() ? b_hh->contiguous() : at::Tensor();
  at::Tensor gates = at::empty_like(pre);
  at::Tensor h_new = at::empty_like(c);
  at::Tensor c_new = at::empty_like(c);
  const int64_t units = c.numel();
  if (units == 0) return {h_new, c_new, gates};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lstm_cell_forward_cuda", [&] {
    lstm_forward_kernel<scalar_t><<<num_blocks(units), kThreads, 0, stream>>>(
        pre.data_ptr<scalar_t>(), bias_ih.defined() ? bias_ih.data_ptr<scalar_t>() : nullptr,
        bias_hh.defined() ? bias_hh.data_ptr<scalar_t>() : nullptr, c.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
        h_new.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(), units, c.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h_new, c_new, gates};
}

std::vector<at::Tensor> lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                           const at::Tensor& x, const at::Tensor& h,
                                           const at::Tensor& c, const at::Tensor& w_ih,
                                           const at::Tensor& w_hh, const at::Tensor& gates,
                                           const at::Tensor& c_new) {
  check_lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor grad_pre = at::empty_like(gates);
  at::Tensor grad_c_prev = at::empty_like(c);
  const int64_t units = c.numel();
  if (units > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lstm_cell_backward_cuda", [&] {
      lstm_backward_kernel<scalar_t><<<num_blocks(units), kThreads, 0, stream>>>(
          gates.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), c_new.data_ptr<scalar_t>(),
          grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
          grad_c_prev.data_ptr<scalar_t>(), units, c.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return linear_gates_backward(grad_pre, grad_c_prev, x, h, w_ih, w_hh);
}

}  // namespace cuda
}  // namespace attnkit
