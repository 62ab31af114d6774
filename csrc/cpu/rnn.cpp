// Whole-sequence LSTM / GRU on the CPU: the time loop of
// attnkit/rnn_sequence.h (GEMMs on oneDNN or BLAS through ATen) with the fused
// elementwise steps below, parallel over batch rows with at::parallel_for
// and vectorized within a row (csrc/cpu/rnn_rows.h). float32 and float64.
#include "attnkit/rnn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "attnkit/gate_math.h"
#include "attnkit/linear.h"
#include "attnkit/rnn_sequence.h"
#include "lstm_rows.h"
#include "rnn_fused.h"
#include "row_isa.h"

namespace attnkit {
namespace cpu {
namespace {

// Without AVX the generic rows' vectors are emulated and inlined (templates
// instantiate at the end of the file, so this cannot be scoped): the
// vector-ABI note gcc prints for them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

// The row kernels three times: for AVX-512 and AVX2+FMA CPUs and for any
// other CPU, picked at run time. GemvVec is the small-batch GEMV's vector.
#ifdef ATTNKIT_X86_ROW_BUILDS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
typedef float GemvVec __attribute__((vector_size(64)));
#include "rnn_rows.h"
#include "rnn_small_batch.h"
#include "rnn_small_batch_gru.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
typedef float GemvVec __attribute__((vector_size(32)));
#include "rnn_rows.h"
#include "rnn_small_batch.h"
#include "rnn_small_batch_gru.h"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace generic {
typedef float GemvVec __attribute__((vector_size(32)));
#include "rnn_rows.h"
#include "rnn_small_batch.h"
#include "rnn_small_batch_gru.h"
}  // namespace generic

// Rows per task: small steps run on one thread, the fork/join costs more.
int64_t grain_rows(int64_t units_per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, units_per_row)); }

inline bool active(const int64_t* len, int64_t b, int64_t t) { return len == nullptr || t < len[b]; }

template <typename S>
S* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<S>() : nullptr;
}

// The device kernels of rnn_sequence.h's time loop; `len` is the lengths
// tensor (undefined when every row runs all T steps), `t` the step.
struct Kernels {
  static at::Tensor device_lengths(const c10::optional<at::Tensor>& lengths, const at::Tensor&) {
    return rnn::present(lengths) ? *lengths : at::Tensor();
  }

  // oneDNN (linear.h) beats the BLAS that ATen calls once there are a few rows,
  // except MKL on Intel CPUs for weights oneDNN has not packed (gemms_on_aten);
  // tiny ones (batch 1 steps) pay less overhead in the dot products of small_linear.
  static bool onednn_takes(const at::Tensor& a) {
    return onednn_linear_available() && a.scalar_type() == at::kFloat && a.size(0) >= kOneDnnRows && a.is_contiguous();
  }

