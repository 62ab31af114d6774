// attnkit._C_cuda: the CUDA kernels. Built whenever nvcc and a CUDA build of
// torch are present, so it compiles and links even on machines with no GPU.
#include <torch/extension.h>

#include "attnkit/lstm_cell.h"
#include "attnkit/rnn.h"
#include "attnkit/rnn_layernorm.h"
#include "attnkit/rnn_persistent.h"
#include "step_gemm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit CUDA kernels";
  m.def("lstm_cell_forward", &attnkit::cuda::lstm_cell_forward, "LSTM cell step, forward (CUDA)");
  m.def("lstm_cell_backward", &attnkit::cuda::lstm_cell_backward, "LSTM cell step, backward (CUDA)");
  m.def("lstm_forward", &attnkit::cuda::lstm_forward, "whole-sequence LSTM layer, forward (CUDA)");
  m.def("lstm_backward", &attnkit::cuda::lstm_backward, "whole-sequence LSTM layer, backward (CUDA)");
  m.def("gru_forward", &attnkit::cuda::gru_forward, "whole-sequence GRU layer, forward (CUDA)");
  m.def("gru_backward", &attnkit::cuda::gru_backward, "whole-sequence GRU layer, backward (CUDA)");
  m.def("rnn_persistent_unsupported", &attnkit::cuda::rnn_persistent_unsupported,
        "why the persistent LSTM/GRU kernel cannot run (gates, batch, hidden, dtype, device); empty if it can");
  m.def("rnn_cluster_plan", &attnkit::cuda::rnn_cluster_plan,
        "the cluster kernel's size for (gates, batch, hidden, dtype, device), or 0 and why not: "
        "[size, reason, clusters at a time]");
  m.def("lstm_forward_persistent", &attnkit::cuda::lstm_forward_persistent,
        "whole-sequence LSTM forward, persistent kernel, inference (CUDA); [] when not taken");
  m.def("gru_forward_persistent", &attnkit::cuda::gru_forward_persistent,
        "whole-sequence GRU forward, persistent kernel, inference (CUDA); [] when not taken");
  m.def("lstm_forward_cluster_save", &attnkit::cuda::lstm_forward_cluster_save,
        "LSTM training forward on the cluster kernel (CUDA): [output, h_n, c_n, gates, cs], [] when not taken");
  m.def("gru_forward_cluster_save", &attnkit::cuda::gru_forward_cluster_save,
        "GRU training forward on the cluster kernel (CUDA): [output, h_n, gates], [] when not taken");
  m.def("lstm_backward_cluster", &attnkit::cuda::lstm_backward_cluster,
        "LSTM backward on the cluster kernel (CUDA): [dx, dh0, dc0, dw_ih, dw_hh, db], [] when not taken");
  m.def("gru_backward_cluster", &attnkit::cuda::gru_backward_cluster,
        "GRU backward on the cluster kernel (CUDA): [dx, dh0, dw_ih, dw_hh, db_ih, db_hh], [] when not taken");
  m.def("ln_lstm_forward", &attnkit::cuda::ln_lstm_forward, "layer-normalized LSTM layer with zoneout, forward (CUDA)");
  m.def("ln_lstm_backward", &attnkit::cuda::ln_lstm_backward, "layer-normalized LSTM layer, backward (CUDA)");
  m.def("ln_gru_forward", &attnkit::cuda::ln_gru_forward, "layer-normalized GRU layer with zoneout, forward (CUDA)");
  m.def("ln_gru_backward", &attnkit::cuda::ln_gru_backward, "layer-normalized GRU layer, backward (CUDA)");
  m.def("rnn_direct_gemm_available", &attnkit::cuda::step_gemm::available,
        "whether ATTNKIT_RNN_CUDA_DIRECT_GEMM=1 can call cublasGemmEx (found in the cuBLAS torch loaded)");
}
