// The kernels of the layer-normalized LSTM / GRU on CUDA (csrc/cuda/rnn_layernorm.cu):
// the per-row passes of attnkit/rnn_layernorm_sequence.h's time loops. One thread
// block per batch row: the row's layer norms reduce over its 4H (3H) recurrent
// projections and its H cell states, in double, as the CPU's; the units of the row
// are the block's threads, through the gate math of attnkit/gate_math.h.
//
// A header, and KernelRows templated on how a kernel is launched, so that
// tests/cuda_emulation runs this same code on CPU threads (no GPU here).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "attnkit/gate_math.h"
#include "attnkit/rnn_layernorm_sequence.h"

namespace attnkit {
namespace cuda {
namespace ln_rnn {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr double kEps = rnn_ln::kEps;

// The sum of every thread's v, returned to all of them; every thread of the block
// calls it. `red` (kWarps doubles of shared memory) is reused by the next call: the
// first barrier keeps it from being overwritten while a slow warp still reads it.
__device__ inline double block_sum(double v, double* red) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

// v (n) -> v_hat (may alias v) by the whole block; returns 1/std (two passes in
// double, as the CPU's ln_row). Ends at a barrier: every v_hat is then visible to all.
template <typename S>
__device__ S ln_row(const S* v, S* v_hat, int64_t n, double* red) {
  double sum = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) sum += v[k];
  const double mean = block_sum(sum, red) / n;
  double squares = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const double d = v[k] - mean;
    squares += d * d;
  }
  const double rstd = 1.0 / sqrt(block_sum(squares, red) / n + kEps);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) v_hat[k] = static_cast<S>((v[k] - mean) * rstd);
  __syncthreads();
  return static_cast<S>(rstd);
}

// dv = rstd * (dvh - mean(dvh) - v_hat * mean(dvh * v_hat)) by the whole block (dv may
// alias dvh); ends at a barrier.
template <typename S>
__device__ void ln_row_backward(const S* dvh, const S* v_hat, S rstd, S* dv, int64_t n, double* red) {
  double sum = 0, dot = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    sum += dvh[k];
    dot += static_cast<double>(dvh[k] * v_hat[k]);
  }
  const double mean = block_sum(sum, red) / n;
  const double mean_dot = block_sum(dot, red) / n;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    dv[k] = static_cast<S>(rstd * (dvh[k] - mean - v_hat[k] * mean_dot));
  }
  __syncthreads();
}

template <typename S>
__global__ void ln_rows_kernel(S* v, S* rstd, int64_t n, int64_t stride) {
  __shared__ double red[kWarps];
  const int64_t row = blockIdx.x;
  const S r = ln_row(v + row * n, v + row * n, n, red);
  if (threadIdx.x == 0) rstd[row * stride] = r;
}

template <typename S>
__global__ void ln_rows_backward_kernel(S* d, const S* v_hat, const S* rstd, int64_t n, int64_t stride) {
  __shared__ double red[kWarps];
  const int64_t row = blockIdx.x;
  ln_row_backward(d + row * n, v_hat + row * n, rstd[row * stride], d + row * n, n, red);
}

__device__ __forceinline__ bool running(const int64_t* len, int64_t b, int64_t t) {
  return len == nullptr || t < len[b];
}

// Each step kernel takes its pointers in one struct (by value); null for an absent
// tensor: zoneout, lengths, and the saved tensors of a forward that keeps none
// (scratch rows instead).
template <typename S>
struct LstmForwardArgs {
  const S *ah, *xhat, *g_ih, *g_hh, *bias, *g_c, *be_c, *zoneout;
  S *h, *c, *output, *hhat, *gates, *cs, *chat, *scratch, *rstd;
  const int64_t* len;
  int64_t t, B, H;
};

