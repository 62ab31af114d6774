// Whole-sequence LSTM / GRU on the GPU: the time loop of
// attnkit/rnn_sequence.h with cuBLAS GEMMs through ATen and one fused
// elementwise kernel per step, using the gate math shared with the CPU code.
// float32 / float16 / bfloat16 (and float64); gate math in float for halves.
#include "attnkit/rnn.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attnkit/gate_math.h"
#include "attnkit/rnn_sequence.h"

namespace attnkit {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t units) {
  return std::min<int64_t>((units + kThreads - 1) / kThreads, 65535);
}

#define ATTNKIT_UNITS_LOOP(units) \
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < (units); u += int64_t(gridDim.x) * blockDim.x)

__device__ __forceinline__ bool running(const int64_t* len, int64_t b, int64_t t) {
  return len == nullptr || t < len[b];
}

template <typename S>
__global__ void lstm_forward_kernel(S* __restrict__ pre, const S* __restrict__ gh, S* __restrict__ c, S* __restrict__ h, S* __restrict__ out,
                                    S* __restrict__ cs, S* __restrict__ hc, const int64_t* __restrict__ len,
                                    int64_t t, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row = b * 4 * H + j;
    if (!running(len, b, t)) {  // keep the state, output 0
      if (cs) cs[u] = c[u];
      if (out) out[u] = S(0);
      if (hc) hc[u] = S(0);
      continue;
    }
    const auto a = gates::lstm_activate<acc_t>(
        static_cast<acc_t>(pre[row]) + static_cast<acc_t>(gh[row]),
        static_cast<acc_t>(pre[row + H]) + static_cast<acc_t>(gh[row + H]),
        static_cast<acc_t>(pre[row + 2 * H]) + static_cast<acc_t>(gh[row + 2 * H]),
        static_cast<acc_t>(pre[row + 3 * H]) + static_cast<acc_t>(gh[row + 3 * H]));
    const acc_t c_new = gates::lstm_cell_state<acc_t>(a, static_cast<acc_t>(c[u]));
    const acc_t h_new = gates::lstm_hidden_state<acc_t>(a, c_new);
    pre[row] = a.i;
    pre[row + H] = a.f;
    pre[row + 2 * H] = a.g;
    pre[row + 3 * H] = a.o;
    c[u] = c_new;
    if (cs) cs[u] = c_new;
    if (h) {
      h[u] = h_new;
      out[u] = h_new;
    } else {
      hc[u] = h_new;
    }
  }
}

template <typename S>
__global__ void lstm_backward_kernel(const S* __restrict__ gates_in, const S* __restrict__ c_prev,
                                     const S* __restrict__ c_new, const S* __restrict__ dh, S* __restrict__ dc,
                                     S* __restrict__ gpre, const int64_t* __restrict__ len, int64_t t, int64_t B,
                                     int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row = b * 4 * H + j;
    if (!running(len, b, t)) {  // dc passes through
      gpre[row] = gpre[row + H] = gpre[row + 2 * H] = gpre[row + 3 * H] = S(0);
      continue;
    }
    const gates::LstmGates<acc_t> a{gates_in[row], gates_in[row + H], gates_in[row + 2 * H], gates_in[row + 3 * H]};
    const auto d = gates::lstm_backward<acc_t>(a, c_prev[u], c_new[u], dh[u], dc[u]);
    gpre[row] = d.pre_i;
    gpre[row + H] = d.pre_f;
    gpre[row + 2 * H] = d.pre_g;
    gpre[row + 3 * H] = d.pre_o;
    dc[u] = d.c_prev;
  }
}

template <typename S>
__global__ void gru_forward_kernel(const S* __restrict__ gi, const S* __restrict__ gh, S* __restrict__ h,
                                   S* __restrict__ out, S* __restrict__ gates_out, const int64_t* __restrict__ len,
                                   int64_t t, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row3 = b * 3 * H + j, row4 = b * 4 * H + j;
    if (!running(len, b, t)) {
      out[u] = S(0);
      continue;
    }
    const auto a = gates::gru_activate<acc_t>(gi[row3], gi[row3 + H], gi[row3 + 2 * H], gh[row3], gh[row3 + H],
                                              gh[row3 + 2 * H]);
    const acc_t h_new = gates::gru_hidden_state<acc_t>(a, static_cast<acc_t>(h[u]));
    gates_out[row4] = a.r;
    gates_out[row4 + H] = a.z;
    gates_out[row4 + 2 * H] = a.n;
    gates_out[row4 + 3 * H] = a.hn;
    h[u] = h_new;
    out[u] = h_new;
  }
}

