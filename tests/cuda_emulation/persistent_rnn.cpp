// The persistent LSTM / GRU kernels on CPU threads (emulate.h: a grid's or cluster's blocks
// at once, its barrier, distributed shared memory and mma.sync): the grid forward of
// rnn_persistent_kernel.cuh, the cluster forward of rnn_cluster_kernel.cuh and backward of
// rnn_cluster_backward_kernel.cuh, launched as rnn_persistent.cu, rnn_cluster.cu and
// rnn_cluster_backward.cu launch them; tests/test_cuda_emulation.py checks them against a
// plain PyTorch recurrence and attnkit._C's backward.
#include <torch/extension.h>

#include "emulate.h"
#include "rnn_cluster_backward_kernel.cuh"
#include "rnn_cluster_kernel.cuh"
#include "rnn_persistent_kernel.cuh"

namespace {

using namespace attnkit::cuda::cluster_rnn;

constexpr size_t kSharedLimit = 232448;  // an H100's / H200's shared memory a block (227 KB)

// The cluster size and split that rnn_cluster.cu's plan picks first (before asking the
// device whether it can run it), or the forced size; (C, units, row tiles, k tiles, k split).
std::vector<int64_t> plan(int64_t gates, int64_t batch, int64_t hidden, int64_t forced) {
  for (int C = 1; C <= kMaxCluster; C *= 2) {
    if (forced != 0 && C != forced) continue;
    const Split s = split_for(static_cast<int>(gates), hidden, C);
    if (split_fits(s, batch, C, kSharedLimit, forced != 0)) return {C, s.units, s.row_tiles, s.k_tiles, s.k_split};
  }
  TORCH_CHECK(false, "no cluster split fits");
}

template <typename T>
T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// As cluster_rnn::launch: pre (T, B, G H), h (2, B, H) with h0 in buffer 0, c (B, H) float32
// (LSTM), output (T, B, H); len, saved gates (T, B, 4 H) and cell states (T, B, H) optional.
void forward(int64_t gates, int64_t forced, const at::Tensor& w_hh, const at::Tensor& pre,
             const c10::optional<at::Tensor>& b_hh, at::Tensor h, c10::optional<at::Tensor> c, at::Tensor output,
             const c10::optional<at::Tensor>& len, c10::optional<at::Tensor> saved_gates,
             c10::optional<at::Tensor> saved_cs) {
  TORCH_CHECK(w_hh.scalar_type() == at::kHalf || w_hh.scalar_type() == at::kBFloat16,
              "the cluster kernel takes float16 and bfloat16");
  const int64_t T = pre.size(0), B = pre.size(1), H = w_hh.size(1);
  const std::vector<int64_t> split = plan(gates, B, H, forced);
  const int C = static_cast<int>(split[0]);
  with_half(w_hh.scalar_type(), [&](auto s) {
    using S = decltype(s);
    Params<S> p{w_hh.data_ptr<S>(), pre.data_ptr<S>(), gates == 3 ? ptr_or_null<S>(b_hh) : nullptr,
                h.data_ptr<S>(), ptr_or_null<float>(c), output.data_ptr<S>(), ptr_or_null<int64_t>(len),
                ptr_or_null<S>(saved_gates), ptr_or_null<S>(saved_cs), static_cast<int>(T), static_cast<int>(B),
                static_cast<int>(H), static_cast<int>(split[1]), static_cast<int>(split[2]),
                static_cast<int>(split[3]), static_cast<int>(split[4])};
    const unsigned int blocks = C * ((B + kBatchTile - 1) / kBatchTile);
    const size_t smem = smem_bytes(p.row_tiles, p.k_tiles, p.k_split);
    if (gates == 4) {
      cuda_emulation::launch_clusters(rnn_cluster_kernel<S, 4>, blocks, C, kThreads, smem, p);
    } else {
      cuda_emulation::launch_clusters(rnn_cluster_kernel<S, 3>, blocks, C, kThreads, smem, p);
    }
    return 0;
  });
}

// As run_backward's kernel launch (the forward's split, the backward's k split): from the
// forward's saved gates (T, B, 4 H), cell states (LSTM) and output (GRU), returns
// {dpre, dgh (GRU), dh0, dc0 (LSTM)}, the tensors the weight-gradient GEMMs then take.
std::vector<at::Tensor> backward(int64_t gates, int64_t forced, const at::Tensor& w_hh, const at::Tensor& saved,
                                 const c10::optional<at::Tensor>& cs, const c10::optional<at::Tensor>& c0,
                                 const c10::optional<at::Tensor>& h0, const c10::optional<at::Tensor>& output,
                                 const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                 const c10::optional<at::Tensor>& grad_cn, const c10::optional<at::Tensor>& len) {
  TORCH_CHECK(w_hh.scalar_type() == at::kHalf || w_hh.scalar_type() == at::kBFloat16,
              "the cluster kernel takes float16 and bfloat16");
  const int64_t T = grad_output.size(0), B = grad_output.size(1), H = w_hh.size(1);
  const std::vector<int64_t> split = plan(gates, B, H, forced);
  const int C = static_cast<int>(split[0]), U = static_cast<int>(split[1]), RT = static_cast<int>(split[2]),
            KT = static_cast<int>(split[3]);
  at::Tensor dpre = at::empty({T, B, gates * H}, grad_output.options());
  at::Tensor dgh = gates == 3 ? at::empty({T, B, 3 * H}, grad_output.options()) : at::Tensor();
  at::Tensor dh0 = at::empty({B, H}, grad_output.options());
  at::Tensor dc0 = gates == 4 ? at::empty({B, H}, grad_output.options()) : at::Tensor();
  with_half(w_hh.scalar_type(), [&](auto s) {
    using S = decltype(s);
    const auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<S>() : nullptr; };
    BackParams<S> p{w_hh.data_ptr<S>(), saved.data_ptr<S>(), ptr_or_null<S>(cs), ptr_or_null<S>(c0),
                    gates == 3 ? ptr_or_null<S>(h0) : nullptr, gates == 3 ? ptr_or_null<S>(output) : nullptr,
                    grad_output.data_ptr<S>(), grad_hn.data_ptr<S>(), ptr_or_null<S>(grad_cn),
                    ptr_or_null<int64_t>(len), dpre.data_ptr<S>(), data(dgh), dh0.data_ptr<S>(), data(dc0),
                    static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), U, RT, KT, back_k_split(KT)};
    const unsigned int blocks = C * ((B + kBatchTile - 1) / kBatchTile);
    const size_t smem = back_smem_bytes(C, U, RT, KT);
    if (gates == 4) {
      cuda_emulation::launch_clusters(rnn_cluster_backward_kernel<S, 4>, blocks, C, kThreads, smem, p);
    } else {
      cuda_emulation::launch_clusters(rnn_cluster_backward_kernel<S, 3>, blocks, C, kThreads, smem, p);
    }
    return 0;
  });
  return {dpre, dgh, dh0, dc0};
}