template <typename S>
__global__ void lstm_forward_step_kernel(LstmForwardArgs<S> a) {
  __shared__ double red[kWarps];
  const int64_t b = blockIdx.x, H = a.H, G = 4 * H, row = a.t * a.B + b;
  if (!running(a.len, b, a.t)) return;  // state kept, output stays 0
  const bool save = a.hhat != nullptr;
  S* sc = save ? nullptr : a.scratch + b * (2 * G + 2 * H);
  S* hh = save ? a.hhat + row * G : sc;
  S* ga = save ? a.gates + row * G : sc + G;
  S* cn = save ? a.cs + row * H : sc + 2 * G;
  S* ch = save ? a.chat + row * H : sc + 2 * G + H;
  const S rstd_h = ln_row(a.ah + b * G, hh, G, red);
  const S* xr = a.xhat + row * G;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    S pre[4];
    for (int q = 0; q < 4; ++q) {
      const int64_t k = q * H + j;
      pre[q] = a.g_ih[k] * xr[k] + a.g_hh[k] * hh[k] + a.bias[k];
    }
    const auto g = gates::lstm_activate<S>(pre[0], pre[1], pre[2], pre[3]);
    ga[j] = g.i, ga[H + j] = g.f, ga[2 * H + j] = g.g, ga[3 * H + j] = g.o;
    cn[j] = gates::lstm_cell_state<S>(g, a.c[b * H + j]);
  }
  __syncthreads();
  const S rstd_c = ln_row(cn, ch, H, red);
  const S* m = a.zoneout != nullptr ? a.zoneout + row * H : nullptr;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const gates::LstmGates<S> g{ga[j], ga[H + j], ga[2 * H + j], ga[3 * H + j]};
    const S h_new = gates::lstm_hidden_state<S>(g, a.g_c[j] * ch[j] + a.be_c[j]);
    const S hs = m != nullptr ? m[j] * a.h[b * H + j] + (S(1) - m[j]) * h_new : h_new;
    a.h[b * H + j] = hs;
    a.c[b * H + j] = cn[j];
    a.output[row * H + j] = hs;
  }
  if (threadIdx.x == 0) {
    a.rstd[row * 3 + 1] = rstd_h;
    a.rstd[row * 3 + 2] = rstd_c;
  }
}

template <typename S>
struct LstmBackwardArgs {
  const S *grad_output, *gates, *cs, *chat, *hhat, *c0, *rstd, *zoneout, *g_hh, *g_c, *be_c;
  S *dh, *dc, *dpre, *dah, *dlc, *scratch;
  const int64_t* len;
  int64_t t, B, H;
};

template <typename S>
__global__ void lstm_backward_step_kernel(LstmBackwardArgs<S> a) {
  __shared__ double red[kWarps];
  const int64_t b = blockIdx.x, H = a.H, G = 4 * H, row = a.t * a.B + b;
  if (!running(a.len, b, a.t)) return;  // dh, dc pass through; the output there is a constant 0
  const S* g = a.gates + row * G;
  const S* cprev = a.t > 0 ? a.cs + (row - a.B) * H : a.c0 + b * H;
  const S* m = a.zoneout != nullptr ? a.zoneout + row * H : nullptr;
  S* d = a.dpre + row * G;
  S* dch = a.scratch + b * H;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const S dht = a.dh[b * H + j] + a.grad_output[row * H + j];
    const S mj = m != nullptr ? m[j] : S(0);
    const S dhn = (1 - mj) * dht;  // into o * tanh(LN_c(c))
    a.dh[b * H + j] = mj * dht;     // the zoned-out part; W_hh's part is added after
    const S o = g[3 * H + j];
    const S tl = gates::tanh_(a.g_c[j] * a.chat[row * H + j] + a.be_c[j]);
    d[3 * H + j] = dhn * tl * o * (1 - o);
    a.dlc[row * H + j] = dhn * o * (1 - tl * tl);
    dch[j] = a.dlc[row * H + j] * a.g_c[j];
  }
  ln_row_backward(dch, a.chat + row * H, a.rstd[row * 3 + 2], dch, H, red);
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const gates::LstmGates<S> gate{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    // grad_h = 0: the o gate and tanh(LN_c) were handled above.
    const auto u = gates::lstm_backward<S>(gate, cprev[j], a.cs[row * H + j], S(0), dch[j] + a.dc[b * H + j]);
    d[j] = u.pre_i, d[H + j] = u.pre_f, d[2 * H + j] = u.pre_g;
    a.dc[b * H + j] = u.c_prev;
  }
  __syncthreads();  // the next loop reads every unit's gate gradients
  S* da = a.dah + row * G;
  for (int64_t k = threadIdx.x; k < G; k += kThreads) da[k] = d[k] * a.g_hh[k];
  ln_row_backward(da, a.hhat + row * G, a.rstd[row * 3 + 1], da, G, red);
}

template <typename S>
struct GruForwardArgs {
  const S *ah, *xhat, *g_ih, *g_hh, *bias_i, *bias_h, *zoneout;
  S *h, *output, *hhat, *gates, *scratch, *rstd;
  const int64_t* len;
  int64_t t, B, H;
};

