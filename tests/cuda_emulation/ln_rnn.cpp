// csrc/cuda/rnn_layernorm_kernels.cuh's kernels on CPU threads (emulate.h), through the
// same time loops as the CPU and CUDA entry points: tests/test_cuda_emulation.py checks
// them against attnkit._C's CPU kernels.
#include <torch/extension.h>

#include "emulate.h"
#include "rnn_layernorm_kernels.cuh"

namespace {

struct EmulatedLaunch {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kOp = "emulated layer-norm rnn";

  template <typename... Params, typename... Args>
  static void run(void (*kernel)(Params...), unsigned int blocks, Args... args) {
    cuda_emulation::launch(kernel, blocks, attnkit::cuda::ln_rnn::kThreads, args...);
  }
};

using Rows = attnkit::cuda::ln_rnn::KernelRows<EmulatedLaunch>;

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ln_lstm_forward", &attnkit::rnn_ln::lstm_forward<Rows>);
  m.def("ln_lstm_backward", &attnkit::rnn_ln::lstm_backward<Rows>);
  m.def("ln_gru_forward", &attnkit::rnn_ln::gru_forward<Rows>);
  m.def("ln_gru_backward", &attnkit::rnn_ln::gru_backward<Rows>);
}
