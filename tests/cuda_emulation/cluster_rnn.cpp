// csrc/cuda/rnn_cluster_kernel.cuh's persistent LSTM / GRU forward on CPU threads
// (emulate.h: the cluster's blocks at once, its barrier, distributed shared memory and
// mma.sync): tests/test_cuda_emulation.py checks it against a plain PyTorch recurrence.
#include <torch/extension.h>

#include "emulate.h"
#include "rnn_cluster_kernel.cuh"

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan);
  m.def("forward", &forward);
}
