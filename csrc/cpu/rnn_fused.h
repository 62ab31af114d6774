// The fused-step LSTM / GRU time loops of csrc/cpu/rnn_fused.cpp (float32,
// batch 5+, no projection) and the weight-gradient GEMM, for rnn.cpp's Kernels.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace cpu {

// The whole forward: input projections (x W_ih^T + bias, bias = b_ih + b_hh
// or none) and steps. h, c (B, H): h0/c0 in, h_T/c_T out; output (T, B, H);
// gates gets the activated gates (T, B, 4H) when `save`; cs (T, B, H) or
// empty; len: lengths or undefined; rows[t]: rows of step t's GEMM (B, or
// the running prefix of sorted lengths). Returns false (nothing done) where
// it does not apply: the caller runs its own loop.
bool lstm_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& w_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output, at::Tensor& gates,
                        const at::Tensor& cs, const at::Tensor& len, const std::vector<int64_t>& rows, bool save);

// Backward steps: grad_pre (T, B, 4H) gets d(pre-activations); dh, dc (B, H):
// dL/dh_T, dL/dc_T in, dL/dh0, dL/dc0 out. Same conditions as the forward.
// grad_pre may be gates itself (each unit's gates are read before its gradients are written).
// low: the products dh = grad_pre[t] W_hh on bfloat16 operands (both rounded), where the CPU has the
// bfloat16 brgemm (rnn_backward_bf16: its results are bfloat16 anyway); float otherwise.
bool lstm_backward_fused(const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& c0,
                         const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh, at::Tensor& dc,
                         at::Tensor& grad_pre, const at::Tensor& len, const std::vector<int64_t>& rows,
                         bool low = false);

// The GRU's forward: gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh (biases
// may be absent) kept apart as torch has them. h (B, H): h0 in, h_T out;
// gates (T, B, 4H: r, z, n, hn) when `save`; the rest as lstm_forward_fused.
bool gru_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, at::Tensor& h,
                       at::Tensor& output, at::Tensor& gates, const at::Tensor& len, const std::vector<int64_t>& rows,
                       bool save);

// The GRU's backward steps: dgi, dgh (T, B, 3H) get the gradients of the input
// and recurrent projections; dh (B, H): dL/dh_T in, dL/dh0 out. h0 and output
// give h_{t-1}. Same conditions as the forward.
bool gru_backward_fused(const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& output,
                        const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh, at::Tensor& dgi,
                        at::Tensor& dgh, const at::Tensor& len, const std::vector<int64_t>& rows, bool low = false);

// The bfloat16 forward (no projection) on the fused loops with bfloat16 operands: x, the weights
// (packed in oneDNN's VNNI layout) and h_t rounded each step into AMX's (or AVX512-BF16's)
// brgemm, float accumulation, state (c, the h the gate math reads) and gate math. gates: 4
// (LSTM, c0 given) or 3 (GRU). Returns {output, h_n[, c_n]} in bfloat16, with `save` also the
// float32 saved gates (T, B, 4H) [and the LSTM's cs (T, B, H)] that the float32 backward takes;
// or {} where it does not apply (no bfloat16 brgemm in this torch or CPU, no AVX-512, odd input
// or hidden size): the caller then runs the float32 kernels.
bool rnn_forward_bf16_available();  // this torch and CPU: the bfloat16 brgemm with VNNI packing, AVX-512
std::vector<at::Tensor> rnn_forward_bf16(int64_t gates, const at::Tensor& x, const at::Tensor& h0,
                                         const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const c10::optional<at::Tensor>& lengths, bool save);

// The bfloat16 training backward (csrc/cpu/rnn_backward_bf16.cpp), batch 5+, no projection: the
// time loop's gate math in float32; its dh products, dx and the weight gradients bfloat16 GEMMs. gates 4 (LSTM: grad_cn,
// c0 and cs given) or 3 (GRU: none of them); saved_gates as the float32 forward saves them, in
// bfloat16. Returns the float32 backward's gradients in bfloat16 (LSTM {dx, dh0, dc0, dw_ih,
// dw_hh, db}; GRU {dx, dh0, dw_ih, dw_hh, db_ih, db_hh}), or {} where it does not apply.
std::vector<at::Tensor> rnn_backward_bf16(int64_t gates, const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                          const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x,
                                          const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                          const at::Tensor& saved_gates, const c10::optional<at::Tensor>& cs);

// x w^T for float x (M, K) and w (N, K), both contiguous: a whole sequence's input projections
// (M = T B rows) on brgemm tiles, W^T packed per call. Undefined where it does not apply (other
// types or layouts, fewer than kLinearTileRows rows, no brgemm, gemms_on_aten()): the caller picks
// another route.
constexpr int64_t kLinearTileRows = 64;
at::Tensor linear_tiles(const at::Tensor& x, const at::Tensor& w);

// a b for contiguous row-major a (M, K), b (K, N): tiles through oneDNN's
// brgemm for float (MKL's sgemm, which at::mm calls, runs 2-3x slower on the
// AMD CPUs of BENCHMARKS.md); at::mm otherwise, and where linear.h's
// gemms_on_aten() says MKL is the faster one.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);

// a^T b for a (M, K), b (M, N): the weight gradients of a one-step RNN backward and of the
// LayerNorm RNNs. Float from 16 rows and columns: oneDNN on a's transposed copy (transpose_into),
// 2x the MKL sgemm that at::mm runs on the transposed view on the AMD EPYC of BENCHMARKS.md (the
// copy 0.02 ms of 0.07 at (64, 768) x (64, 256)); one row, an outer product, as a broadcast
// multiply at memory speed (6 us against 12 for ATen's K = 1 GEMM at 768 x 256, as lstm_cell.cpp's);
// at::mm otherwise, and where linear.h's gemms_on_aten() says MKL is the faster one.
at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b);

// dst = src^T for 2-D src (r, c) and dst (c, r): blocked for float with unit
// inner strides (ATen's transposing copy_ ran at ~1 GB/s here), copy_ otherwise.
void transpose_into(const at::Tensor& src, const at::Tensor& dst);

// The backward's GEMMs over PackedSequence rows only (sorted lengths: step t runs its first
// rows[t] of B rows; a (T B, C) tensor's rows are flat time-major, t B + b).
// pack_running_rows: the running rows of `flat` (contiguous) moved to its front in place;
// returns them, (sum rows, C). unpack_running_rows: `packed` back to (T B, C), stopped rows 0.
at::Tensor pack_running_rows(const at::Tensor& flat, const std::vector<int64_t>& rows, int64_t B);
at::Tensor unpack_running_rows(const at::Tensor& packed, const std::vector<int64_t>& rows, int64_t B);
// [x | h_{t-1}]^T of the running rows, (I + P, sum rows), with h_{t-1} = h0 at t = 0, else
// output[t - 1]; in workspace slot 1.
at::Tensor running_inputs_transposed(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                     const std::vector<int64_t>& rows);

// An uninitialized tensor for a call's internal buffers (slot 0, 1), reused by
// the next call on this thread when no tensor still refers to it: buffers past
// glibc's mmap threshold (32 MB at most) otherwise come back as fresh pages,
// one fault each, every call (~20 ms per 50 MB here). Up to 64 MB a slot (larger calls allocate afresh).
at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts);

}  // namespace cpu
}  // namespace attnkit
