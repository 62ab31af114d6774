// attnkit._C_cuda: the CUDA kernels. Built whenever nvcc and a CUDA build of
// torch are present, so it compiles and links even on machines with no GPU.
#include <torch/extension.h>

#include "attnkit/lstm_cell.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkit CUDA kernels";
  m.def("lstm_cell_forward", &attnkit::cuda::lstm_cell_forward, "LSTM cell step, forward (CUDA)");
  m.def("lstm_cell_backward", &attnkit::cuda::lstm_cell_backward, "LSTM cell step, backward (CUDA)");
}