  // w contiguous or the transposed view of a contiguous matrix (a one-step backward's W_hh^T),
  // which oneDNN takes as it is (it packs its operands anyway).
  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    if (onednn_takes(a) && (w.is_contiguous() || w.t().is_contiguous()) && !gemms_on_aten()) {
      return onednn_linear(a, w, bias);
    }
    if (a.size(0) <= 4 && a.is_contiguous() && w.is_contiguous() && (!rnn::present(bias) || bias->is_contiguous())) {
      return small_linear(a, w, bias);
    }
    return rnn::present(bias) ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  }

  // oneDNN pays off from this many rows (see linear()).
  static constexpr int64_t kOneDnnRows = 16;

  // The recurrent weight of the per-step GEMMs, reordered once per call into
  // oneDNN's blocked layout: handed the plain weight, oneDNN reorders it on
  // every step (steps measured 1.2x faster at (32, 256) and 1.6x at (64, 512)
  // with the reorder hoisted). Undefined when oneDNN will not run the steps.
  static at::Tensor step_weight(const at::Tensor& w, int64_t rows) {
    static const c10::optional<c10::OperatorHandle> reorder =
        c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""});
    if (!reorder.has_value() || !onednn_linear_available() || w.scalar_type() != at::kFloat ||
        rows < kOneDnnRows || !w.is_contiguous()) {
      return at::Tensor();
    }
    torch::jit::Stack stack{w, c10::IValue(rows)};
    reorder->callBoxed(&stack);
    return stack[0].toTensor();
  }

  // linear(a, w, bias), with w's step_weight() `packed` when oneDNN takes the call.
  static at::Tensor step_linear(const at::Tensor& a, const at::Tensor& w, const at::Tensor& packed,
                                const c10::optional<at::Tensor>& bias) {
    if (packed.defined() && onednn_takes(a)) return onednn_linear(a, packed, bias);
    return linear(a, w, bias);
  }

  // Batch 1..4: dot products over W's rows, split across threads by rows.
  static at::Tensor small_linear(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
    const int64_t M = a.size(0), K = a.size(1), N = w.size(0);
    at::Tensor out = at::empty({M, N}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "attnkit_small_linear", [&] {
      auto cols = ATTNKIT_PICK_ROWS(small_linear_cols<scalar_t>);
      const scalar_t *a_p = a.data_ptr<scalar_t>(), *w_p = w.data_ptr<scalar_t>();
      const scalar_t* b_p = rnn::present(bias) ? bias->data_ptr<scalar_t>() : nullptr;
      scalar_t* o_p = out.data_ptr<scalar_t>();
      // Threads only pay off past ~64K multiply-adds.
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, M * K));
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { cols(a_p, w_p, b_p, o_p, M, K, N, n0, n1); });
    });
    return out;
  }

  static void lstm_forward_step(at::Tensor& pre, const at::Tensor& gh, at::Tensor& c, const at::Tensor& h,
                                const at::Tensor& out,
                                const at::Tensor& cs, const at::Tensor& hc, const at::Tensor& len, int64_t t) {
    const int64_t B = c.size(0), H = c.size(1);
    const int64_t* lp = ptr<int64_t>(len);
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "attnkit_lstm_forward_step", [&] {
      auto row = ATTNKIT_PICK_ROWS(lstm_forward_row<scalar_t>);
      scalar_t *pre_p = ptr<scalar_t>(pre), *c_p = ptr<scalar_t>(c), *h_p = ptr<scalar_t>(h);
      const scalar_t* gh_p = ptr<scalar_t>(gh);
      scalar_t *out_p = ptr<scalar_t>(out), *cs_p = ptr<scalar_t>(cs), *hc_p = ptr<scalar_t>(hc);
      at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t o = b * H;
          if (active(lp, b, t)) {
            row(pre_p + 4 * o, gh_p + 4 * o, H, c_p + o, h_p ? h_p + o : nullptr, out_p ? out_p + o : nullptr,
                cs_p ? cs_p + o : nullptr, hc_p ? hc_p + o : nullptr, H, H);
            continue;
          }
          // Stopped: keep the state, output 0 (hc 0 makes the projection 0).
          if (cs_p) std::copy(c_p + o, c_p + o + H, cs_p + o);
          if (out_p) std::fill(out_p + o, out_p + o + H, scalar_t(0));
          if (hc_p) std::fill(hc_p + o, hc_p + o + H, scalar_t(0));
        }
      });
    });
  }

  // Batches of 1..4 without projection never reach rnn_sequence.h's loop:
  // lstm_* / gru_* below run them whole (small_batch_lstm_* / small_batch_gru_*).

  // Batch 5+ in float without projection (LSTM and GRU): one OpenMP team through
  // all steps, each step's GEMM and gate math fused per unit chunk (rnn_fused.cpp).
  // Not one step (nn.GRUCell, a decoder's step): packing the weights into the
  // team's panels cost more than the step's two GEMMs (GRUCell's training step
  // at (B, I, H) = (64, 256, 256) took 2.5x torch's).
  static bool lstm_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& bias,
                                 const at::Tensor& w_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output,
                                 at::Tensor& gates, const at::Tensor& cs, const at::Tensor& len,
                                 const std::vector<int64_t>& rows, bool save) {
    return x.size(0) > 1 && cpu::lstm_forward_fused(x, w_ih, bias, w_hh, h, c, output, gates, cs, len, rows, save);
  }
  static bool lstm_backward_fused(const at::Tensor& gates, const at::Tensor& cs, const at::Tensor& c0,
                                  const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh,
                                  at::Tensor& dc, at::Tensor& grad_pre, const at::Tensor& len,
                                  const std::vector<int64_t>& rows) {
    return gates.size(0) > 1 && cpu::lstm_backward_fused(gates, cs, c0, grad_output, w_hh, dh, dc, grad_pre, len, rows);
  }
  static bool gru_forward_fused(const at::Tensor& x, const at::Tensor& w_ih, const c10::optional<at::Tensor>& b_ih,
                                const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_hh, at::Tensor& h,
                                at::Tensor& output, at::Tensor& gates, const at::Tensor& len,
                                const std::vector<int64_t>& rows, bool save) {
    return x.size(0) > 1 && cpu::gru_forward_fused(x, w_ih, b_ih, w_hh, b_hh, h, output, gates, len, rows, save);
  }
  static bool gru_backward_fused(const at::Tensor& gates, const at::Tensor& h0, const at::Tensor& output,
                                 const at::Tensor& grad_output, const at::Tensor& w_hh, at::Tensor& dh,
                                 at::Tensor& dgi, at::Tensor& dgh, const at::Tensor& len,
                                 const std::vector<int64_t>& rows) {
    return gates.size(0) > 1 && cpu::gru_backward_fused(gates, h0, output, grad_output, w_hh, dh, dgi, dgh, len, rows);
  }

  // a w for a weight w (K, N): oneDNN takes w's transposed view as it is (it packs
  // its operands anyway), so the backward's dx needs no transposed copy of W_ih.
  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& w) {
    return onednn_takes(a) ? onednn_linear(a, w.t(), c10::nullopt) : at::mm(a, w);
  }

  // a b (row-major, contiguous): the weight gradients' GEMMs.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return cpu::mm(a, b); }
  // a^T b: a one-step backward's weight gradients (rnn_fused.h).
  static at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b) { return cpu::mm_tn(a, b); }
  static void transpose_into(const at::Tensor& src, const at::Tensor& dst) { cpu::transpose_into(src, dst); }
  // The backward's GEMMs after the time loop take PackedSequence rows only (rnn_fused.h).
  static constexpr bool kPacksRunningRows = true;
  static at::Tensor pack_running_rows(const at::Tensor& flat, const std::vector<int64_t>& rows, int64_t B) {
    return cpu::pack_running_rows(flat, rows, B);
  }
  static at::Tensor unpack_running_rows(const at::Tensor& packed, const std::vector<int64_t>& rows, int64_t B) {
    return cpu::unpack_running_rows(packed, rows, B);
  }
  static at::Tensor running_inputs_transposed(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output,
                                              const std::vector<int64_t>& rows) {
    return cpu::running_inputs_transposed(x, h0, output, rows);
  }
  static at::Tensor workspace(int slot, at::IntArrayRef sizes, const at::TensorOptions& opts) {
    return cpu::workspace(slot, sizes, opts);
  }

  static void lstm_backward_step(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c_new,
                                 const at::Tensor& dh, at::Tensor& dc, at::Tensor& gpre, const at::Tensor& len,
                                 int64_t t) {
    const int64_t B = dc.size(0), H = dc.size(1);
    const int64_t* lp = ptr<int64_t>(len);
    AT_DISPATCH_FLOATING_TYPES(dc.scalar_type(), "attnkit_lstm_backward_step", [&] {
      auto row = ATTNKIT_PICK_ROWS(lstm_backward_row<scalar_t>);
      const scalar_t *g_p = ptr<scalar_t>(gates), *cp_p = ptr<scalar_t>(c_prev), *cn_p = ptr<scalar_t>(c_new);
      const scalar_t* dh_p = ptr<scalar_t>(dh);
      scalar_t *dc_p = ptr<scalar_t>(dc), *gp_p = ptr<scalar_t>(gpre);
      at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t o = b * H;
          if (active(lp, b, t)) {
            row(g_p + 4 * o, cp_p + o, cn_p + o, dh_p + o, dc_p + o, gp_p + 4 * o, H, H);
          } else {
            std::fill(gp_p + 4 * o, gp_p + 4 * o + 4 * H, scalar_t(0));  // dc passes through
          }
        }
      });
    });
  }

  static void gru_forward_step(const at::Tensor& gi, const at::Tensor& gh, at::Tensor& h, const at::Tensor& out,
                               const at::Tensor& gates, const at::Tensor& len, int64_t t) {
    const int64_t B = h.size(0), H = h.size(1);
    const int64_t* lp = ptr<int64_t>(len);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "attnkit_gru_forward_step", [&] {
      auto row = ATTNKIT_PICK_ROWS(gru_forward_row<scalar_t>);
      const scalar_t *gi_p = ptr<scalar_t>(gi), *gh_p = ptr<scalar_t>(gh);
      scalar_t *h_p = ptr<scalar_t>(h), *out_p = ptr<scalar_t>(out), *g_p = ptr<scalar_t>(gates);
      at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t o = b * H;
          if (active(lp, b, t)) {
            row(gi_p + 3 * o, gh_p + 3 * o, H, nullptr, h_p + o, h_p + o, out_p + o, g_p + 4 * o, H, H);
          } else {
            std::fill(out_p + o, out_p + o + H, scalar_t(0));
          }
        }
      });
    });
  }

  static void gru_backward_step(const at::Tensor& gates, const at::Tensor& h_prev, const at::Tensor& grad_out,
                                at::Tensor& dh, const at::Tensor& dgi, at::Tensor& dgh, const at::Tensor& len,
                                int64_t t) {
    const int64_t B = dh.size(0), H = dh.size(1);
    const int64_t* lp = ptr<int64_t>(len);
    AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "attnkit_gru_backward_step", [&] {
      auto row = ATTNKIT_PICK_ROWS(gru_backward_row<scalar_t>);
      const scalar_t *g_p = ptr<scalar_t>(gates), *hp_p = ptr<scalar_t>(h_prev), *go_p = ptr<scalar_t>(grad_out);
      scalar_t *dh_p = ptr<scalar_t>(dh), *dgi_p = ptr<scalar_t>(dgi), *dgh_p = ptr<scalar_t>(dgh);
      at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t o = b * H;
          if (active(lp, b, t)) {
            row(g_p + 4 * o, hp_p + o, go_p + o, dh_p + o, dgi_p + 3 * o, dgh_p + 3 * o, H, H);
          } else {  // dh passes through; the output was a constant 0
            std::fill(dgi_p + 3 * o, dgi_p + 3 * o + 3 * H, scalar_t(0));
            std::fill(dgh_p + 3 * o, dgh_p + 3 * o + 3 * H, scalar_t(0));
          }
        }
      });
    });
  }

  // Row-masked helpers on (B, N) tensors: dst = src / dst += src / dst = 0 on running rows.
  enum class RowOp { kCopy, kAdd, kZero };

  static void rows_op(RowOp op, at::Tensor& dst, const at::Tensor& src, const at::Tensor& len, int64_t t) {
    const int64_t B = dst.size(0), N = dst.size(1);
    const int64_t* lp = ptr<int64_t>(len);
    AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "attnkit_rnn_rows", [&] {
      scalar_t* d = dst.data_ptr<scalar_t>();
      const scalar_t* s = ptr<scalar_t>(src);
      for (int64_t b = 0; b < B; ++b) {
        if (!active(lp, b, t)) continue;
        scalar_t* dr = d + b * N;
        const scalar_t* sr = s ? s + b * N : nullptr;
        for (int64_t j = 0; j < N; ++j) dr[j] = op == RowOp::kCopy ? sr[j] : op == RowOp::kAdd ? dr[j] + sr[j] : 0;
      }
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

// ---------------------------------------------------------------- batch 1..4
// Batch 1..4 without projection runs whole here: the time loops of
// rnn_small_batch.h (LSTM) and rnn_small_batch_gru.h in one OpenMP team, the
// GEMMs below. Larger batches and projections take rnn_sequence.h's generic loop.
constexpr int64_t kSmallBatch = 4;

// A one-step forward (nn.GRUCell, a decoding step) takes the generic loop: packing
// W_hh into the team's panels costs as much as the one product they would serve
// (GRU (1, 1, 256): 46 -> 34 us). So does a one-step backward at batch 1, since
// its gradients are a few GEMMs, without the sequence path's copies (single_step_grads: (1, 1,
// 512) 1.23 -> 0.86 ms, LSTM); at 2..4 rows the team's stays ~10% faster. Both
// loops save the same tensors.
bool small_batch(const at::Tensor& x, const c10::optional<at::Tensor>& w_hr, bool forward) {
  if (rnn::present(w_hr) || x.dim() != 3 || x.size(1) < 1 || x.size(1) > kSmallBatch) return false;
  return x.size(0) > 1 || (!forward && x.size(1) > 1);
}

int small_batch_threads(int64_t B, int64_t H) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;  // called from inside a parallel region: no nested team
#endif
  // A thread needs a few dozen units of work per step to be worth a barrier.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B * H / 48)));
}

// C (m x n) = A B (+ C when `add`), row-major with leading dimensions, split
// over threads by rows of C. float: oneDNN's brgemm (AVX-512 JIT), about twice
// MKL's sgemm that at::mm calls on this AMD CPU (see attention_gemm.cpp's gemm_nn).
template <typename S>
void gemm_aten(int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* b, int64_t ldb, bool add, S* c,
               int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<S>::value);
  const at::Tensor A = at::from_blob(const_cast<S*>(a), {m, k}, {lda, 1}, opts);
  const at::Tensor B = at::from_blob(const_cast<S*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  add ? C.addmm_(A, B) : C.copy_(at::mm(A, B));
}

// Rows of C per brgemm call of rows_gemm and rows_gemm_long_k. oneDNN's brgemm takes int byte
// strides and sizes: it threw bad_alloc on a B of 2^31 bytes (the small-batch backward's dW_ih
// at T B I = 2^29, K = T B); operands reaching kBrgemmElements go to ATen's GEMM, which takes them.
constexpr int64_t kRows = 64;
constexpr int64_t kRowsLongK = 512, kRowsBlockK = 256;
constexpr int64_t kBrgemmElements = (int64_t{1} << 31) / sizeof(float);

void rows_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
               float* c, int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) {  // brgemm takes no empty product (bad_alloc); C += 0, or C = 0
    if (!add) {
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.0f);
    }
    return;
  }
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (k * ldb >= kBrgemmElements || kRows * lda >= kBrgemmElements || kRows * ldc >= kBrgemmElements) {
    return gemm_aten(m, n, k, a, lda, b, ldb, add, c, ldc);
  }
  // Past kRowsLongK, K in blocks of kRowsBlockK: a row tile of A with all of K (64 x 4096 floats,
  // 1 MB, the small-batch backward's dx at H = 1024) beside B's columns overflowed L2. That dx at
  // (B, T, H) = (4, 512, 1024): 150-154 -> 54 ms; (2, 512, 1024) 69-73 -> 28-30; (4, 256, 512)
  // 6.5-7.2 -> 4.7.
  const int64_t kb = k > kRowsLongK ? kRowsBlockK : k;
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t r = i0 * kRows; r < std::min(m, i1 * kRows); r += kRows) {
      for (int64_t k0 = 0; k0 < k; k0 += kb) {
        at::native::cpublas::brgemm(std::min(kRows, m - r), n, std::min(kb, k - k0), lda, ldb, ldc, add || k0 > 0,
                                    a + r * lda + k0, b + k0 * ldb, c + r * ldc, /*is_vnni=*/false);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
#else
  gemm_aten(m, n, k, a, lda, b, ldb, add, c, ldc);
#endif
}

void rows_gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
               double* c, int64_t ldc) {
  gemm_aten(m, n, k, a, lda, b, ldb, add, c, ldc);
}

