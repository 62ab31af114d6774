// The tile GEMMs of the CPU flash attention (declared in attention_kernel.h):
// every tile product of the kernels is a row-major gemm_nn.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention_kernel.h"

// BLAS as linked into libtorch_cpu (MKL on x86 builds). Weak, so that a torch
// without these symbols still loads the extension and falls back to ATen.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace attnkit {
namespace cpu {
namespace flash {

namespace {

// ------------------------------------------------------------------ GEMM on row-major tiles
// C (m x n) = alpha * op(A) op(B) + beta * C; op(A) is m x k; all row-major with leading dims.

template <typename T, typename C>
void aten_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, float beta, C* c, int64_t ldc) {
  const auto in = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto out = at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor A = at::from_blob(const_cast<T*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, in);
  at::Tensor B = at::from_blob(const_cast<T*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, in);
  at::Tensor Ct = at::from_blob(c, {m, n}, {ldc, 1}, out);
  at::Tensor prod = at::mm((ta ? A.t() : A).to(out.dtype()), (tb ? B.t() : B).to(out.dtype()));
  if (beta == 0) {
    Ct.copy_(prod.mul_(alpha));
  } else {
    Ct.mul_(beta).add_(prod, alpha);
  }
}

// Unused where piece() has brgemm.
[[maybe_unused]] void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ == nullptr) return aten_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
  sgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ == nullptr) {
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    at::Tensor A = at::from_blob(const_cast<double*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opts);
    at::Tensor B = at::from_blob(const_cast<double*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opts);
    at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    at::Tensor prod = at::mm(ta ? A.t() : A, tb ? B.t() : B);
    beta == 0 ? C.copy_(prod.mul_(alpha)) : C.mul_(beta).add_(prod, alpha);
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
  dgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

// C (m x n) = A B (+ C when `add`), row-major, no transposes, float. oneDNN's
// batch-reduce GEMM where torch's headers declare it (CPUBLAS_BRGEMM_F32F32F32;
// else BLAS): on the AMD EPYC of BENCHMARKS.md, 16.8 us vs MKL sgemm's 41 us for
// a 64 x 512 x 64 tile, 1 thread (MKL seems to take a slower path off Intel CPUs).
void piece(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
           float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
#else
  gemm(false, false, m, n, k, 1.0f, a, lda, b, ldb, add ? 1.0f : 0.0f, c, ldc);
#endif
}

void piece(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
           double* c, int64_t ldc) {
  gemm(false, false, m, n, k, 1.0, a, lda, b, ldb, add ? 1.0 : 0.0, c, ldc);
}

constexpr int64_t kPiece = 64;

// The size of the next piece of a dim with `left` to go: 64, else a multiple of 16, else the rest.
inline int64_t next_piece(int64_t left) { return left >= kPiece ? kPiece : left >= 16 ? left / 16 * 16 : left; }

// Thread-local room for the zero-padded copies of a remainder's operands.
template <typename T>
T* remainder_room(int slot, int64_t elems) {
  thread_local std::vector<T> room[2];
  if (static_cast<int64_t>(room[slot].size()) < elems) room[slot].resize(elems);
  return room[slot].data();
}

// C (m x n) (+)= A B with K cut into pieces of 16 and more; the last < 16 rows of B (and
// columns of A) are copied, zero-padded, into a K = 16 product of their own. fixed_k: K whole.
template <typename T>
void k_pieces(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, bool add, T* c,
              int64_t ldc, bool fixed_k) {
  if (fixed_k) return piece(m, n, k, a, lda, b, ldb, add, c, ldc);
  int64_t p0 = 0;
  for (int64_t kp; p0 < k && (kp = next_piece(k - p0)) >= 16; p0 += kp) {
    piece(m, n, kp, a + p0, lda, b + p0 * ldb, ldb, add || p0 > 0, c, ldc);
  }
  const int64_t rest = k - p0;
  if (rest == 0) return;
  T* a16 = remainder_room<T>(0, m * 16);
  T* b16 = remainder_room<T>(1, 16 * n);
  for (int64_t i = 0; i < m; ++i) {
    std::copy(a + i * lda + p0, a + i * lda + k, a16 + i * 16);
    std::fill(a16 + i * 16 + rest, a16 + i * 16 + 16, T(0));
  }
  for (int64_t p = 0; p < 16; ++p) {
    if (p < rest) {
      std::copy(b + (p0 + p) * ldb, b + (p0 + p) * ldb + n, b16 + p * n);
    } else {
      std::fill(b16 + p * n, b16 + (p + 1) * n, T(0));
    }
  }
  piece(m, n, 16, a16, 16, b16, n, add || p0 > 0, c, ldc);
}

template <typename T>
void tile_gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, bool add, T* c,
               int64_t ldc, int fixed, int64_t b_panel) {
  TORCH_INTERNAL_ASSERT(b_panel == 0 || ldb == kPanel, "gemm_nn: panels have a leading dim of kPanel");
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // no product: C += 0, or C = 0 (brgemm takes no empty one)
    for (int64_t i = 0; i < m && !add; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    return;
  }
  const int64_t n_step = (fixed & kFixedN) ? n : kPiece;
  for (int64_t i0 = 0, mi; i0 < m; i0 += mi) {
    mi = next_piece(m - i0);
    for (int64_t j0 = 0; j0 < n; j0 += n_step) {
      const T* bj = b_panel > 0 ? b + (j0 / kPanel) * b_panel : b + j0;
      // A varying N is rounded up to 16: B and C have the room (see gemm_nn), C's extra columns scratch.
      const int64_t nj = (fixed & kFixedN) ? n : std::min(kPiece, round_up(n - j0, 16));
      k_pieces(mi, nj, k, a + i0 * lda, lda, bj, ldb, add, c + i0 * ldc + j0, ldc, fixed & kFixedK);
    }
  }
}

}  // namespace

void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
             float* c, int64_t ldc, int fixed, int64_t b_panel) {
  tile_gemm(m, n, k, a, lda, b, ldb, add, c, ldc, fixed, b_panel);
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
             double* c, int64_t ldc, int fixed, int64_t b_panel) {
  tile_gemm(m, n, k, a, lda, b, ldb, add, c, ldc, fixed, b_panel);
}

// Ends a thread's brgemm use (frees hardware state on CPUs where it holds any).
void gemm_nn_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

}  // namespace flash
}  // namespace cpu
}  // namespace attnkit
