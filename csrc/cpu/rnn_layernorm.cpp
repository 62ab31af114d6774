// Layer-normalized LSTM / GRU with zoneout on the CPU (see attnkit/rnn_layernorm.h):
// the per-row passes of attnkit/rnn_layernorm_sequence.h's time loops. Each
// step's rows run in parallel (at::parallel_for); the unit loops take 8 floats at
// a time through the gate-math templates (the tail and double unit by unit), built
// for AVX-512, AVX2 and any x86-64 (rnn_layernorm_rows.h), picked at run time.
// float32 and float64 (gradcheck).
#include "attnkit/rnn_layernorm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attnkit/gate_math.h"
#include "attnkit/linear.h"
#include "attnkit/rnn_layernorm_sequence.h"
#include "rnn_fused.h"
#include "row_isa.h"

namespace attnkit {
namespace cpu {
namespace {

// The whole-sequence input projection and dx (T B rows): oneDNN where it takes them, 2x the MKL
// sgemm that at::mm runs on the AMD EPYC of BENCHMARKS.md (rnn.cpp's Kernels choose the same way;
// the weight gradients' a^T b is rnn_fused.h's mm_tn).
bool onednn_takes(const at::Tensor& a) {
  return a.scalar_type() == at::kFloat && a.size(0) >= kFewRows && a.size(1) >= kFewRows && a.is_contiguous() &&
         onednn_linear_available() && !gemms_on_aten();
}

// a w^T; oneDNN takes w contiguous or as the transposed view of a contiguous matrix.
at::Tensor sequence_linear(const at::Tensor& a, const at::Tensor& w) {
  const bool plain = w.is_contiguous() || w.t().is_contiguous();
  return plain && onednn_takes(a) ? onednn_linear(a, w, c10::nullopt) : at::mm(a, w.t());
}

#pragma GCC diagnostic ignored "-Wpsabi"

#ifdef ATTNKIT_X86_ROW_BUILDS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
#include "rnn_layernorm_rows.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "rnn_layernorm_rows.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace generic {
#include "rnn_layernorm_rows.h"
}  // namespace generic

// loop<Rows>(args...) for the CPU's best Rows.
#ifdef ATTNKIT_X86_ROW_BUILDS
#define ATTNKIT_LN_LOOP(loop, ...)                                                       \
  (row_isa() == RowIsa::kAvx512 ? rnn_ln::loop<avx512::Rows>(__VA_ARGS__)                       \
   : row_isa() == RowIsa::kAvx2 ? rnn_ln::loop<avx2::Rows>(__VA_ARGS__)                         \
                         : rnn_ln::loop<generic::Rows>(__VA_ARGS__))
#else
#define ATTNKIT_LN_LOOP(loop, ...) (rnn_ln::loop<generic::Rows>(__VA_ARGS__))
#endif

}  // namespace

std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                        const at::Tensor& g_ih, const at::Tensor& be_ih, const at::Tensor& g_hh,
                                        const at::Tensor& be_hh, const at::Tensor& g_c, const at::Tensor& be_c,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, bool save) {
  return ATTNKIT_LN_LOOP(lstm_forward, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths,
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
  return ATTNKIT_LN_LOOP(lstm_backward, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c, be_c,
                                     lengths, zoneout, output, xhat, hhat, gates, cs, chat, rstd);
}

std::vector<at::Tensor> ln_gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& g_ih,
                                       const at::Tensor& be_ih, const at::Tensor& g_hh, const at::Tensor& be_hh,
                                       const c10::optional<at::Tensor>& lengths,
                                       const c10::optional<at::Tensor>& zoneout, bool save) {
  return ATTNKIT_LN_LOOP(gru_forward, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save);
}

std::vector<at::Tensor> ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                        const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                        const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                        const at::Tensor& rstd) {
  return ATTNKIT_LN_LOOP(gru_backward, grad_output, grad_hn, x, h0, w_ih, w_hh, g_ih, g_hh, lengths, zoneout, output,
                                    xhat, hhat, gates, rstd);
}

}  // namespace cpu
}  // namespace attnkit
