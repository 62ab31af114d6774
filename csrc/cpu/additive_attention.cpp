// Additive attention on the CPU (see attnkit/additive_attention.h).
//
// The cost is tanh: Tq * Tk * A of them. Forward: one task per (batch, block of
// queries) scores its rows block of keys by block of keys (the key block stays
// in cache across the queries), softmaxes each row in place in the weights
// output and keeps its log-sum-exp; context = weights @ values is one bmm.
// Backward: one task per (batch, slice of keys) recomputes t = tanh(qp_i + kp_j)
// pair by pair, once: p from the saved lse, dS = p (dP - delta) with
// dP = grad_context @ values^T (+ grad_weights) from one bmm, then
// d_qp_i += dS v_a (1 - t^2), d_kp_j += the same, d_v_a += dS t. A task owns
// its keys' d_kp; its d_qp and d_v_a go to per-slice buffers summed at the end
// (one slice per batch element when the batch alone keeps the threads busy).
//
// The extension is built without -march flags, so at::vec falls back to scalar
// std::tanh; the float passes use GCC vector types compiled for AVX-512, AVX2
// and baseline x86-64 (target_clones, picked at load time, as attention_rows.cpp
// does) with the rational tanh of simd.h. double (for gradcheck) keeps
// plain loops and std::tanh.
#include "attnkit/additive_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention_rows.h"
#include "simd.h"

