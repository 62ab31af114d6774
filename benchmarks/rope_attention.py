"""Attention with RoPE, causal, (B, H, N, D) q/k/v and Llama-style tables
(rotary_dim = D, halves rotated): attnkit's fused form (flash_attention with
rotary_cos/rotary_sin: the cpp backend on CPU rotates q and k inside the
attention kernels, where they are already copied) against two unfused forms on
the same inputs (benchmarks/rope_paired.py times fused against the first
alternately, on CPU time):

- "apply_rotary + flash_attention": attnkit.ops.apply_rotary on q and k (its own
  op, autograd node and rotated copies kept for the backward), then the same
  flash attention without RoPE;
- "rotate_half + SDPA": what Hugging Face models run, q * cos + rotate_half(q) * sin
  in PyTorch, then F.scaled_dot_product_attention(is_causal=True).

The fused timing is one measurement, reported against each baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timing import gradient_error, max_error, median_group_ms, within_budget

import attnkit
from attnkit.ops import apply_rotary, flash_attention

TITLE = "Attention with RoPE: fused (flash_attention rotary_cos/sin) vs apply_rotary + flash_attention and vs rotate_half + SDPA"
HEADS, DIM = 8, 64
QUICK_SHAPES = [(2, 512), (2, 1024)]  # (batch, N)
FULL_SHAPES = [(2, 512), (4, 512), (2, 1024), (4, 1024), (2, 2048), (4, 2048)]


def tables(n, device, dtype=torch.float32):
    angles = torch.arange(n, device=device, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, DIM, 2, device=device, dtype=torch.float64) / DIM)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def torch_rope_sdpa(q, k, v, cos, sin):
    cos, sin = (torch.cat((t, t), dim=-1).to(q.dtype) for t in (cos, sin))  # (N, D), broadcast over (B, H)
    q, k = (x * cos + rotate_half(x) * sin for x in (q, k))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _fwd_bwd(fn):
    def step():
        fn().sum().backward()

    return step


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    for batch, n in within_budget(shapes, rows, lambda case: f"B={case[0]} N={case[1]}"):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(batch, HEADS, n, DIM, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        cos, sin = tables(n, device)
        fused = lambda: flash_attention(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin)  # noqa: E731
        unfused = lambda: flash_attention(apply_rotary(q, cos, sin, layout="bhnd"),  # noqa: E731
                                          apply_rotary(k, cos, sin, layout="bhnd"), v, causal=True)
        hf = lambda: torch_rope_sdpa(q, k, v, cos, sin)  # noqa: E731
        baselines = {"apply_rotary + flash_attention": unfused, "rotate_half + SDPA": hf}
        with torch.no_grad():
            expected = fused()
        backend = attnkit.last_dispatch("flash_attention").backend
        shape = f"B={batch} H={HEADS} N={n} D={DIM}"
        repeats, warmup = (5, 1) if n >= 1024 else (9, 2)
        for case, grad in (("forward", False), ("fwd+bwd", True)):
            with torch.set_grad_enabled(grad):
                fns = [_fwd_bwd(fn) if grad else fn for fn in (fused, *baselines.values())]
                t_fused, *t_bases = median_group_ms(fns, device, warmup, repeats)
                for (name, baseline), t_base in zip(baselines.items(), t_bases):
                    with torch.no_grad():
                        error = max_error(expected, baseline())
                    if grad:  # the fwd+bwd rows' max err covers dq, dk, dv too
                        error = gradient_error(_fwd_bwd(fused), _fwd_bwd(baseline), (q, k, v), forward_error=error)
                    rows.append(dict(case=f"{case} vs {name}", shape=shape, backend=backend, ours_ms=t_fused,
                                     baseline_ms=t_base, max_err=error))
    return rows