// rows_gemm for the weight gradients, whose K (T B, or B) and A's leading dimension
// (transposed_stride(T B)) change with every sequence length and batch size. oneDNN's
// brgemm JIT-compiles a kernel per (M, N, K, lda, ldb, ldc), which ATen caches per thread
// and never frees: each new T B kept ~0.1-0.2 MB for good (BENCHMARKS.md, 2026-11-29). Here
// K runs in blocks of kLongK, each block of a row tile of A copied into a buffer with rows
// kLongK apart, and the last block rounded up to a multiple of kLongKStep with zeros in A and
// in a copy of B's last rows: the kernels depend on the model's sizes only. The copies are
// one more pass over A (training steps timed the same).
void rows_gemm_long_k(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                      bool add, float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  constexpr int64_t kLongK = 256, kLongKStep = 16;
  if (m == 0 || n == 0 || k == 0 || kLongK * ldb >= kBrgemmElements || kRows * ldc >= kBrgemmElements) {
    return rows_gemm(m, n, k, a, lda, b, ldb, add, c, ldc);
  }
  const int64_t last0 = (k - 1) / kLongK * kLongK, last = k - last0;
  const int64_t last_padded = (last + kLongKStep - 1) / kLongKStep * kLongKStep;
  std::vector<float> b_last;  // B's last `last` rows, then zero rows up to last_padded (rows n apart)
  if (last_padded != last) {
    b_last.assign(last_padded * n, 0.0f);
    for (int64_t r = 0; r < last; ++r) std::copy(b + (last0 + r) * ldb, b + (last0 + r) * ldb + n, b_last.data() + r * n);
  }
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> a_tile(kRows * kLongK, 0.0f);
    for (int64_t r = i0 * kRows; r < std::min(m, i1 * kRows); r += kRows) {
      const int64_t rows = std::min(kRows, m - r);
      for (int64_t k0 = 0; k0 < k; k0 += kLongK) {
        const int64_t width = std::min(kLongK, k - k0);
        const bool padded = k0 == last0 && last_padded != last;
        const int64_t width_padded = padded ? last_padded : width;
        for (int64_t i = 0; i < rows; ++i) {
          const float* src = a + (r + i) * lda + k0;
          float* dst = a_tile.data() + i * kLongK;
          std::copy(src, src + width, dst);
          std::fill(dst + width, dst + width_padded, 0.0f);
        }
        const float* b_block = padded ? b_last.data() : b + k0 * ldb;
        at::native::cpublas::brgemm(rows, n, width_padded, kLongK, padded ? n : ldb, ldc, add || k0 > 0, a_tile.data(),
                                    b_block, c + r * ldc, /*is_vnni=*/false);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
#else
  rows_gemm(m, n, k, a, lda, b, ldb, add, c, ldc);
#endif
}

void rows_gemm_long_k(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                      bool add, double* c, int64_t ldc) {
  gemm_aten(m, n, k, a, lda, b, ldb, add, c, ldc);
}

// Row stride of the gradients transposed (4H, T B) that the small-batch
// backward loops write as the steps go (the weight gradients' A: no transpose
// afterwards). Rows padded to an odd number of cache lines: at a stride of
// 1 KB (T B = 256) each step's 4H stores shared 4 of L1's 64 sets, 1.2 us a step.
int64_t transposed_stride(int64_t TB, int64_t element_size) {
  const int64_t per_line = 64 / element_size;
  int64_t ld_t = (TB + per_line - 1) / per_line * per_line;
  if ((ld_t / per_line) % 2 == 0) ld_t += per_line;
  return ld_t;
}

// The small-batch forwards' input projections, x (T B, I) W_ih^T (the time loops add the biases):
// brgemm tiles where they apply and the weight is at most 4 MB (the batch-1 LSTM forward at (T, H) =
// (256, 128): 80-82 -> 73-74 us of 340; level at H = 1024, slower at H = 2048, where the tiles'
// per-call transpose of W_ih outweighs oneDNN's), else Kernels::linear.
at::Tensor small_batch_projection(const at::Tensor& x, const at::Tensor& w) {
  if (w.numel() <= (int64_t{1} << 20)) {
    at::Tensor out = linear_tiles(x, w);
    if (out.defined()) return out;
  }
  return Kernels::linear(x, w, c10::nullopt);
}

// The small-batch forwards' state pair h_bufs (2, B, H), h0 in slot 0, and the final state
// taken out of slot T % 2 as a tensor of its own (a view would differ from the fake output's
// storage offset): memcpy, where a slot's view and copy_ or clone took ~1 us each.
at::Tensor state_pair(const at::Tensor& h0) {
  at::Tensor bufs = at::empty({2, h0.size(0), h0.size(1)}, h0.options());
  std::memcpy(bufs.data_ptr(), h0.data_ptr(), h0.nbytes());
  return bufs;
}

at::Tensor final_state(const at::Tensor& bufs, int64_t T) {
  at::Tensor h = at::empty({bufs.size(1), bufs.size(2)}, bufs.options());
  std::memcpy(h.data_ptr(), static_cast<const char*>(bufs.data_ptr()) + (T % 2) * h.nbytes(), h.nbytes());
  return h;
}

std::vector<at::Tensor> small_batch_lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                 const c10::optional<at::Tensor>& b_ih,
                                                 const c10::optional<at::Tensor>& b_hh,
                                                 const c10::optional<at::Tensor>& lengths, bool save) {
  rnn::check_forward(x, h0, &c0, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths, 4);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  // The input projection of every step (one GEMM), turned into the activated gates in place;
  // the biases start each step's recurrent product instead.
  at::Tensor gates = small_batch_projection(x.view({T * B, I}), w_ih).view({T, B, 4 * H});
  at::Tensor output = at::empty({T, B, H}, x.options());
  at::Tensor h_bufs = state_pair(h0);
  at::Tensor c = at::empty_like(c0);
  std::memcpy(c.data_ptr(), c0.data_ptr(), c0.nbytes());
  at::Tensor cs = save ? at::empty({T, B, H}, x.options()) : rnn::none_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnkit_lstm_forward_small_batch", [&] {
    ATTNKIT_PICK_ROWS(lstm_forward_small_batch<scalar_t>)(
        gates.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), ptr<scalar_t>(b_ih.value_or(at::Tensor())),
        ptr<scalar_t>(b_hh.value_or(at::Tensor())), h_bufs.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(), ptr<scalar_t>(cs), rnn::present(lengths) ? lengths->data_ptr<int64_t>() : nullptr,
        T, B, H, small_batch_threads(B, H));
  });
  return {output, final_state(h_bufs, T), c, save ? gates : rnn::none_like(x), cs, rnn::none_like(x)};
}

