"""Test helpers shared by the suites (on sys.path through pytest's `pythonpath`)."""
import contextlib

import pytest
import torch

import attnkit
from attnkit import _dispatch

# Every numerical tolerance of the test suite, in one place (README: "Numerical tolerances").
#
# TOLERANCES: (atol, rtol) for torch.testing.assert_close of a kernel against the plain-PyTorch
# reference or torch.nn run in the same dtype (RNNs, LSTM cell), or elementwise against float64
# (rotary): a few ulps of the dtype for the reordered sums and the vectorized exp/tanh. RNN gradients get 10x (RNN_GRAD_FACTOR): they
# add up T steps of products.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
RNN_GRAD_FACTOR = 10

# ATTENTION_TOL: attention (dense, varlen, decode) against the float64 ground truth computed from the same
# (already rounded) inputs, as attention_cases.assert_close measures it: max |error| <= tol x
# max(1, max |expected|). The kernels accumulate in fp32 but round P to the input dtype before
# P V and round the output: ~10 ulps of fp16 (1e-2), ~5 of bf16 (4e-2); fp32 loses ~1e-6 per
# reordered dot product, 1e-4 covers D = 256 and N in the thousands. Gradients recompute P and
# chain two more products (dS, then dQ/dK): GRAD_TOL_FACTOR x that.
ATTENTION_TOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 4e-2,
    torch.float16: 1e-2,
}
GRAD_TOL_FACTOR = 4

# STABILITY_TOL: extreme inputs (tests/test_stability.py) against the float64 reference, same
# measure as ATTENTION_TOL. Logits x1e4 make the softmax one-hot up to near-ties; a score of
# size 1e4 in fp32 carries an absolute error of ~1e-3 (eps x |s|), so lse (itself ~1e4) is
# compared relative to its size and the output (a convex combination of v) to 1e-3.
# Near-overflow half inputs are compared with the dtype's ATTENTION_TOL relative to the largest
# output (the measure scales with max |expected|).
STABILITY_TOL = {
    "attention_out_large_logits": 1e-3,
    "attention_lse_large_logits": 1e-6,  # relative: |lse| ~ 1e4, fp32 eps ~ 6e-8 per op
    "attention_small_logits": 1e-5,  # scores ~1e-4: the softmax is ~uniform, errors ~eps
}

# LONG_SEQUENCE_TOL: N = 32k attention (cpp, fp32) against float64 rows computed exactly, and
# T = 10k LSTM/GRU (cpp, fp32) against torch.nn in float64. Attention sums 32k terms per row in
# fp32 (error ~ sqrt(N) eps); the RNNs are contractive with the weights drawn (scale 1/sqrt(H)),
# so the error stays near one step's, it does not grow with T. Gradients: x10 (backward through
# 10k steps accumulates dW over every step).
LONG_SEQUENCE_TOL = {
    "attention": 2e-4,
    "rnn": 1e-4,
    "rnn_grad": 1e-3,
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
