// Few-row linear layer (see attnkit/linear.h). Why not at::linear: at one to a
// few rows it is a matrix-vector product bound by reading W, and on this CPU
// (AMD EPYC, oneDNN/MKL sgemv) at::linear streams W at 11-29 GB/s where a plain
// loop over W's rows reaches 33-51 GB/s (measured at GPT-2's shapes, uncached W).
// Each thread owns a slice of W's rows and reads it once, for every row of x.
#include "attnkit/linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attnkit {
namespace cpu {
namespace {

using namespace simd;

constexpr int64_t kWeightRows = 4;  // W rows per block: 4 x `kXRows` accumulators stay in registers
constexpr int64_t kXRows = 4;

// sums[r][m] = x[m] . W[n + r] for kWeightRows rows of W and MR <= kXRows rows of x.
// A block past W's last row repeats that row (R of them are real), so the loop
// has no row branch and the accumulators stay in registers. `next`: the next
// block's first row (next_rows >= 1 of them), or null: prefetched while this
// block computes, so that memory keeps streaming W while the FMAs run (and, past
// 4 rows of x, while the later groups reread this block from L1). One thread:
// 13 -> 21-26 GB/s at 4 rows, 11 -> 18-20 at 8, 10 -> 12.5 at 16, 1 row unchanged.
template <int64_t MR>
ATTNKIT_INLINE void block(const float* x, const float* w, int64_t R, int64_t K, const float* next, int64_t next_rows,
                          float sums[][kXRows]) {
  const float* wr[kWeightRows];
  for (int64_t r = 0; r < kWeightRows; ++r) wr[r] = w + std::min(r, R - 1) * K;
  const float* pf[kWeightRows] = {};
  if (next != nullptr) {
    for (int64_t r = 0; r < kWeightRows; ++r) pf[r] = next + std::min(r, next_rows - 1) * K;
  }
  vf acc[kWeightRows][MR];
  for (int64_t r = 0; r < kWeightRows; ++r)
    for (int64_t m = 0; m < MR; ++m) acc[r][m] = vf{};
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    if (next != nullptr) {
      for (int64_t r = 0; r < kWeightRows; ++r) __builtin_prefetch(pf[r] + k, 0, 3);
    }
    vf xv[MR];
    for (int64_t m = 0; m < MR; ++m) xv[m] = load(x + m * K + k);
    for (int64_t r = 0; r < kWeightRows; ++r) {
      const vf wv = load(wr[r] + k);
      for (int64_t m = 0; m < MR; ++m) acc[r][m] += xv[m] * wv;
    }
  }
  if (k < K) {
    vf xv[MR];
    for (int64_t m = 0; m < MR; ++m) xv[m] = load_tail(x + m * K + k, K - k, 0.f);
    for (int64_t r = 0; r < kWeightRows; ++r) {
      const vf wv = load_tail(wr[r] + k, K - k, 0.f);
      for (int64_t m = 0; m < MR; ++m) acc[r][m] += xv[m] * wv;
    }
  }
  for (int64_t r = 0; r < kWeightRows; ++r)
    for (int64_t m = 0; m < MR; ++m) sums[r][m] = hsum(acc[r][m]);
}

ATTNKIT_SIMD_CLONES
void rows(const float* x, int64_t M, const float* w, const float* bias, float* y, int64_t N, int64_t K,
          int64_t n_begin, int64_t n_end) {
  float sums[kWeightRows][kXRows];
  for (int64_t n = n_begin; n < n_end; n += kWeightRows) {
    const int64_t R = std::min(kWeightRows, n_end - n);
    const int64_t next_rows = std::min(kWeightRows, n_end - n - R);
    for (int64_t m0 = 0; m0 < M; m0 += kXRows) {
      const int64_t MR = std::min(kXRows, M - m0);
      const float* xm = x + m0 * K;
      const float* wn = w + n * K;
      // The first group of rows prefetches the next block (its lines arrive while the rest compute).
      const float* next = m0 == 0 && next_rows > 0 ? wn + R * K : nullptr;
      switch (MR) {
        case 1: block<1>(xm, wn, R, K, next, next_rows, sums); break;
        case 2: block<2>(xm, wn, R, K, next, next_rows, sums); break;
        case 3: block<3>(xm, wn, R, K, next, next_rows, sums); break;
        default: block<4>(xm, wn, R, K, next, next_rows, sums); break;
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t m = 0; m < MR; ++m) y[(m0 + m) * N + n + r] = sums[r][m] + (bias ? bias[n + r] : 0.f);
    }
  }
}

}  // namespace