std::vector<at::Tensor> small_batch_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                                  const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                                  const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                                  const at::Tensor& gates, const at::Tensor& cs) {
  rnn::check_forward(x, h0, &c0, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths, 4);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), TB = T * B;
  rnn::check_grad(grad_output, "grad_output", x, {T, B, H});
  rnn::check_grad(grad_hn, "grad_hn", x, {B, H});
  rnn::check_grad(grad_cn, "grad_cn", x, {B, H});
  rnn::check_grad(output, "output", x, {T, B, H});
  rnn::check_grad(gates, "gates", x, {T, B, 4 * H});
  rnn::check_grad(cs, "cs", x, {T, B, H});
  at::Tensor grad_pre = at::empty({T, B, 4 * H}, x.options());
  const int64_t ld_t = transposed_stride(TB, x.element_size());
  at::Tensor grad_pre_t = at::empty({4 * H, ld_t}, x.options());
  // Summed into by the threads, step after step: in float64 (summed in float32, one term after
  // the other, it erred by 2.9e-4 of the largest at T B = 20000, the GRU's by 2.5e-3; now 3e-7).
  at::Tensor db = at::zeros({4 * H}, x.options().dtype(at::kDouble));
  at::Tensor dh = grad_hn.clone(), dc = grad_cn.clone();
  at::Tensor dx = at::empty({T, B, I}, x.options());
  at::Tensor dw_ih = at::empty({4 * H, I}, x.options()), dw_hh = at::empty({4 * H, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnkit_lstm_backward_small_batch", [&] {
    ATTNKIT_PICK_ROWS(lstm_backward_small_batch<scalar_t>)(
        gates.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(), c0.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
        w_hh.data_ptr<scalar_t>(), dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), grad_pre.data_ptr<scalar_t>(),
        grad_pre_t.data_ptr<scalar_t>(), ld_t, db.data_ptr<double>(),
        rnn::present(lengths) ? lengths->data_ptr<int64_t>() : nullptr, T, B, H, small_batch_threads(B, H));
    const scalar_t* gp = grad_pre.data_ptr<scalar_t>();
    const scalar_t* gp_t = grad_pre_t.data_ptr<scalar_t>();
    scalar_t* dw_hh_p = dw_hh.data_ptr<scalar_t>();
    rows_gemm(TB, I, 4 * H, gp, 4 * H, w_ih.data_ptr<scalar_t>(), I, false, dx.data_ptr<scalar_t>(), I);
    rows_gemm_long_k(4 * H, I, TB, gp_t, ld_t, x.data_ptr<scalar_t>(), I, false, dw_ih.data_ptr<scalar_t>(), I);
    // dW_hh = sum_t grad_pre[t]^T h_{t-1}: h0, then output[t - 1] (0 for stopped rows, whose grad_pre is 0).
    rows_gemm_long_k(4 * H, H, B, gp_t, ld_t, h0.data_ptr<scalar_t>(), H, false, dw_hh_p, H);
    if (T > 1) rows_gemm_long_k(4 * H, H, TB - B, gp_t + B, ld_t, output.data_ptr<scalar_t>(), H, true, dw_hh_p, H);
  });
  return {dx, dh, dc, dw_ih, dw_hh, db.to(x.scalar_type()), rnn::none_like(x)};
}

