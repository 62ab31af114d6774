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
#include "step_gemm.h"

#include <cstdlib>
#include <cstring>

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
    // gh null: the step's GEMM already added h W_hh^T into pre.
    const auto gate = [&](int64_t k) {
      return static_cast<acc_t>(pre[k]) + (gh != nullptr ? static_cast<acc_t>(gh[k]) : acc_t(0));
    };
    const auto a = gates::lstm_activate<acc_t>(gate(row), gate(row + H), gate(row + 2 * H), gate(row + 3 * H));
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

// dh: dL/dh_t, or with grad_out (the fused loop) the carried part of it, to
// which the kernel adds grad_out[u] and which it then zeroes for running rows,
// so that the step's GEMM (beta = 1) leaves dh_{t-1} there (stopped rows carry dh).
template <typename S>
__global__ void lstm_backward_kernel(const S* __restrict__ gates_in, const S* __restrict__ c_prev,
                                     const S* __restrict__ c_new, S* __restrict__ dh, const S* __restrict__ grad_out,
                                     S* __restrict__ dc, S* __restrict__ gpre, const int64_t* __restrict__ len,
                                     int64_t t, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row = b * 4 * H + j;
    if (!running(len, b, t)) {  // dh and dc pass through
      gpre[row] = gpre[row + H] = gpre[row + 2 * H] = gpre[row + 3 * H] = S(0);
      continue;
    }
    acc_t dh_t = dh[u];
    if (grad_out != nullptr) {
      dh_t += static_cast<acc_t>(grad_out[u]);
      dh[u] = S(0);
    }
    const gates::LstmGates<acc_t> a{gates_in[row], gates_in[row + H], gates_in[row + 2 * H], gates_in[row + 3 * H]};
    const auto d = gates::lstm_backward<acc_t>(a, c_prev[u], c_new[u], dh_t, dc[u]);
    gpre[row] = d.pre_i;
    gpre[row + H] = d.pre_f;
    gpre[row + 2 * H] = d.pre_g;
    gpre[row + 3 * H] = d.pre_o;
    dc[u] = d.c_prev;
  }
}

