"""attnkit: fused attention (Triton) and LSTM/GRU (C++/CUDA) kernels for PyTorch.

    import attnkit
    attnkit.available_backends()          # what this install can run, and why not
    h, c = attnkit.ops.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    with attnkit.use_backend("reference"):  # force one backend
        ...
    print(attnkit.explain("lstm_cell", x, (h, c), w_ih, w_hh))
"""
from ._dispatch import (
    BACKENDS,
    BackendStatus,
    Decision,
    available_backends,
    explain,
    keep_backend_forcing,
    last_dispatch,
    refresh,
    set_backend,
    use_backend,
)
from . import nn, ops, reference  # noqa: E402  (registers the ops)
from . import models  # noqa: E402  (BERT, GPT-2; imports neither transformers nor safetensors)
from .functional import scaled_dot_product_attention  # noqa: E402
from .patch import PatchReport, patch, patched, unpatch  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "Decision",
    "PatchReport",
    "available_backends",
    "explain",
    "keep_backend_forcing",
    "last_dispatch",
    "models",
    "nn",
    "ops",
    "patch",
    "patched",
    "reference",
    "refresh",
    "scaled_dot_product_attention",
    "set_backend",
    "unpatch",
    "use_backend",
]
