"""Few-row linear layer (attnkit.ops.linear: csrc/cpu/linear.cpp) vs
torch.nn.functional.linear on the same inputs, CPU float32, at GPT-2 small's
shapes: the products of one decoding step (1 row per sequence). The weights
cycle through copies totalling more than the last-level cache, so that W comes
from memory as it does in a decode step of a whole model. CPU only (on a GPU the
op is F.linear)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from timing import max_error, median_ms, within_budget

import attnkit

TITLE = "Few-row linear (decode-step GEMV): attnkit.ops.linear vs F.linear"
QUICK_CASES = [(1, 768, 2304), (1, 3072, 768), (1, 768, 50257), (4, 768, 3072), (16, 768, 3072)]  # (rows, in, out)
FULL_CASES = QUICK_CASES + [(1, 768, 768), (1, 768, 3072), (2, 768, 3072), (8, 768, 3072), (4, 768, 50257)]
POOL_BYTES = 256 << 20  # weight copies cycled per call: past any L3 here


def skip_reason(device: torch.device, dtype: torch.dtype):
    if device.type != "cpu" or dtype != torch.float32:
        return "skipped: the kernel serves CPU float32; elsewhere attnkit.ops.linear is F.linear"
    return None


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    if device.type != "cpu" or dtype != torch.float32:
        return []  # the kernel is CPU float32; elsewhere attnkit.ops.linear is F.linear
    rows = []
    cases = QUICK_CASES if quick else FULL_CASES
    for m, k, n in within_budget(cases, rows, lambda case: "rows={} in={} out={}".format(*case)):
        copies = max(2, POOL_BYTES // (4 * k * n))
        weights = [torch.randn(n, k, device=device) for _ in range(copies)]
        bias, x = torch.randn(n, device=device), torch.randn(m, k, device=device)
        ours_w, theirs_w = itertools.cycle(weights), itertools.cycle(weights)
        with torch.no_grad():
            error = max_error(attnkit.ops.linear(x, weights[0], bias), F.linear(x, weights[0], bias))
            backend = attnkit.last_dispatch("linear").backend
            t_ours = median_ms(lambda: attnkit.ops.linear(x, next(ours_w), bias), device, warmup=copies, repeats=30)
            t_theirs = median_ms(lambda: F.linear(x, next(theirs_w), bias), device, warmup=copies, repeats=30)
        gbs = 4 * k * n / 1e6
        rows.append(dict(case="forward", shape=f"rows={m} in={k} out={n}", backend=backend, ours_ms=t_ours,
                         baseline_ms=t_theirs, max_err=error,
                         note=f"W read at {gbs / t_ours:.0f} vs {gbs / t_theirs:.0f} GB/s"))
    return rows
