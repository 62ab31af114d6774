"""Rotary embedding (attnkit.ops.apply_rotary, automatic backend) vs the plain
PyTorch rotation that Hugging Face models run (x * cos + rotate_half(x) * sin),
forward, in place, and forward+backward, on the same inputs. The baseline's cos/sin rows
for the batch's positions are gathered once, outside the timing, as a Hugging Face model
does once per forward for all its layers; attnkit gathers its rows in the kernel. On CPU
the automatic backend is cpp (csrc/cpu/rotary.cpp); RoPE fused into attention is
benchmarks/rope_attention.py. The fwd+bwd rows' max err covers x's gradient too."""
from __future__ import annotations

import torch
from timing import gradient_error, max_error, median_pair_ms, within_budget

import attnkit

TITLE = "Rotary embedding: attnkit.ops.apply_rotary vs PyTorch x*cos + rotate_half(x)*sin"
# (batch, seqlen, heads, head dim, per-sequence offsets): prefill and KV-cache decoding, (B, N, H, D) layout.
QUICK_SHAPES = [(1, 512, 16, 64, False), (4, 1024, 32, 128, False), (32, 1, 32, 128, True)]
FULL_SHAPES = QUICK_SHAPES + [(1, 8192, 32, 128, False), (128, 1, 32, 128, True)]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def position_tables(x, cos, sin, offsets):
    """The (B, N, 1, D) cos and sin rows of x's positions, in x's dtype: Hugging Face's
    rotary embedding output, computed once per forward."""
    positions = offsets[:, None].long() + torch.arange(x.shape[1], device=x.device)[None, :]
    cos = torch.cat((cos, cos), dim=-1)[positions][:, :, None].to(x.dtype)
    sin = torch.cat((sin, sin), dim=-1)[positions][:, :, None].to(x.dtype)
    return cos, sin


def torch_rotary(x, cos, sin):
    """apply_rotary_pos_emb on one tensor, with position_tables' rows."""
    return x * cos + rotate_half(x) * sin


def inputs(batch, seqlen, heads, dim, per_sequence, device, dtype):
    x = torch.randn(batch, seqlen, heads, dim, device=device, dtype=dtype, requires_grad=True)
    # A model's usual 4096 positions, more where the prompt is longer: every position rotated has a row.
    largest_offset = 4000 if per_sequence else 0
    positions = max(4096, largest_offset + seqlen)
    angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * 10000 ** (
        -torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    offsets = (torch.randint(0, largest_offset, (batch,), device=device, dtype=torch.int32) if per_sequence
               else torch.zeros(batch, device=device, dtype=torch.int32))
    return x, angles.cos(), angles.sin(), offsets


def fwd_bwd(fn):
    def step():
        fn().sum().backward()

    return step


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    describe = lambda case: f"B={case[0]} N={case[1]} H={case[2]} D={case[3]}"  # noqa: E731
    for batch, seqlen, heads, dim, per_sequence in within_budget(QUICK_SHAPES if quick else FULL_SHAPES, rows,
                                                                 describe):
        x, cos, sin, offsets = inputs(batch, seqlen, heads, dim, per_sequence, device, dtype)
        shift = offsets if per_sequence else 0  # an int offset: what prefill passes
        cos_rows, sin_rows = position_tables(x, cos, sin, offsets)
        ours = lambda: attnkit.ops.apply_rotary(x, cos, sin, seqlen_offsets=shift)  # noqa: E731
        theirs = lambda: torch_rotary(x, cos_rows, sin_rows)  # noqa: E731
        error = max_error(ours(), theirs())
        backend = attnkit.last_dispatch("rotary").backend
        shape = f"B={batch} N={seqlen} H={heads} D={dim}" + (" offsets" if per_sequence else "")
        with torch.no_grad():
            t_ours, t_theirs = median_pair_ms(ours, theirs, device)
            rows.append(dict(case="forward", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                             max_err=error))
            y = x.detach().clone()
            in_place = lambda: attnkit.ops.apply_rotary(y, cos, sin, seqlen_offsets=shift, inplace=True)  # noqa: E731
            in_place_error = max_error(in_place(), theirs())
            t_ours, t_theirs = median_pair_ms(in_place, theirs, device)  # y turns further each call: same work
            rows.append(dict(case="in place", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                             max_err=in_place_error))
        error = gradient_error(fwd_bwd(ours), fwd_bwd(theirs), [x], forward_error=error)
        t_ours, t_theirs = median_pair_ms(fwd_bwd(ours), fwd_bwd(theirs), device)
        rows.append(dict(case="fwd+bwd", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                         max_err=error))
    return rows
