// The tile GEMMs of the CPU flash attention (declared in attention_kernel.h):
// every tile product of the kernels is a row-major gemm_nn.
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>

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

// Unused where gemm_nn has brgemm.
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

}  // namespace

// C (m x n) = A B (+ C when `add`), row-major, no transposes, float. oneDNN's
// batch-reduce GEMM where torch's headers declare it (CPUBLAS_BRGEMM_F32F32F32;
// else BLAS): on the AMD EPYC of BENCHMARKS.md, 16.8 us vs MKL sgemm's 41 us for
// a 64 x 512 x 64 tile, 1 thread (MKL seems to take a slower path off Intel CPUs).
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
             float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
#else
  gemm(false, false, m, n, k, 1.0f, a, lda, b, ldb, add ? 1.0f : 0.0f, c, ldc);
#endif
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
             double* c, int64_t ldc) {
  gemm(false, false, m, n, k, 1.0, a, lda, b, ldb, add ? 1.0 : 0.0, c, ldc);
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