// gh = h W_hh^T, plus b_hh unless it is null (then gh holds it already).
template <typename S>
__global__ void gru_forward_kernel(const S* __restrict__ gi, const S* __restrict__ gh, const S* __restrict__ b_hh,
                                   S* __restrict__ h, S* __restrict__ out, S* __restrict__ gates_out,
                                   const int64_t* __restrict__ len, int64_t t, int64_t B, int64_t H) {
  using acc_t = at::opmath_type<S>;
  ATTNKIT_UNITS_LOOP(B * H) {
    const int64_t b = u / H, j = u % H, row3 = b * 3 * H + j, row4 = b * 4 * H + j;
    if (!running(len, b, t)) {
      out[u] = S(0);
      continue;
    }
    const auto recurrent = [&](int64_t g) {
      return static_cast<acc_t>(gh[row3 + g * H]) + (b_hh != nullptr ? static_cast<acc_t>(b_hh[g * H + j]) : acc_t(0));
    };
    const auto a = gates::gru_activate<acc_t>(gi[row3], gi[row3 + H], gi[row3 + 2 * H], recurrent(0), recurrent(1),
                                              recurrent(2));
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

// Rows [0, n) of step t of a (T, B, N) tensor: the select alone when that is all B rows
// (a narrow costs as much host time as the select).
at::Tensor step_rows(const at::Tensor& a, int64_t t, int64_t n) {
  at::Tensor step = a.select(0, t);
  return n == a.size(1) ? step : step.narrow(0, 0, n);
}

at::Tensor first_rows(const at::Tensor& a, int64_t n) { return n == a.size(0) ? a : a.narrow(0, 0, n); }

// The fused time loops below run each step as one in-place cuBLAS GEMM through
// ATen (into the step's gates or dh: no output tensor, no add) and one kernel
// launched on raw pointers, which also folds in the backward's grad_output add
// and its zeroing of running rows. The shared loop of rnn_sequence.h makes
// tensors and launches per step (selects, a GEMM output, adds): its steps took
// 20-30 us on the H200 against cuDNN's ~8 us, host work by the look of it (not profiled).
// (at::cuda::blas::gemm, which would skip ATen's dispatch too, is not exported
// from libtorch_cuda; ATTNKIT_RNN_CUDA_DIRECT_GEMM=1 calls cuBLAS itself for
// float16 / bfloat16, step_gemm.h.) ATTNKIT_RNN_CUDA_GENERIC_LOOP=1 runs the
// shared loop instead, to compare the two.
bool fused_loops_enabled() {
  const char* value = std::getenv("ATTNKIT_RNN_CUDA_GENERIC_LOOP");
  return value == nullptr || std::strcmp(value, "1") != 0;
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

  // The whole forward / backward time loops on raw pointers (see fused_loops_enabled); the
  // contract is csrc/cpu/rnn_fused.h's. The kernels are the shared loop's, launched directly.
  static bool lstm_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& w_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output,
                                 at::Tensor& gates, const at::Tensor& cs, const at::Tensor& len,
                                 const std::vector<int64_t>& rows, bool save) {
    const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = c.size(1);
    if (B == 0 || !fused_loops_enabled()) return false;
    // Input projections of every step; each step's GEMM adds h W_hh^T into its rows, and
    // its kernel turns them into the activated gates in place.
    gates = linear(x.view({T * B, I}), w_ih, bias).view({T, B, 4 * H});
    const at::Tensor w_hh_t = w_hh.t();
    const bool direct = step_gemm::enabled(x.scalar_type(), {&gates, &h});
    const at::Tensor w = direct ? w_hh.contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    ATTNKIT_DISPATCH(x.scalar_type(), "attnkit_lstm_forward_fused_cuda", [&] {
      scalar_t *pre = gates.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>();
      // cs is an empty tensor, not an undefined one, when not saved.
      scalar_t *out = output.data_ptr<scalar_t>(), *csp = save ? cs.data_ptr<scalar_t>() : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        scalar_t* pre_t = pre + t * B * 4 * H;
        if (rows[t] > 0 && direct) {
          step_gemm::a_wt(hp, w.data_ptr(), pre_t, rows[t], 4 * H, H, 1.0f, x.scalar_type());
        } else if (rows[t] > 0) {
          step_rows(gates, t, rows[t]).addmm_(first_rows(h, rows[t]), w_hh_t);
        }
        lstm_forward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, stream>>>(
            pre_t, nullptr, cp, hp, out + t * B * H, csp != nullptr ? csp + t * B * H : nullptr, nullptr,
            ptr<int64_t>(len), t, B, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (!save) gates = at::Tensor();
    return true;
  }
  static bool lstm_backward_fused(const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& c0,
                                  const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh,
                                  at::Tensor& dc, at::Tensor& grad_pre, const at::Tensor& len,
                                  const std::vector<int64_t>& rows) {
    const int64_t T = gates.size(0), B = gates.size(1), H = dc.size(1);
    if (B == 0 || !fused_loops_enabled()) return false;
    const bool direct = step_gemm::enabled(gates.scalar_type(), {&grad_pre, &dh});
    const at::Tensor w = direct ? w_hh.contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    ATTNKIT_DISPATCH(gates.scalar_type(), "attnkit_lstm_backward_fused_cuda", [&] {
      const scalar_t *g = gates.data_ptr<scalar_t>(), *csp = cs.data_ptr<scalar_t>(), *c0p = c0.data_ptr<scalar_t>();
      const scalar_t* go = grad_output.data_ptr<scalar_t>();
      scalar_t *dhp = dh.data_ptr<scalar_t>(), *dcp = dc.data_ptr<scalar_t>(), *gp = grad_pre.data_ptr<scalar_t>();
      for (int64_t t = T - 1; t >= 0; --t) {
        scalar_t* gp_t = gp + t * B * 4 * H;
        // dh = dL/dh_t (carry + grad_output[t]) into the gate gradients; dh then holds 0 for
        // running rows, and the GEMM adds their dh_{t-1} = gp_t W_hh (stopped rows keep theirs).
        lstm_backward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, stream>>>(
            g + t * B * 4 * H, t > 0 ? csp + (t - 1) * B * H : c0p, csp + t * B * H, dhp, go + t * B * H, dcp, gp_t,
            ptr<int64_t>(len), t, B, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (rows[t] > 0 && direct) {
          step_gemm::a_w(gp_t, w.data_ptr(), dhp, rows[t], H, 4 * H, 1.0f, gates.scalar_type());
        } else if (rows[t] > 0) {
          first_rows(dh, rows[t]).addmm_(step_rows(grad_pre, t, rows[t]), w_hh);
        }
      }
    });
    return true;
  }
  static bool gru_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                                const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, at::Tensor& h,
                                at::Tensor& output, at::Tensor& gates, const at::Tensor& len,
                                const std::vector<int64_t>& rows, bool save) {
    const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h.size(1);
    if (B == 0 || !fused_loops_enabled()) return false;
    const at::Tensor gi = linear(x.view({T * B, I}), w_ih, b_ih);
    at::Tensor gh = at::empty({B, 3 * H}, x.options());  // h W_hh^T; the kernel adds b_hh
    const at::Tensor w_hh_t = w_hh.t();
    const at::Tensor bias_hh = rnn::present(b_hh) ? b_hh->contiguous() : at::Tensor();
    gates = at::empty({save ? T : 1, B, 4 * H}, x.options());
    const bool direct = step_gemm::enabled(x.scalar_type(), {&h});
    const at::Tensor w = direct ? w_hh.contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    ATTNKIT_DISPATCH(x.scalar_type(), "attnkit_gru_forward_fused_cuda", [&] {
      const scalar_t *gip = gi.data_ptr<scalar_t>(), *bp = ptr<scalar_t>(bias_hh);
      scalar_t *ghp = gh.data_ptr<scalar_t>(), *hp = h.data_ptr<scalar_t>(), *out = output.data_ptr<scalar_t>();
      scalar_t* gp = gates.data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t) {
        if (rows[t] > 0 && direct) {
          step_gemm::a_wt(hp, w.data_ptr(), ghp, rows[t], 3 * H, H, 0.0f, x.scalar_type());
        } else if (rows[t] > 0) {
          at::Tensor gh_rows = first_rows(gh, rows[t]);
          at::mm_out(gh_rows, first_rows(h, rows[t]), w_hh_t);
        }
        gru_forward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, stream>>>(
            gip + t * B * 3 * H, ghp, bp, hp, out + t * B * H, gp + (save ? t : 0) * B * 4 * H, ptr<int64_t>(len), t,
            B, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    if (!save) gates = at::Tensor();
    return true;
  }
  static bool gru_backward_fused(const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& output,
                                 const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh,
                                 at::Tensor& dgi, at::Tensor& dgh, const at::Tensor& len,
                                 const std::vector<int64_t>& rows) {
    const int64_t T = gates.size(0), B = gates.size(1), H = dh.size(1);
    if (B == 0 || !fused_loops_enabled()) return false;
    const bool direct = step_gemm::enabled(gates.scalar_type(), {&dgh, &dh});
    const at::Tensor w = direct ? w_hh.contiguous() : at::Tensor();
    const auto stream = at::cuda::getCurrentCUDAStream();
    ATTNKIT_DISPATCH(gates.scalar_type(), "attnkit_gru_backward_fused_cuda", [&] {
      const scalar_t *g = gates.data_ptr<scalar_t>(), *h0p = h0.data_ptr<scalar_t>();
      const scalar_t *out = output.data_ptr<scalar_t>(), *go = grad_output.data_ptr<scalar_t>();
      scalar_t *dhp = dh.data_ptr<scalar_t>(), *dgip = dgi.data_ptr<scalar_t>(), *dghp = dgh.data_ptr<scalar_t>();
      for (int64_t t = T - 1; t >= 0; --t) {
        scalar_t* dgh_t = dghp + t * B * 3 * H;
        // Leaves in dh the part of dh_{t-1} through z (all of it for stopped rows); the GEMM adds dgh_t W_hh.
        gru_backward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, stream>>>(
            g + t * B * 4 * H, t > 0 ? out + (t - 1) * B * H : h0p, go + t * B * H, dhp, dgip + t * B * 3 * H, dgh_t,
            ptr<int64_t>(len), t, B, H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (rows[t] > 0 && direct) {
          step_gemm::a_w(dgh_t, w.data_ptr(), dhp, rows[t], H, 3 * H, 1.0f, gates.scalar_type());
        } else if (rows[t] > 0) {
          first_rows(dh, rows[t]).addmm_(step_rows(dgh, t, rows[t]), w_hh);
        }
      }
    });
    return true;
  }
  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& w) { return at::mm(a, w); }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
  static at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t(), b); }
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
          ptr<scalar_t>(gates), ptr<scalar_t>(c_prev), ptr<scalar_t>(c_new), ptr<scalar_t>(dh), nullptr,
          ptr<scalar_t>(dc), ptr<scalar_t>(gpre), ptr<int64_t>(len), t, B, H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void gru_forward_step(const at::Tensor& gi, const at::Tensor& gh, at::Tensor& h, const at::Tensor& out,
                               const at::Tensor& gates, const at::Tensor& len, int64_t t) {
    const int64_t B = h.size(0), H = h.size(1);
    if (B * H == 0) return;
    ATTNKIT_DISPATCH(h.scalar_type(), "attnkit_gru_forward_step_cuda", [&] {
      gru_forward_kernel<scalar_t><<<num_blocks(B * H), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(gi), ptr<scalar_t>(gh), nullptr, ptr<scalar_t>(h), ptr<scalar_t>(out), ptr<scalar_t>(gates),
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

// The entry points' own ATen calls (selects, GEMMs, adds: several a step) skip the
// autograd and view-tracking layers of the dispatcher: the op's autograd is its own,
// and none of those tensors reaches the caller as a view of an input.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

}  // namespace

std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                     bool save) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const BelowAutograd below_autograd;
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
  const BelowAutograd below_autograd;
  return rnn::lstm_backward<Kernels>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, output,
                                     gates, cs, hc);
}

std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
                                    bool save) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const BelowAutograd below_autograd;
  return rnn::gru_forward<Kernels>(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
}

std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const BelowAutograd below_autograd;
  return rnn::gru_backward<Kernels>(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates);
}

}  // namespace cuda
}  // namespace attnkit