std::vector<at::Tensor> small_batch_gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                const c10::optional<at::Tensor>& b_hh,
                                                const c10::optional<at::Tensor>& lengths, bool save) {
  rnn::check_forward(x, h0, nullptr, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths, 3);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  // The input projection of every step (one GEMM); the biases go in the time loop.
  const at::Tensor gi = small_batch_projection(x.view({T * B, I}), w_ih);
  at::Tensor output = at::empty({T, B, H}, x.options());
  at::Tensor h_bufs = state_pair(h0);
  at::Tensor gates = save ? at::empty({T, B, 4 * H}, x.options()) : rnn::none_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnkit_gru_forward_small_batch", [&] {
    ATTNKIT_PICK_ROWS(gru_forward_small_batch<scalar_t>)(
        gi.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(), ptr<scalar_t>(b_ih.value_or(at::Tensor())),
        ptr<scalar_t>(b_hh.value_or(at::Tensor())), h_bufs.data_ptr<scalar_t>(),
        output.data_ptr<scalar_t>(), save ? gates.data_ptr<scalar_t>() : nullptr,
        rnn::present(lengths) ? lengths->data_ptr<int64_t>() : nullptr, T, B, H, small_batch_threads(B, H));
  });
  return {output, final_state(h_bufs, T), gates};
}

