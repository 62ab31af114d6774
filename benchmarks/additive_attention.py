"""Additive (Bahdanau) attention: attnkit.ops.additive_attention (automatic
backend: cpp on CPU, Triton on GPUs) vs the plain PyTorch version
(attnkit.reference.additive_attention, which builds the (B, Tq, Tk, A) tensor
of tanh inputs), forward and forward+backward, B=32, A=256, Tq = Tk. The fwd+bwd rows' max err covers
the gradients of every input too.

The plain version needs B * Tq * Tk * A * 4 bytes per (B, Tq, Tk, A) fp32
tensor (2 GiB at Tq = Tk = 256, 32 GiB at 1024) and several of them for a
backward; where that exceeds BASELINE_BUDGET_GB it is not run (NaN baseline).

Peak memory: on GPUs the runner records the allocator's peak per timed call; on
CPU (`*_peak_mb` rows) it is the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) over one forward+backward, in a
fresh subprocess per measurement.
"""
from __future__ import annotations

import json
import sys

import torch
from timing import (gradient_error, max_error, median_ms, median_pair_ms, within_budget, rss_rise_mb,
                    rss_rise_mb_in_subprocess)

import attnkit
from attnkit.ops import additive_attention
from attnkit.reference import additive_attention as plain

TITLE = "Additive (Bahdanau) attention: attnkit.ops.additive_attention vs plain PyTorch (B, Tq, Tk, A) tanh"
HIDDEN, DIM = 256, 256  # A, and the query/key/value feature size
# (B, T): quick is a subset that runs in well under a minute on a 2-core CPU.
QUICK_SHAPES = {"cpu": [(4, 256)], "cuda": [(32, 256), (32, 512)]}
FULL_SHAPES = [(32, 256), (32, 512), (32, 1024)]
QUICK_MEMORY, FULL_MEMORY = [(4, 256)], [(32, 256), (32, 512), (32, 1024)]
BASELINE_BUDGET_GB = {"cpu": 8.0, "cuda": 60.0}  # for ~4 (B, Tq, Tk, A) fp32 tensors of the plain fwd+bwd


def _inputs(batch, n, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    tensors = [rand(batch, n, DIM), rand(batch, n, DIM), rand(batch, n, DIM), rand(HIDDEN, DIM) / DIM ** 0.5,
               rand(HIDDEN, DIM) / DIM ** 0.5, rand(HIDDEN) / HIDDEN ** 0.5]
    lengths = torch.randint(n // 2, n + 1, (batch,), generator=gen)
    mask = torch.arange(n)[None, :] < lengths[:, None]  # a padded source batch
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors], mask.to(device)


def _baseline_fits(batch, n, device) -> bool:
    tensor_gb = batch * n * n * HIDDEN * 4 / 2**30
    return 4 * tensor_gb <= BASELINE_BUDGET_GB.get(device.type, 8.0)


def _fwd_bwd(fn):
    def step():
        context, weights = fn()
        (context.sum() + weights.sum()).backward()

    return step


def _ours(tensors, mask, backend=None):
    def call():
        if backend is None:
            return additive_attention(*tensors, mask, return_weights=True)
        with attnkit.use_backend(backend, op="additive_attention"):
            return additive_attention(*tensors, mask, return_weights=True)

    return call


def peak_mb(side: str, batch: int, n: int, dtype: torch.dtype) -> float:
    """Peak resident-memory rise (MiB) of one forward+backward, measured in a subprocess."""
    return rss_rise_mb_in_subprocess(__file__, dict(side=side, batch=batch, n=n, dtype=str(dtype).split(".")[-1]))


def _measure_peak(spec: dict) -> float:
    dtype = getattr(torch, spec["dtype"])
    warm, warm_mask = _inputs(2, 16, dtype, "cpu")  # a first small call loads libraries and kernels
    _fwd_bwd(_ours(warm, warm_mask))()
    _fwd_bwd(lambda: plain(*warm, warm_mask))()
    tensors, mask = _inputs(spec["batch"], spec["n"], dtype, "cpu")
    step = _fwd_bwd(_ours(tensors, mask) if spec["side"] == "ours" else lambda: plain(*tensors, mask))
    return rss_rise_mb(step)


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    shapes = QUICK_SHAPES.get(device.type, QUICK_SHAPES["cpu"]) if quick else FULL_SHAPES
    for batch, n in within_budget(shapes, rows, lambda case: f"B={case[0]} Tq=Tk={case[1]}"):
        tensors, mask = _inputs(batch, n, dtype, device)
        ours = _ours(tensors, mask)
        theirs = lambda: plain(*tensors, mask)  # noqa: E731
        fits = _baseline_fits(batch, n, device)
        with torch.no_grad():
            result = ours()
            backend = attnkit.last_dispatch("additive_attention").backend
            error = max_error(result, theirs()) if fits else float("nan")
        shape = f"B={batch} Tq=Tk={n} A={HIDDEN} D={DIM}"
        repeats, warmup = (3, 1) if device.type == "cpu" else (10, 2)
        for case, wrap, grad in (("forward", lambda f: f, False), ("fwd+bwd", _fwd_bwd, True)):
            with torch.set_grad_enabled(grad):
                if fits:
                    if grad:  # the fwd+bwd row's max err covers every input's gradient
                        error = gradient_error(wrap(ours), wrap(theirs), tensors, forward_error=error)
                    t_ours, t_theirs = median_pair_ms(wrap(ours), wrap(theirs), device, warmup, repeats)
                else:
                    t_ours, t_theirs = median_ms(wrap(ours), device, warmup, repeats), float("nan")
            rows.append(dict(case=case if fits else f"{case} (plain PyTorch would need > "
                             f"{BASELINE_BUDGET_GB.get(device.type, 8.0):.0f} GB: not run)",
                             shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    if device.type == "cpu":
        for batch, n in QUICK_MEMORY if quick else FULL_MEMORY:
            fits = _baseline_fits(batch, n, device)
            rows.append(dict(case="fwd+bwd peak memory vs plain PyTorch", shape=f"B={batch} Tq=Tk={n} A={HIDDEN} D={DIM}",
                             backend="cpp", ours_ms=float("nan"), baseline_ms=float("nan"), max_err=float("nan"),
                             ours_peak_mb=peak_mb("ours", batch, n, dtype),
                             baseline_peak_mb=peak_mb("plain", batch, n, dtype) if fits else float("nan")))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        print(_measure_peak(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: python benchmarks/run.py --only additive_attention  (this module is a benchmark family)")
