// attnkit._C: the CPU kernels, one pybind function per entry point. Dispatch
// and validation live in Python (attnkit.ops), so these are thin.
#include <torch/extension.h>

#include "attnkit/lstm_cell.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit CPU kernels";
  m.def("lstm_cell_forward", &attnkit::cpu::lstm_cell_forward, "LSTM cell step, forward (CPU)");
  m.def("lstm_cell_backward", &attnkit::cpu::lstm_cell_backward, "LSTM cell step, backward (CPU)");
  m.def("num_threads", [] { return at::get_num_threads(); }, "threads at::parallel_for may use");
}