at::Tensor linear_few_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "linear_few_rows: x and weight must be 2-D, got ", x.dim(),
              "-D and ", weight.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "linear_few_rows: x and weight must be float32");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_few_rows: tensors must be on the CPU");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "linear_few_rows: x and weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "linear_few_rows: weight is (", N, ", ", weight.size(1), "), expected (N, ", K,
              ")");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->device().is_cpu() &&
                    bias->dim() == 1 && bias->size(0) == N,
                "linear_few_rows: bias must be a contiguous float32 CPU tensor of shape (", N, ",)");
    bias_ptr = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Threads split W's rows; below ~64 KB of W per task one thread is faster than waking another.
  const int64_t blocks = (N + kWeightRows - 1) / kWeightRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, kWeightRows * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows(xp, M, wp, bias_ptr, yp, N, K, b0 * kWeightRows, std::min(N, b1 * kWeightRows));
  });
  return y;
}

namespace {

const c10::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const c10::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// oneDNN splits its work for omp_get_max_threads() threads and assumes its parallel regions get
// them all; OpenMP may grant fewer under OMP_DYNAMIC or an OMP_THREAD_LIMIT below that count, and
// then its linear returns garbage (torch's own mkldnn linear as well: measured at 62 off and NaN).
// ATen's GEMMs split by the team they get.
bool openmp_teams_may_shrink() {
#ifdef _OPENMP
  return omp_get_dynamic() != 0 || omp_get_thread_limit() < omp_get_max_threads();
#else
  return false;
#endif
}

}  // namespace

bool onednn_linear_available() { return onednn_linear_op().has_value() && !openmp_teams_may_shrink(); }

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  // oneDNN has no primitive for an empty product (input_size 0 fails "could not create a primitive
  // descriptor"); ATen's GEMMs return the bias, or zeros. A packed (reordered) weight is never empty.
  if (x.numel() == 0 || weight.numel() == 0) {
    return present(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  }
  torch::jit::Stack stack{x, weight, present(bias) ? c10::IValue(*bias) : c10::IValue(), "none",
                          c10::List<c10::optional<at::Scalar>>(), c10::IValue()};
  onednn_linear_op()->callBoxed(&stack);
  return stack[0].toTensor();
}

// Measured on a Xeon (Sapphire Rapids): MKL beat oneDNN by 5-35% on the LSTM
// cell's backward GEMMs ((B, I, H) = (32, 256, 256) .. (512, 1024, 1024)), the
// brgemm tiles of rnn_fused.cpp's mm by 10-20% on the sequence backward's
// [dW_ih | dW_hh] at (32, 128, 256), and oneDNN by ~15% on nn.GRUCell's step at
// batch 16-32 (oneDNN lays out an unpacked weight on every call); on the AMD EPYC
// of BENCHMARKS.md oneDNN was 2.3x MKL.
bool gemms_on_aten() {
  const char* forced = std::getenv("ATTNKIT_CPU_GEMM");
  if (forced != nullptr && *forced != '\0') {
    // A typo would otherwise pick oneDNN silently, and an A/B run would compare one route with itself.
    const bool aten = std::strcmp(forced, "aten") == 0;
    TORCH_CHECK(aten || std::strcmp(forced, "onednn") == 0,
                "ATTNKIT_CPU_GEMM must be 'aten' or 'onednn' (or unset for the CPU's default), got '", forced, "'");
    return aten;
  }
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool yes = at::hasMKL() && __builtin_cpu_is("intel");
  return yes;
#else
  return false;
#endif
}

at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const bool fp32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                    (!present(bias) || (bias->scalar_type() == at::kFloat && bias->is_contiguous()));
  if (fp32 && x.is_contiguous() && weight.is_contiguous() && x.dim() == 2) {
    if (x.size(0) <= kFewRows) return linear_few_rows(x, weight, present(bias) ? bias : c10::nullopt);
    if (onednn_linear_available() && !gemms_on_aten()) return onednn_linear(x, weight, bias);
  }
  return present(bias) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

}  // namespace cpu
}  // namespace attnkit