std::vector<at::Tensor> small_batch_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                                 const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                 const at::Tensor& w_hh, const c10::optional<at::Tensor>& lengths,
                                                 const at::Tensor& output, const at::Tensor& gates) {
  rnn::check_forward(x, h0, nullptr, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths, 3);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1), TB = T * B;
  rnn::check_grad(grad_output, "grad_output", x, {T, B, H});
  rnn::check_grad(grad_hn, "grad_hn", x, {B, H});
  rnn::check_grad(output, "output", x, {T, B, H});
  rnn::check_grad(gates, "gates", x, {T, B, 4 * H});
  at::Tensor grad_gi = at::empty({T, B, 3 * H}, x.options());
  at::Tensor grad_gh = at::empty({T, B, 3 * H}, x.options());
  const int64_t ld_t = transposed_stride(TB, x.element_size());
  at::Tensor grad_t = at::empty({4 * H, ld_t}, x.options());  // rows: recurrent r, z, n, then input-side n
  at::Tensor db_ih = at::zeros({3 * H}, x.options().dtype(at::kDouble));  // float64 sums, as the LSTM's db
  at::Tensor db_hh = at::zeros({3 * H}, x.options().dtype(at::kDouble));
  at::Tensor dh = grad_hn.clone();
  at::Tensor dx = at::empty({T, B, I}, x.options());
  at::Tensor dw_ih = at::empty({3 * H, I}, x.options()), dw_hh = at::empty({3 * H, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "attnkit_gru_backward_small_batch", [&] {
    const scalar_t *h0_p = h0.data_ptr<scalar_t>(), *out_p = output.data_ptr<scalar_t>();
    const scalar_t *x_p = x.data_ptr<scalar_t>(), *gt = grad_t.data_ptr<scalar_t>();
    scalar_t *dw_ih_p = dw_ih.data_ptr<scalar_t>(), *dw_hh_p = dw_hh.data_ptr<scalar_t>();
    ATTNKIT_PICK_ROWS(gru_backward_small_batch<scalar_t>)(
        gates.data_ptr<scalar_t>(), h0_p, out_p, grad_output.data_ptr<scalar_t>(), w_hh.data_ptr<scalar_t>(),
        dh.data_ptr<scalar_t>(), grad_gi.data_ptr<scalar_t>(), grad_gh.data_ptr<scalar_t>(),
        grad_t.data_ptr<scalar_t>(), ld_t, db_ih.data_ptr<double>(), db_hh.data_ptr<double>(),
        rnn::present(lengths) ? lengths->data_ptr<int64_t>() : nullptr, T, B, H, small_batch_threads(B, H));
    rows_gemm(TB, I, 3 * H, grad_gi.data_ptr<scalar_t>(), 3 * H, w_ih.data_ptr<scalar_t>(), I, false,
              dx.data_ptr<scalar_t>(), I);
    // dW_ih: r and z from the recurrent rows (the same gradients), n from the input-side rows.
    rows_gemm_long_k(2 * H, I, TB, gt, ld_t, x_p, I, false, dw_ih_p, I);
    rows_gemm_long_k(H, I, TB, gt + 3 * H * ld_t, ld_t, x_p, I, false, dw_ih_p + 2 * H * I, I);
    // dW_hh = sum_t grad_gh[t]^T h_{t-1}: h0, then output[t - 1] (0 for stopped rows, whose grad_gh is 0).
    rows_gemm_long_k(3 * H, H, B, gt, ld_t, h0_p, H, false, dw_hh_p, H);
    if (T > 1) rows_gemm_long_k(3 * H, H, TB - B, gt + B, ld_t, out_p, H, true, dw_hh_p, H);
  });
  return {dx, dh, dw_ih, dw_hh, db_ih.to(x.scalar_type()), db_hh.to(x.scalar_type())};
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "attnkit._C rnn: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "attnkit._C rnn: x must be float32 or float64, got ", x.scalar_type());
}

}  // namespace

