"""Numerical stability (#11): logits scaled x1e4 and x1e-4, fp16/bf16 inputs near overflow,
saturated LSTM/GRU gates, and long sequences (attention at N = 32k, LSTM/GRU at T = 10k) in
bounded memory; everything finite and within tests/helpers.py's tolerances of float64.

The long runs go through tests/long_sequence_probe.py in a subprocess (peak resident memory
of a fresh process). The shorter ones run in `make test`; the largest are marked `slow`:
    TRITON_INTERPRET=1 .venv/bin/python -m pytest -m slow tests/test_stability.py
"""
import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from attention_cases import assert_close, ground_truth
from helpers import (ATTENTION_TOL, GRAD_TOL_FACTOR, LONG_SEQUENCE_TOL, RNN_GRAD_FACTOR, STABILITY_TOL, TOLERANCES,
                     backend_params, forced)

import attnkit
from attnkit.ops import flash_attention

OP = "flash_attention"
CPU_BACKENDS = [p for p in backend_params(OP) if p.values[1] == "cpu"]


def run_attention(backend, q, k, v, kwargs, grad_out):
    with forced(OP, backend, "cpu", q.dtype):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = flash_attention(*leaves, **kwargs, return_lse=True)
        grads = torch.autograd.grad(out, leaves, grad_out)
    for name, t in [("out", out), ("lse", lse[torch.isfinite(lse)])] + list(zip(("dq", "dk", "dv"), grads)):
        assert torch.isfinite(t).all(), f"{backend}: non-finite {name}"
    return out, lse, grads


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("logit_scale", [1e4, 1e-4], ids=["x1e4", "x1e-4"])
def test_extreme_logits(backend, device, logit_scale):
    """q scaled so the scores are ~1e4 (one-hot softmax; exp must not overflow) or ~1e-4
    (uniform); causal GQA with Nq < Nk; fp32 against float64."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 17, 16, generator=gen) * logit_scale
    k, v = (torch.randn(2, 1, 24, 16, generator=gen) for _ in range(2))
    grad_out = torch.randn(2, 2, 17, 16, generator=gen)
    kwargs = dict(causal=True)
    out, lse, grads = run_attention(backend, q, k, v, kwargs, grad_out)
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out)
    if logit_scale > 1:
        assert_close(out, out_t, STABILITY_TOL["attention_out_large_logits"], "out")
        relative = ((lse.double() - lse_t).abs() / lse_t.abs().clamp_min(1.0)).max().item()
        assert relative <= STABILITY_TOL["attention_lse_large_logits"], f"lse: relative error {relative:.3g}"
        grad_tol = STABILITY_TOL["attention_grad_large_logits"]
    else:
        assert_close(out, out_t, STABILITY_TOL["attention_small_logits"], "out")
        assert_close(lse, lse_t, STABILITY_TOL["attention_small_logits"], "lse")
        grad_tol = STABILITY_TOL["attention_small_logits"] * GRAD_TOL_FACTOR
    for name, g, g_t in zip(("dq", "dk", "dv"), grads, grads_t):
        assert_close(g, g_t, grad_tol, name)


# (dtype, scale of q and k entries, |v| entries): "scores" pushes q.k past the half type's range
# (the kernels form scores in fp32), "values" puts v next to the largest finite value with
# ~uniform weights, so the fp32 accumulator sums Nk near-max values. bf16 shares fp32's
# exponent range: v * Nk must stay below fp32's max (3.4e38), hence 1e36 (README).
NEAR_OVERFLOW = {
    "fp16-scores": (torch.float16, 250.0, 60000.0 / 8),
    "fp16-values": (torch.float16, 0.01, 60000.0),
    "bf16-scores": (torch.bfloat16, 1e3, 1e3),
    "bf16-values": (torch.bfloat16, 0.01, 1e36),
}


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(NEAR_OVERFLOW))
def test_half_inputs_near_overflow(backend, device, case):
    dtype, qk, v_max = NEAR_OVERFLOW[case]
    gen = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 17, 16, generator=gen) * qk).to(dtype)
    k = (torch.randn(1, 2, 40, 16, generator=gen) * qk).to(dtype)
    v = ((torch.rand(1, 2, 40, 16, generator=gen) * 0.1 + 0.9) * v_max).to(dtype)
    v[..., ::2] *= -1
    assert torch.isfinite(v).all() and v.abs().max() >= 0.8 * v_max
    grad_out = torch.randn(1, 2, 17, 16, generator=gen).to(dtype)
    out, lse, grads = run_attention(backend, q, k, v, {}, grad_out)  # all finite
    out_t, lse_t, grads_t = ground_truth(q, k, v, {}, grad_out)
    tol = ATTENTION_TOL[dtype]
    assert_close(out, out_t, tol, "out")
    assert_close(lse, lse_t, tol, "lse")
    # dv = P^T dO is well conditioned. dq and dk are only checked finite: here they are sums
    # that cancel (sum_j P_ij (dP_ij - delta_i) = 0) of terms ~|v| or ~|k| (near-one-hot or
    # uniform P), so the half-precision rounding of the output inside delta = rowsum(dO * O)
    # dominates them on every backend, the fp32 reference's included (errors 0.2-0.6 of max|dq|).
    assert_close(grads[2], grads_t[2], tol * GRAD_TOL_FACTOR, "dv")


RNN_CASES = [(backend, dtype) for backend in ("cpp", "reference") for dtype in (torch.float32, torch.float64)
             if backend == "cpp" or dtype == torch.float32]  # the fp64 reference loop is slow and adds nothing


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("backend,dtype", RNN_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("input_scale", [1e4, 1e-4], ids=["x1e4", "x1e-4"])
def test_rnn_saturated_and_tiny_preactivations(kind, backend, dtype, input_scale):
    """Inputs x1e4 saturate every gate (sigmoid/tanh of +-1e4: e^1e4 overflows to inf inside
    the kernels' sigmoid and must give 0/1, not NaN); x1e-4 keeps them at the linear point.
    Two layers, bidirectional, against torch.nn in float64 with the same weights; errors
    relative to the largest value (inputs of 1e4 make weight gradients ~1e4 whose small
    entries are sums that cancel)."""
    torch.manual_seed(0)
    ours = getattr(attnkit.nn, kind)(6, 8, num_layers=2, bidirectional=True, dtype=dtype)
    truth = getattr(torch.nn, kind)(6, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    truth.load_state_dict({name: t.double() for name, t in ours.state_dict().items()})
    x = (torch.randn(20, 3, 6, dtype=torch.float64) * input_scale).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    with attnkit.use_backend(backend, op=kind.lower()):
        out, _ = ours(x)
        grads = torch.autograd.grad(out.sum(), [x] + list(ours.parameters()))
    out_t, _ = truth(x64)
    grads_t = torch.autograd.grad(out_t.sum(), [x64] + list(truth.parameters()))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    tol = TOLERANCES[dtype][1]
    assert_close(out, out_t, tol, "output")
    grad_tol = tol * RNN_GRAD_FACTOR
    if dtype == torch.float32 and input_scale > 1:
        grad_tol = STABILITY_TOL["rnn_saturated_grad_fp32"]
    for i, (g, g_t) in enumerate(zip(grads, grads_t)):
        assert_close(g, g_t, grad_tol, f"gradient {i}")


PROBE = pathlib.Path(__file__).with_name("long_sequence_probe.py")
SHORT = ("attention:2048:backward", "lstm:1000", "gru:1000")
LONG = ("attention:32768", "attention:8192:backward", "lstm:10000", "gru:10000")


@functools.lru_cache(maxsize=None)
def probe(specs):
    """{spec: result} of one fresh process running the specs in turn."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # cpp only: no interpreter setup
    done = subprocess.run([sys.executable, str(PROBE), *specs], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for r in results:  # the figures, in the -rA / -s output
        print(json.dumps(r))
    return {r["spec"]: r for r in results}


@pytest.mark.parametrize("spec", list(SHORT) + [pytest.param(s, marks=pytest.mark.slow) for s in LONG])
def test_long_sequences_bounded_memory(spec):
    r = probe(SHORT if spec in SHORT else LONG)[spec]
    assert r["finite"], r
    if r["kind"] == "attention":
        tol = LONG_SEQUENCE_TOL["attention"]
        assert r["errors"]["out"] <= tol, r
        for name in ("dq", "dk", "dv"):
            assert r["errors"].get(name, 0.0) <= tol * GRAD_TOL_FACTOR, r
        # O(N): the outputs (out, and dq/dk/dv in a backward: the size of the inputs) plus
        # per-thread tiles, never an N x N score matrix (fp32 N x N: 16 MiB at 2k, 4 GiB at 32k).
        bound = 2 * r["input_mib"] + 4
        assert r["peak_mib"] <= bound < r["dense_scores_mib"], r
    else:
        assert r["errors"]["out"] <= LONG_SEQUENCE_TOL["rnn"], r
        assert r["errors"]["grad"] <= LONG_SEQUENCE_TOL["rnn_grad"], r
        # The activations saved for the backward, their gradients and the output, nothing per
        # step beyond them; one autograd node per layer, not per step.
        assert r["peak_mib"] <= 3 * r["activation_mib"] + 16, r
        assert r["autograd_nodes"] < 20, r


def test_long_sequence_probe_refuses_a_bad_spec_before_any_run():
    # A misspelt spec used to run the specs before it, then end in a traceback.
    done = subprocess.run([sys.executable, str(PROBE), "lstm:3", "attention:8:forward"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "'attention:8:forward': expected attention:N, attention:N:backward" in done.stderr