template <typename S>
__global__ void gru_backward_kernel(const S* __restrict__ gates_in, const S* __restrict__ h_prev,
                                    const S* __restrict__ grad_out, S* __restrict__ dh, S* __restrict__ dgi,
                                    S* __restrict__ dgh, const int64_t* __restrict__ len, int64_t t, int64_t B,
                                    int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row3 = b * 3 * H + j, row4 = b * 4 * H + j;
    if (!running(len, b, t)) {  // dh passes through; the output was a constant 0
      dgi[row3] = dgi[row3 + H] = dgi[row3 + 2 * H] = S(0);
      dgh[row3] = dgh[row3 + H] = dgh[row3 + 2 * H] = S(0);
      continue;
    }
    const gates::GruGates<acc_t> a{gates_in[row4], gates_in[row4 + H], gates_in[row4 + 2 * H], gates_in[row4 + 3 * H]};
    const auto d = gates::gru_backward<acc_t>(a, static_cast<acc_t>(h_prev[u]),
                                              static_cast<acc_t>(dh[u]) + static_cast<acc_t>(grad_out[u]));
    dgi[row3] = d.gi_r;
    dgi[row3 + H] = d.gi_z;
    dgi[row3 + 2 * H] = d.gi_n;
    dgh[row3] = d.gi_r;
    dgh[row3 + H] = d.gi_z;
    dgh[row3 + 2 * H] = d.gh_n;
    dh[u] = d.h_prev;
  }
}

enum class RowOp { kCopy, kAdd, kZero };

template <typename S>
__global__ void rows_kernel(RowOp op, S* __restrict__ dst, const S* __restrict__ src, const int64_t* __restrict__ len,
                            int64_t t, int64_t B, int64_t N) {
  ATTNKIT_UNITS_LOOP(B * N) {
    if (!running(len, u / N, t)) continue;
    if (op == RowOp::kCopy) {
      dst[u] = src[u];
    } else if (op == RowOp::kAdd) {
      dst[u] = static_cast<at::opmath_type<S>>(dst[u]) + static_cast<at::opmath_type<S>>(src[u]);
    } else {
      dst[u] = S(0);
    }
  }
}

template <typename S>
S* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<S>() : nullptr;
}

#define ATTNKIT_DISPATCH(type, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, name, __VA_ARGS__)

// The device kernels of rnn_sequence.h's time loop (contract in csrc/cpu/rnn.cpp).
struct Kernels {
  static at::Tensor device_lengths(const c10::optional<at::Tensor>& lengths, const at::Tensor& x) {
    return rnn::present(lengths) ? lengths->to(x.device()) : at::Tensor();
  }