void lstm_rows_forward(at::Tensor& pre, const at::Tensor& gh, at::Tensor& c, at::Tensor& h) {
  const int64_t B = c.size(0), H = c.size(1);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "attnkit_lstm_rows_forward", [&] {
    auto row = ATTNKIT_PICK_ROWS(lstm_forward_row<scalar_t>);
    scalar_t *pre_p = pre.data_ptr<scalar_t>(), *c_p = c.data_ptr<scalar_t>(), *h_p = h.data_ptr<scalar_t>();
    const scalar_t* gh_p = gh.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        row(pre_p + 4 * b * H, gh_p + 4 * b * H, H, c_p + b * H, h_p + b * H, h_p + b * H, nullptr, nullptr, H, H);
      }
    });
  });
}

void lstm_rows_backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c_new,
                        const at::Tensor& dh, at::Tensor& dc, at::Tensor& gpre) {
  const int64_t B = dc.size(0), H = dc.size(1);
  AT_DISPATCH_FLOATING_TYPES(dc.scalar_type(), "attnkit_lstm_rows_backward", [&] {
    auto row = ATTNKIT_PICK_ROWS(lstm_backward_row<scalar_t>);
    const scalar_t *g_p = gates.data_ptr<scalar_t>(), *cp_p = c_prev.data_ptr<scalar_t>();
    const scalar_t *cn_p = c_new.data_ptr<scalar_t>(), *dh_p = dh.data_ptr<scalar_t>();
    scalar_t *dc_p = dc.data_ptr<scalar_t>(), *gp_p = gpre.data_ptr<scalar_t>();
    at::parallel_for(0, B, grain_rows(4 * H), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t o = b * H;
        row(g_p + 4 * o, cp_p + o, cn_p + o, dh_p + o, dc_p + o, gp_p + 4 * o, H, H);
      }
    });
  });
}

std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                     bool save) {
  check_cpu(x);
  if (small_batch(x, w_hr, true)) return small_batch_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, save);
  return rnn::lstm_forward<Kernels>(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save);
}

std::vector<at::Tensor> lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                      const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                      const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cs,
                                      const at::Tensor& hc) {
  check_cpu(x);
  if (small_batch(x, w_hr, false)) {
    return small_batch_lstm_backward(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, lengths, output, gates, cs);
  }
  return rnn::lstm_backward<Kernels>(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, output,
                                     gates, cs, hc);
}

std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
                                    bool save) {
  check_cpu(x);
  if (small_batch(x, c10::nullopt, true)) return small_batch_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
  return rnn::gru_forward<Kernels>(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save);
}

std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates) {
  check_cpu(x);
  if (small_batch(x, c10::nullopt, false)) {
    return small_batch_gru_backward(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates);
  }
  return rnn::gru_backward<Kernels>(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates);
}

}  // namespace cpu
}  // namespace attnkit