template <typename S>
__global__ void gru_forward_step_kernel(GruForwardArgs<S> a) {
  __shared__ double red[kWarps];
  const int64_t b = blockIdx.x, H = a.H, G = 3 * H, row = a.t * a.B + b;
  if (!running(a.len, b, a.t)) return;
  const bool save = a.hhat != nullptr;
  S* sc = save ? nullptr : a.scratch + b * (G + 4 * H);
  S* hh = save ? a.hhat + row * G : sc;
  S* ga = save ? a.gates + row * 4 * H : sc + G;
  const S rstd_h = ln_row(a.ah + b * G, hh, G, red);
  const S* xr = a.xhat + row * G;
  const S* m = a.zoneout != nullptr ? a.zoneout + row * H : nullptr;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    S in[3], hid[3];
    for (int q = 0; q < 3; ++q) {
      const int64_t k = q * H + j;
      in[q] = a.g_ih[k] * xr[k] + a.bias_i[k];
      hid[q] = a.g_hh[k] * hh[k] + a.bias_h[k];
    }
    const auto g = gates::gru_activate<S>(in[0], in[1], in[2], hid[0], hid[1], hid[2]);
    ga[j] = g.r, ga[H + j] = g.z, ga[2 * H + j] = g.n, ga[3 * H + j] = g.hn;
    const S h_prev = a.h[b * H + j];
    const S h_new = gates::gru_hidden_state<S>(g, h_prev);
    const S hs = m != nullptr ? m[j] * h_prev + (S(1) - m[j]) * h_new : h_new;
    a.h[b * H + j] = hs;
    a.output[row * H + j] = hs;
  }
  if (threadIdx.x == 0) a.rstd[row * 2 + 1] = rstd_h;
}

template <typename S>
struct GruBackwardArgs {
  const S *grad_output, *gates, *output, *h0, *hhat, *rstd, *zoneout, *g_hh;
  S *dh, *dgi, *dgh, *dah;
  const int64_t* len;
  int64_t t, B, H;
};

template <typename S>
__global__ void gru_backward_step_kernel(GruBackwardArgs<S> a) {
  __shared__ double red[kWarps];
  const int64_t b = blockIdx.x, H = a.H, G = 3 * H, row = a.t * a.B + b;
  if (!running(a.len, b, a.t)) return;
  const S* g = a.gates + row * 4 * H;
  const S* hprev = a.t > 0 ? a.output + (row - a.B) * H : a.h0 + b * H;
  const S* m = a.zoneout != nullptr ? a.zoneout + row * H : nullptr;
  S *dir = a.dgi + row * G, *dgr = a.dgh + row * G, *da = a.dah + row * G;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const S dht = a.dh[b * H + j] + a.grad_output[row * H + j];
    const S mj = m != nullptr ? m[j] : S(0);
    const gates::GruGates<S> gate{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
    const auto u = gates::gru_backward<S>(gate, hprev[j], (1 - mj) * dht);
    dir[j] = u.gi_r, dir[H + j] = u.gi_z, dir[2 * H + j] = u.gi_n;
    dgr[j] = u.gi_r, dgr[H + j] = u.gi_z, dgr[2 * H + j] = u.gh_n;
    a.dh[b * H + j] = mj * dht + u.h_prev;
  }
  __syncthreads();  // the next loop reads every unit's gate gradients
  for (int64_t k = threadIdx.x; k < G; k += kThreads) da[k] = dgr[k] * a.g_hh[k];
  ln_row_backward(da, a.hhat + row * G, a.rstd[row * 2 + 1], da, G, red);
}

// rnn_ln::data_or_null (the dtype checked: a tensor of another one raises), short for the launches.
template <typename S>
S* ptr(const at::Tensor& t) {
  return rnn_ln::data_or_null<S>(t);
}

inline unsigned int grid(int64_t rows) {
  TORCH_CHECK(rows < (int64_t(1) << 31), "attnkit._C_cuda layer-norm rnn: too many rows for one launch");
  return static_cast<unsigned int>(rows);
}

// The time loops' per-row passes (attnkit/rnn_layernorm_sequence.h's Rows) as launches
// of the kernels above: Launch::run(kernel, blocks, args) runs `blocks` blocks of
// kThreads threads (csrc/cuda/rnn_layernorm.cu: on the GPU; tests/cuda_emulation: on
// CPU threads); Launch::kDevice and kOp as Rows'.
template <typename Launch>
struct KernelRows {
  static constexpr c10::DeviceType kDevice = Launch::kDevice;
  static constexpr const char* kOp = Launch::kOp;