  // a w^T + bias on cuBLAS.
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    return rnn::present(bias) ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  }

  // cuBLAS takes the plain weight: nothing to prepare.
  static at::Tensor step_weight(const at::Tensor&, int64_t) { return at::Tensor(); }
  static at::Tensor step_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor&,
                                const c10::optional<at::Tensor>& bias) {
    return linear(a, w, bias);
  }

  // The persistent small-batch kernel (W_hh kept on chip across steps) is its own backend: rnn_persistent.cu.

  // The CPU's fused-step loops (csrc/cpu/rnn_fused.cpp): the per-step path here.
  static bool lstm_forward_fused(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                 const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&, bool) {
    return false;
  }
  static bool lstm_backward_fused(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                                  const std::vector<int64_t>&) {
    return false;
  }
  static bool gru_forward_fused(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                const at::Tensor&, const c10::optional<at::Tensor>&, at::Tensor&, at::Tensor&,
                                at::Tensor&, const at::Tensor&, const std::vector<int64_t>&, bool) {
    return false;
  }
  static bool gru_backward_fused(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&,
                                 const std::vector<int64_t>&) {
    return false;
  }
  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& w) { return at::mm(a, w); }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
  static void transpose_into(const at::Tensor& src, const at::Tensor& dst) { dst.copy_(src.t()); }
  static constexpr bool kPacksRunningRows = false;  // the backward's GEMMs run over every row
  static at::Tensor workspace(int, at::IntArrayRef sizes, const at::TensorOptions& opts) {
    return at::empty(sizes, opts);  // the CUDA caching allocator already reuses blocks
  }

  static void lstm_forward_step(at::Tensor& pre, const at::Tensor& gh, at::Tensor& c, const at::Tensor& h,
                                const at::Tensor& out,
                                const at::Tensor& cs, const at::Tensor& hc, const at::Tensor& len, int64_t t) {
    const int64_t B = c.size(0), H = c.size(1);
    if (B * H == 0) return;
    ATTNKIT_DISPATCH(c.scalar_type(), "attnkit_lstm_forward_step_cuda", [&] {
      lstm_forward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(pre), ptr<scalar_t>(gh), ptr<scalar_t>(c), ptr<scalar_t>(h), ptr<scalar_t>(out), ptr<scalar_t>(cs),
          ptr<scalar_t>(hc), ptr<int64_t>(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void lstm_backward_step(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c_new,
                                 const at::Tensor& dh, at::Tensor& dc, at::Tensor& gpre, const at::Tensor& len,
                                 int64_t t) {
    const int64_t B = dc.size(0), H = dc.size(1);
    if (B * H == 0) return;
    ATTNKIT_DISPATCH(dc.scalar_type(), "attnkit_lstm_backward_step_cuda", [&] {
      lstm_backward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(gates), ptr<scalar_t>(c_prev), ptr<scalar_t>(c_new), ptr<scalar_t>(dh), ptr<scalar_t>(dc),
          ptr<scalar_t>(gpre), ptr<int64_t>(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gru_forward_step(const at::Tensor& gi, const at::Tensor& gh, at::Tensor& h, const at::Tensor& out,
                               const at::Tensor& gates, const at::Tensor& len, int64_t t) {
    const int64_t B = h.size(0), H = h.size(1);
    if (B * H == 0) return;
    ATTNKIT_DISPATCH(h.scalar_type(), "attnkit_gru_forward_step_cuda", [&] {
      gru_forward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(gi), ptr<scalar_t>(gh), ptr<scalar_t>(h), ptr<scalar_t>(out), ptr<scalar_t>(gates),
          ptr<int64_t>(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gru_backward_step(const at::Tensor& gates, const at::Tensor& h_prev, const at::Tensor& grad_out,
                                at::Tensor& dh, const at::Tensor& dgi, at::Tensor& dgh, const at::Tensor& len,
                                int64_t t) {
    const int64_t B = dh.size(0), H = dh.size(1);
    if (B * H == 0) return;
    ATTNKIT_DISPATCH(dh.scalar_type(), "attnkit_gru_backward_step_cuda", [&] {
      gru_backward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(gates), ptr<scalar_t>(h_prev), ptr<scalar_t>(grad_out), ptr<scalar_t>(dh),
          ptr<scalar_t>(dgi), ptr<scalar_t>(dgh), ptr<int64_t>(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void rows_op(RowOp op, at::Tensor& dst, const at::Tensor& src, const at::Tensor& len, int64_t t) {
    const int64_t B = dst.size(0), N = dst.size(1);
    if (B * N == 0) return;
    ATTNKIT_DISPATCH(dst.scalar_type(), "attnkit_rnn_rows_cuda", [&] {
      rows_kernel<scalar_t><<<num_blocks(B * N), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          op, ptr<scalar_t>(dst), ptr<scalar_t>(src), ptr<int64_t>(len), t, B, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static void copy_active_rows(at::Tensor& dst, const at::Tensor& src, const at::Tensor& len, int64_t t) {
    rows_op(RowOp::kCopy, dst, src, len, t);
  }
  static void add_active_rows(at::Tensor& dst, const at::Tensor& src, const at::Tensor& len, int64_t t) {
    rows_op(RowOp::kAdd, dst, src, len, t);
  }
  static void zero_active_rows(at::Tensor& dst, const at::Tensor& len, int64_t t) {
    rows_op(RowOp::kZero, dst, at::Tensor(), len, t);
  }
};

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "attnkit._C_cuda rnn: x must be a CUDA tensor, got ", x.device());
}

}  // namespace

std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                     bool save) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn::lstm_forward<Kernels>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save);
}

std::vector<at::Tensor> lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                      const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                      const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cs,
                                      const at::Tensor& hc) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn::lstm_backward<Kernels>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, output,
                                     gates, cs, hc);
}

std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
                                    bool save) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn::gru_forward<Kernels>(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
}

std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return rnn::gru_backward<Kernels>(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates);
}

}  // namespace cuda
}  // namespace attnkit
