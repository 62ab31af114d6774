"""Test helpers shared by the suites (on sys.path through pytest's `pythonpath`)."""
import contextlib
import os
import subprocess
import sys
import textwrap

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
# Gradients of half inputs: measured on the CPU backends (cpp, reference, triton's interpreter)
# against the float64 truth at 2e-3..7e-3 (bf16) and 2e-4..4e-4 (fp16); the bounds above x 4 let a
# dq 10% off pass in bf16. These keep ~5x (bf16) and ~10x (fp16) headroom.
ATTENTION_GRAD_TOL = {dtype: tol * GRAD_TOL_FACTOR for dtype, tol in ATTENTION_TOL.items()}
ATTENTION_GRAD_TOL.update({torch.bfloat16: 4e-2, torch.float16: 4e-3})

# STABILITY_TOL: extreme logits (tests/test_stability.py) against the float64 reference, same
# measure as ATTENTION_TOL, fp32 inputs. Scores ~1e4 make the softmax one-hot up to near-ties;
# such a score carries an absolute fp32 error of ~1e-3 (eps x |s|): the output (a convex
# combination of v) within 1e-3, lse (itself ~1e4) within 1e-6 relative to its size, and the
# gradients, where that error passes through P (1 - P) of the near-tied keys and is multiplied
# by |q| ~ 1e4, within 5e-2 (measured: ~1e-2 on cpp, ~6e-3 on the fp32 reference backend).
# Scores ~1e-4 give a ~uniform softmax: errors of a few eps, 1e-5.
# Half inputs near overflow use ATTENTION_TOL of their dtype (the measure scales with max |expected|).
# LSTM/GRU inputs x1e4 (saturated gates), fp32: weight gradients relative to their largest entry
# within 2e-3; torch.nn's own fp32 LSTM/GRU is off by as much (1e-4..5e-4 measured) from float64.
STABILITY_TOL = {
    "attention_out_large_logits": 1e-3,
    "attention_lse_large_logits": 1e-6,
    "attention_grad_large_logits": 5e-2,
    "attention_small_logits": 1e-5,
    "rnn_saturated_grad_fp32": 2e-3,
}

# LONG_SEQUENCE_TOL: attention at N = 32k / 8k (cpp, fp32) against float64 rows computed
# exactly (max abs error; outputs are O(1)): a row sums N terms in fp32, error ~ sqrt(N) eps
# = 1e-5 at N = 32k (measured ~5e-7); gradients GRAD_TOL_FACTOR x that. LSTM/GRU at T = 10k
# (cpp, fp32) against torch.nn in float64: the recurrences are contractive with torch's
# initialization, so the output error stays at one step's (~1e-7 measured; 1e-5 allowed) and
# does not grow with T; weight gradients sum T steps (~4e-5 relative measured at T = 10k; 5e-4).
LONG_SEQUENCE_TOL = {
    "attention": 1e-5,
    "rnn": 1e-5,
    "rnn_grad": 5e-4,
}


def backend_params(op: str):
    """pytest params (backend, device) for each backend implementing `op`:
    CPU for cpp/reference/triton (interpreter), CUDA for triton/cuda (marked gpu)."""
    params = []
    for backend in attnkit.BACKENDS:
        if backend not in _dispatch._OPS[op].implementations:
            continue
        # cuda_persistent is inference only (no backward): tests/ops/test_rnn_persistent.py has its own.
        devices = {"cpp": ["cpu"], "reference": ["cpu"], "triton": ["cpu", "cuda"], "cuda": ["cuda"],
                   "cuda_persistent": []}[backend]
        for device in devices:
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


@contextlib.contextmanager
def num_threads(n: int):
    """torch.set_num_threads(n) for the block, restored after (kernels pick schedules by it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def forced(op: str, backend: str, device: str, dtype=torch.float32, **call):
    """Runs the block with `backend` forced for `op`, or skips the test when
    this machine (or this backend, for the features in `call`) cannot run it.
    The reasons are asked with the backend forced: some are speed preferences that forcing
    overrides (cpp linear past 16 rows), and asked outside they skipped cases that run."""
    with attnkit.use_backend(backend, op=op):
        reasons = _dispatch._OPS[op].reasons(backend, {"device": torch.device(device), "dtype": dtype, **call})
        if reasons:
            pytest.skip(f"{backend} on {device}: {'; '.join(reasons)}")
        yield torch.device(device)


_KEPT_MEMORY = """
import ctypes, gc, sys, torch, attnkit
def rss_mb():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
{setup}
for n in {warm!r}:
    step(n)
before = rss_mb()
for n in {measured!r}:
    step(n)
print(rss_mb() - before)
"""


def kept_memory_mb(setup: str, warm, measured, *args: str) -> float:
    """MB of RSS that a fresh process keeps over the `measured` calls of the `step(n)` that
    `setup` defines (with sys.argv[1:] = args), after the `warm` ones (the largest first, so
    that buffers sized by the largest call stop growing). oneDNN's primitive caches (torch's,
    up to 1024 entries each) are off: what is left is attnkit's own. Linux only (/proc, glibc)."""
    script = _KEPT_MEMORY.format(setup=textwrap.dedent(setup), warm=list(warm), measured=list(measured))
    env = dict(os.environ, ONEDNN_PRIMITIVE_CACHE_CAPACITY="0", LRU_CACHE_CAPACITY="1", OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.strip().splitlines()[-1])