namespace attnkit {
namespace cpu {

namespace {

constexpr int64_t kQueryBlock = 16;  // queries per forward task
constexpr int64_t kKeyBlock = 32;    // keys scored against one query before the next (kept in L1/L2)

// ----------------------------------------------------------------------------- float, vectorized

using namespace simd;  // vf, W, load/store, fast_tanh

// s[j] = v_a . tanh(q + k_j) for the n keys k_j = k + j * A; -inf where live[j] == 0.
ATTNKIT_SIMD_CLONES void score_block(const float* q, const float* k, int64_t n, int64_t A, const float* va,
                                     const bool* live, float* s) {
  const int64_t body = A - A % W;
  for (int64_t j = 0; j < n; ++j) {
    if (live != nullptr && !live[j]) {
      s[j] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const float* kj = k + j * A;
    vf acc = splat(0.0f);
    for (int64_t a = 0; a < body; a += W) acc += load(va + a) * simd::fast_tanh(load(q + a) + load(kj + a));
    if (body < A) {
      const int64_t rest = A - body;
      acc += load_tail(va + body, rest, 0.0f) *
             fast_tanh(load_tail(q + body, rest, 0.0f) + load_tail(kj + body, rest, 0.0f));
    }
    s[j] = hsum(acc);
  }
}

// One query against n keys in the backward: p[j] = exp(v_a . t - lse) with
// t = tanh(q + k_j) (0 where live[j] == 0), dS = p (dp[j] - delta), then
// dq += dS v_a (1 - t^2), dk_j += the same, dva += dS t. t: A floats of scratch.
ATTNKIT_SIMD_CLONES void backward_pairs(const float* q, const float* k, int64_t n, int64_t A, const float* va,
                                        const bool* live, float lse, float delta, const float* dp, float* p, float* dq,
                                        float* dk, float* dva, float* t) {
  const int64_t body = A - A % W, rest = A - body;
  for (int64_t j = 0; j < n; ++j) {
    if (live != nullptr && !live[j]) {
      p[j] = 0.0f;
      continue;
    }
    const float* kj = k + j * A;
    vf acc = splat(0.0f);
    for (int64_t a = 0; a < body; a += W) {
      const vf tv = simd::fast_tanh(load(q + a) + load(kj + a));
      store(t + a, tv);
      acc += load(va + a) * tv;
    }
    if (rest) {
      const vf tv = simd::fast_tanh(load_tail(q + body, rest, 0.0f) + load_tail(kj + body, rest, 0.0f));
      store_tail(t + body, tv, rest);
      acc += load_tail(va + body, rest, 0.0f) * tv;
    }
    const float pj = std::exp(hsum(acc) - lse);
    const float ds = pj * (dp[j] - delta);
    p[j] = pj;
    if (ds == 0.0f) continue;
    float* dkj = dk + j * A;
    const vf dsv = splat(ds);
    for (int64_t a = 0; a < body; a += W) {
      const vf tv = load(t + a);
      const vf u = dsv * load(va + a) * (splat(1.0f) - tv * tv);
      store(dq + a, load(dq + a) + u);
      store(dkj + a, load(dkj + a) + u);
      store(dva + a, load(dva + a) + dsv * tv);
    }
    for (int64_t a = body; a < A; ++a) {
      const float u = ds * va[a] * (1.0f - t[a] * t[a]);
      dq[a] += u;
      dkj[a] += u;
      dva[a] += ds * t[a];
    }
  }
}

// ----------------------------------------------------------------------------- double, plain loops

void score_block(const double* q, const double* k, int64_t n, int64_t A, const double* va, const bool* live,
                 double* s) {
  for (int64_t j = 0; j < n; ++j) {
    if (live != nullptr && !live[j]) {
      s[j] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double acc = 0;
    for (int64_t a = 0; a < A; ++a) acc += va[a] * std::tanh(q[a] + k[j * A + a]);
    s[j] = acc;
  }
}

void backward_pairs(const double* q, const double* k, int64_t n, int64_t A, const double* va, const bool* live,
                    double lse, double delta, const double* dp, double* p, double* dq, double* dk, double* dva,
                    double* t) {
  for (int64_t j = 0; j < n; ++j) {
    if (live != nullptr && !live[j]) {
      p[j] = 0.0;
      continue;
    }
    double s = 0;
    for (int64_t a = 0; a < A; ++a) {
      t[a] = std::tanh(q[a] + k[j * A + a]);
      s += va[a] * t[a];
    }
    p[j] = std::exp(s - lse);
    const double ds = p[j] * (dp[j] - delta);
    for (int64_t a = 0; a < A; ++a) {
      const double u = ds * va[a] * (1.0 - t[a] * t[a]);
      dq[a] += u;
      dk[j * A + a] += u;
      dva[a] += ds * t[a];
    }
  }
}

// ----------------------------------------------------------------------------- drivers

template <typename T>
void forward_kernel(const T* qp, const T* kp, const T* va, const bool* mask, T* weights, T* lse, int64_t B, int64_t Tq,
                    int64_t Tk, int64_t A) {
  const int64_t blocks = (Tq + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * kQueryBlock, i1 = std::min(Tq, i0 + kQueryBlock);
      const bool* live = mask ? mask + b * Tk : nullptr;
      for (int64_t j0 = 0; j0 < Tk; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, Tk - j0);
        for (int64_t i = i0; i < i1; ++i) {
          score_block(qp + (b * Tq + i) * A, kp + (b * Tk + j0) * A, n, A, va, live ? live + j0 : nullptr,
                      weights + (b * Tq + i) * Tk + j0);
        }
      }
      for (int64_t i = i0; i < i1; ++i) {  // softmax of the finished rows, in place
        T* row = weights + (b * Tq + i) * Tk;
        const T top = attn_rows::row_max(row, Tk);
        if (top == -std::numeric_limits<T>::infinity()) {  // every key masked: weights 0, context 0
          std::fill(row, row + Tk, T(0));
          lse[b * Tq + i] = top;
          continue;
        }
        const T total = attn_rows::exp_shift_sum(row, Tk, top);
        const T inv = T(1) / total;
        for (int64_t j = 0; j < Tk; ++j) row[j] *= inv;
        lse[b * Tq + i] = top + std::log(total);
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* qp, const T* kp, const T* va, const bool* mask, const T* lse, const T* delta,
                     const T* dp, T* p, T* dq_part, T* dk, T* dva_part, int64_t B, int64_t Tq, int64_t Tk, int64_t A,
                     int64_t slices) {
  const int64_t key_blocks = (Tk + kKeyBlock - 1) / kKeyBlock;
  at::parallel_for(0, B * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> t(A);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / slices, slice = task % slices;
      const int64_t j_begin = std::min(Tk, (key_blocks * slice / slices) * kKeyBlock);
      const int64_t j_end = std::min(Tk, (key_blocks * (slice + 1) / slices) * kKeyBlock);
      const bool* live = mask ? mask + b * Tk : nullptr;
      T* dq = dq_part + task * Tq * A;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, j_end - j0);
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t row = b * Tq + i;
          if (lse[row] == -std::numeric_limits<T>::infinity()) continue;  // no real key: p and every gradient 0
          backward_pairs(qp + row * A, kp + (b * Tk + j0) * A, n, A, va, live ? live + j0 : nullptr, lse[row],
                         delta[row], dp + row * Tk + j0, p + row * Tk + j0, dq + i * A, dk + (b * Tk + j0) * A,
                         dva_part + task * A, t.data());
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& values, const at::Tensor& v_a,
                  const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(qp.dim() == 3 && kp.dim() == 3 && values.dim() == 3 && v_a.dim() == 1, "additive_attention: bad ranks");
  TORCH_CHECK(qp.size(2) == kp.size(2) && qp.size(2) == v_a.size(0), "additive_attention: hidden sizes differ");
  TORCH_CHECK(qp.size(0) == kp.size(0) && kp.size(0) == values.size(0) && kp.size(1) == values.size(1),
              "additive_attention: batch or key length differ");
  for (const at::Tensor* t : {&qp, &kp, &values, &v_a}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == qp.scalar_type() && t->device().is_cpu(),
                "additive_attention: expected contiguous CPU tensors of one dtype");
  }
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == qp.size(0) && mask->size(1) == kp.size(1) && mask->device().is_cpu(),
                "additive_attention: mask must be a contiguous bool (B, Tk) CPU tensor");
  }
}

}  // namespace

std::vector<at::Tensor> additive_attention_forward(const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& values,
                                                   const at::Tensor& v_a, const c10::optional<at::Tensor>& mask) {
  check_inputs(qp, kp, values, v_a, mask);
  const int64_t B = qp.size(0), Tq = qp.size(1), A = qp.size(2), Tk = kp.size(1);
  at::Tensor weights = at::empty({B, Tq, Tk}, qp.options());
  at::Tensor lse = at::empty({B, Tq}, qp.options());
  const bool* mask_ptr = mask ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(qp.scalar_type(), "additive_attention_forward", [&] {
    forward_kernel<scalar_t>(qp.data_ptr<scalar_t>(), kp.data_ptr<scalar_t>(), v_a.data_ptr<scalar_t>(), mask_ptr,
                             weights.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, Tq, Tk, A);
  });
  return {at::bmm(weights, values), weights, lse};
}

std::vector<at::Tensor> additive_attention_backward(const at::Tensor& grad_context,
                                                    const c10::optional<at::Tensor>& grad_weights,
                                                    const at::Tensor& delta, const at::Tensor& qp, const at::Tensor& kp,
                                                    const at::Tensor& values, const at::Tensor& v_a,
                                                    const c10::optional<at::Tensor>& mask, const at::Tensor& lse) {
  check_inputs(qp, kp, values, v_a, mask);
  const int64_t B = qp.size(0), Tq = qp.size(1), A = qp.size(2), Tk = kp.size(1);
  TORCH_CHECK(grad_context.is_contiguous() && grad_context.scalar_type() == qp.scalar_type() &&
                  lse.scalar_type() == qp.scalar_type() && delta.scalar_type() == qp.scalar_type() &&
                  lse.is_contiguous() && delta.is_contiguous(),
              "additive_attention_backward: grad_context, lse, delta must be contiguous in the inputs' dtype");
  // The kernel reads them by (b, i) without bounds: their shapes and device are checked here.
  TORCH_CHECK(grad_context.sizes() == at::IntArrayRef({B, Tq, values.size(2)}) && grad_context.device().is_cpu(),
              "additive_attention_backward: grad_context must be a (B, Tq, Dv) CPU tensor");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, Tq}) && delta.sizes() == at::IntArrayRef({B, Tq}) &&
                  lse.device().is_cpu() && delta.device().is_cpu(),
              "additive_attention_backward: lse and delta must be (B, Tq) CPU tensors");
  if (grad_weights) {
    TORCH_CHECK(grad_weights->sizes() == at::IntArrayRef({B, Tq, Tk}) && grad_weights->device().is_cpu() &&
                    grad_weights->scalar_type() == qp.scalar_type(),
                "additive_attention_backward: grad_weights must be a (B, Tq, Tk) CPU tensor in the inputs' dtype");
  }
  if (B == 0 || Tq == 0 || Tk == 0) {  // nothing to sum over (and no thread share to divide by B)
    return {at::zeros_like(qp), at::zeros_like(kp), at::zeros_like(values), at::zeros_like(v_a)};
  }
  at::Tensor dp = at::bmm(grad_context, values.transpose(1, 2));
  if (grad_weights) dp.add_(*grad_weights);
  // Slice the keys only as far as needed to give every thread work (each slice holds its own d_qp).
  const int64_t key_blocks = (Tk + kKeyBlock - 1) / kKeyBlock;
  const int64_t wanted = (2 * at::get_num_threads() + B - 1) / B;
  const int64_t slices = std::max<int64_t>(1, std::min(wanted, key_blocks));
  at::Tensor p = at::zeros({B, Tq, Tk}, qp.options());  // rows with no real key are skipped
  at::Tensor dq_part = at::zeros({B, slices, Tq, A}, qp.options());
  at::Tensor dk = at::zeros({B, Tk, A}, qp.options());
  at::Tensor dva_part = at::zeros({B * slices, A}, qp.options());
  const bool* mask_ptr = mask ? mask->data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(qp.scalar_type(), "additive_attention_backward", [&] {
    backward_kernel<scalar_t>(qp.data_ptr<scalar_t>(), kp.data_ptr<scalar_t>(), v_a.data_ptr<scalar_t>(), mask_ptr,
                              lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(),
                              p.data_ptr<scalar_t>(), dq_part.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                              dva_part.data_ptr<scalar_t>(), B, Tq, Tk, A, slices);
  });
  at::Tensor dq = slices == 1 ? dq_part.squeeze(1) : dq_part.sum(1);
  return {dq, dk, at::bmm(p.transpose(1, 2), grad_context), dva_part.sum(0)};
}

}  // namespace cpu
}  // namespace attnkit