  // The whole-sequence GEMMs: a w^T, a w, a^T b (cuBLAS through ATen takes the transposes as they are).
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w) { return at::mm(a, w.t()); }
  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& w) { return at::mm(a, w); }
  static at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t(), b); }

  static void ln_rows(at::Tensor& v, at::Tensor& rstd, int64_t stride) {
    if (v.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ln_rows_kernels", [&] {
      Launch::run(ln_rows_kernel<scalar_t>, grid(v.size(0)), ptr<scalar_t>(v), ptr<scalar_t>(rstd), v.size(1), stride);
    });
  }

  static void ln_rows_backward(at::Tensor& d, const at::Tensor& v_hat, const at::Tensor& rstd, int64_t stride) {
    if (d.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "ln_rows_backward_kernels", [&] {
      Launch::run(ln_rows_backward_kernel<scalar_t>, grid(d.size(0)), ptr<scalar_t>(d), ptr<scalar_t>(v_hat),
                  ptr<scalar_t>(rstd), d.size(1), stride);
    });
  }

  static void lstm_forward_step(rnn_ln::LstmStep& s) {
    const int64_t B = s.h.size(0);
    if (B == 0) return;
    AT_DISPATCH_FLOATING_TYPES(s.h.scalar_type(), "ln_lstm_forward_cuda", [&] {
      using S = scalar_t;
      const LstmForwardArgs<S> a{ptr<S>(s.ah), ptr<S>(s.xhat), ptr<S>(s.g_ih), ptr<S>(s.g_hh), ptr<S>(s.bias),
                                 ptr<S>(s.g_c), ptr<S>(s.be_c), ptr<S>(s.zoneout), ptr<S>(s.h), ptr<S>(s.c),
                                 ptr<S>(s.output), ptr<S>(s.hhat), ptr<S>(s.gates), ptr<S>(s.cs), ptr<S>(s.chat),
                                 ptr<S>(s.scratch), ptr<S>(s.rstd), ptr<int64_t>(s.len), s.t, B, s.h.size(1)};
      Launch::run(lstm_forward_step_kernel<S>, grid(B), a);
    });
  }

  static void lstm_backward_step(rnn_ln::LstmBackStep& s) {
    const int64_t B = s.dh.size(0);
    if (B == 0) return;
    AT_DISPATCH_FLOATING_TYPES(s.dh.scalar_type(), "ln_lstm_backward_cuda", [&] {
      using S = scalar_t;
      const LstmBackwardArgs<S> a{ptr<S>(s.grad_output), ptr<S>(s.gates), ptr<S>(s.cs), ptr<S>(s.chat),
                                  ptr<S>(s.hhat), ptr<S>(s.c0), ptr<S>(s.rstd), ptr<S>(s.zoneout), ptr<S>(s.g_hh),
                                  ptr<S>(s.g_c), ptr<S>(s.be_c), ptr<S>(s.dh), ptr<S>(s.dc), ptr<S>(s.dpre),
                                  ptr<S>(s.dah), ptr<S>(s.dlc), ptr<S>(s.scratch), ptr<int64_t>(s.len), s.t, B,
                                  s.dh.size(1)};
      Launch::run(lstm_backward_step_kernel<S>, grid(B), a);
    });
  }

  static void gru_forward_step(rnn_ln::GruStep& s) {
    const int64_t B = s.h.size(0);
    if (B == 0) return;
    AT_DISPATCH_FLOATING_TYPES(s.h.scalar_type(), "ln_gru_forward_cuda", [&] {
      using S = scalar_t;
      const GruForwardArgs<S> a{ptr<S>(s.ah), ptr<S>(s.xhat), ptr<S>(s.g_ih), ptr<S>(s.g_hh), ptr<S>(s.bias_i),
                                ptr<S>(s.bias_h), ptr<S>(s.zoneout), ptr<S>(s.h), ptr<S>(s.output), ptr<S>(s.hhat),
                                ptr<S>(s.gates), ptr<S>(s.scratch), ptr<S>(s.rstd), ptr<int64_t>(s.len), s.t, B,
                                s.h.size(1)};
      Launch::run(gru_forward_step_kernel<S>, grid(B), a);
    });
  }

  static void gru_backward_step(rnn_ln::GruBackStep& s) {
    const int64_t B = s.dh.size(0);
    if (B == 0) return;
    AT_DISPATCH_FLOATING_TYPES(s.dh.scalar_type(), "ln_gru_backward_cuda", [&] {
      using S = scalar_t;
      const GruBackwardArgs<S> a{ptr<S>(s.grad_output), ptr<S>(s.gates), ptr<S>(s.output), ptr<S>(s.h0),
                                 ptr<S>(s.hhat), ptr<S>(s.rstd), ptr<S>(s.zoneout), ptr<S>(s.g_hh), ptr<S>(s.dh),
                                 ptr<S>(s.dgi), ptr<S>(s.dgh), ptr<S>(s.dah), ptr<int64_t>(s.len), s.t, B,
                                 s.dh.size(1)};
      Launch::run(gru_backward_step_kernel<S>, grid(B), a);
    });
  }
};

}  // namespace ln_rnn
}  // namespace cuda
}  // namespace attnkit