// As launch_grid: the grid kernel with `units` hidden units a block (rnn_persistent.cu's plan
// takes ceil(H / SMs); here the caller picks, for a grid of a few blocks), its blocks as one
// cluster so that grid.sync() is the cluster's barrier. Tensors as for `forward`.
void grid_forward(int64_t gates, int64_t units, const at::Tensor& w_hh, const at::Tensor& pre,
                  const c10::optional<at::Tensor>& b_hh, at::Tensor h, c10::optional<at::Tensor> c,
                  at::Tensor output, const c10::optional<at::Tensor>& len) {
  const int64_t T = pre.size(0), B = pre.size(1), H = w_hh.size(1);
  TORCH_CHECK(B <= attnkit::cuda::grid_rnn::kMaxBatch && B * units <= attnkit::cuda::grid_rnn::kThreads,
              "the grid kernel's limits");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_hh.scalar_type(), "grid_forward", [&] {
    using S = scalar_t;
    namespace grid = attnkit::cuda::grid_rnn;
    grid::Params<S> p{w_hh.data_ptr<S>(), pre.data_ptr<S>(), gates == 3 ? ptr_or_null<S>(b_hh) : nullptr,
                      h.data_ptr<S>(), ptr_or_null<float>(c), output.data_ptr<S>(), ptr_or_null<int64_t>(len),
                      static_cast<int>(T), static_cast<int>(B), static_cast<int>(H), static_cast<int>(units)};
    const unsigned int blocks = static_cast<unsigned int>((H + units - 1) / units);
    const size_t smem = grid::smem_bytes<S>(static_cast<int>(gates), B, H, units);
    if (gates == 4) {
      cuda_emulation::launch_clusters(grid::rnn_persistent_kernel<S, 4>, blocks, blocks, grid::kThreads, smem, p);
    } else {
      cuda_emulation::launch_clusters(grid::rnn_persistent_kernel<S, 3>, blocks, blocks, grid::kThreads, smem, p);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grid_forward", &grid_forward);
  m.def("plan", &plan);
  m.def("forward", &forward);
  m.def("backward", &backward);
}
