"""Test helpers shared by the suites (on sys.path through pytest's `pythonpath`)."""
import contextlib

import pytest
import torch

import attnkit
from attnkit import _dispatch

# Tolerances by dtype for kernel-vs-reference comparisons (atol, rtol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def backend_params(op: str):
    """pytest params (backend, device) for each backend implementing `op`:
    CPU for cpp/reference/triton (interpreter), CUDA for triton/cuda (marked gpu)."""
    params = []
    for backend in attnkit.BACKENDS:
        if backend not in _dispatch._OPS[op].implementations:
            continue
        devices = {"cpp": ["cpu"], "reference": ["cpu"], "triton": ["cpu", "cuda"], "cuda": ["cuda"]}[backend]
        for device in devices:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


@contextlib.contextmanager
def forced(op: str, backend: str, device: str, dtype=torch.float32, **call):
    """Runs the block with `backend` forced for `op`, or skips the test when
    this machine (or this backend, for the features in `call`) cannot run it."""
    reasons = _dispatch._OPS[op].reasons(backend, {"device": torch.device(device), "dtype": dtype, **call})
    if reasons:
        pytest.skip(f"{backend} on {device}: {'; '.join(reasons)}")
    with attnkit.use_backend(backend, op=op):
        yield torch.device(device)
