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
