"""The CUDA extension: compiled and linked by `make cuda-check` (no GPU needed);
its kernels run in the GPU suite."""
import pytest
import torch

import attnkit
from attnkit import _extensions

pytestmark = pytest.mark.cuda_build


def test_cuda_extension_was_built_and_imports():
    ext, reason = _extensions.load("_C_cuda")
    assert ext is not None, reason
    assert callable(ext.lstm_cell_forward) and callable(ext.lstm_cell_backward)
    assert _extensions.build_info()["extensions"]["attnkit._C_cuda"] is None


def test_cuda_backend_status_is_consistent():
    status = attnkit.available_backends()["cuda"]
    assert status.available == torch.cuda.is_available(), status
    if not torch.cuda.is_available():
        assert status.reason == "attnkit._C_cuda is built, but torch sees no CUDA GPU"


def test_persistent_rnn_kernel_is_exported_and_checks_arguments():
    ext, reason = _extensions.load("_C_cuda")
    assert ext is not None, reason
    for name in ("rnn_persistent_unsupported", "lstm_forward_persistent", "gru_forward_persistent"):
        assert callable(getattr(ext, name)), name
    # The checks that come before any device query run without a GPU.
    cuda = torch.device("cuda")
    with pytest.raises(RuntimeError, match="gates must be 4 \\(LSTM\\) or 3 \\(GRU\\)"):
        ext.rnn_persistent_unsupported(5, 1, 64, torch.float32, cuda)
    with pytest.raises(RuntimeError, match="device must be a CUDA device"):
        ext.rnn_persistent_unsupported(4, 1, 64, torch.float32, torch.device("cpu"))
    assert "got Double" in ext.rnn_persistent_unsupported(4, 1, 64, torch.float64, cuda)
    x = torch.zeros(2, 1, 3)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.lstm_forward_persistent(x, x[0], x[0], x, x, None, None, None)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.gru_forward_persistent(x, x[0], x, x, None, None, None)
