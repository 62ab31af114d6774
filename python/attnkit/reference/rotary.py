"""Reference rotary position embedding (RoPE) in plain PyTorch, the ground truth
of attnkit.ops.apply_rotary's backends. Semantics of FlashAttention's
`flash_attn.layers.rotary.apply_rotary_emb`:

- x (B, N, H, D); cos, sin (S, R/2) shared by the batch, or (B, S, R/2) per
  sequence; R = rotary_dim <= D. Only x[..., :R] is rotated, the rest passes through.
- Row n of sequence b sits at position p = n + offset[b]; rows whose position
  falls outside [0, S) are left unrotated (FlashAttention's kernel does the same).
- Non-interleaved (GPT-NeoX/Llama) pairs dim i with i + R/2; interleaved (GPT-J)
  pairs 2i with 2i + 1. A pair (x0, x1) with angle index i becomes
  (x0 cos - x1 sin, x0 sin + x1 cos); `conjugate` rotates by -angle (the backward).
- Arithmetic in fp32 (fp64 for fp64 x), the result rounded once to x's dtype.
- Varlen: x packed (total, H, D) with cu_seqlens (B + 1,): `varlen` applies a
  dense function to each sequence as a batch of one.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def _tables_at(table: Tensor, positions: Tensor) -> Tensor:
    """table (S, R/2) or (B, S, R/2) read at positions (B, N): (B, N, R/2)."""
    if table.dim() == 2:
        return table[positions]
    index = positions[..., None].expand(-1, -1, table.shape[-1])
    return torch.gather(table, 1, index)


def rotary(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor] = None, offset: int = 0,
           interleaved: bool = False, conjugate: bool = False) -> Tensor:
    """x rotated; `offsets` (B,) int when given, else every sequence starts at `offset`."""
    batch, seqlen, _, _ = x.shape
    seqlen_ro, half = cos.shape[-2], cos.shape[-1]
    rotary_dim = 2 * half
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if offsets is None and cos.dim() == 2 and 0 <= offset and offset + seqlen <= seqlen_ro:  # one slice for all
        c = cos[offset:offset + seqlen, None, :].to(compute)  # (N, 1, R/2)
        s = sin[offset:offset + seqlen, None, :].to(compute)
    else:
        shift = offsets.to(torch.int64)[:, None] if offsets is not None else torch.full((batch, 1), offset, device=x.device)
        positions = torch.arange(seqlen, device=x.device)[None, :] + shift.to(x.device)  # (B, N)
        inside = ((positions >= 0) & (positions < seqlen_ro))[..., None]
        positions = positions.clamp(0, seqlen_ro - 1)
        c = torch.where(inside, _tables_at(cos, positions).to(compute), 1.0)[:, :, None, :]  # (B, N, 1, R/2)
        s = torch.where(inside, _tables_at(sin, positions).to(compute), 0.0)[:, :, None, :]
    if conjugate:
        s = -s
    rot = x[..., :rotary_dim].to(compute)
    x0, x1 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half], rot[..., half:])
    o0, o1 = x0 * c - x1 * s, x0 * s + x1 * c
    rotated = torch.stack((o0, o1), dim=-1).flatten(-2) if interleaved else torch.cat((o0, o1), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def table_grads(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor] = None, offset: int = 0,
                interleaved: bool = False, conjugate: bool = False):
    """Gradients of rotary(x, cos, sin, ...) with respect to cos and sin, for upstream `grad`:
    summed over heads per row, then over the rows that read each table entry."""
    batch, seqlen = x.shape[:2]
    seqlen_ro, half = cos.shape[-2], cos.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32

    def pairs(t):
        t = t[..., :2 * half].to(compute)
        return (t[..., 0::2], t[..., 1::2]) if interleaved else (t[..., :half], t[..., half:])

    (g0, g1), (x0, x1) = pairs(grad), pairs(x)
    d_cos = (g0 * x0 + g1 * x1).sum(dim=2)  # out0 = x0 c - x1 s, out1 = x0 s + x1 c; (B, N, R/2)
    d_sin = (g1 * x0 - g0 * x1).sum(dim=2)
    if conjugate:
        d_sin = -d_sin
    shift = offsets.to(torch.int64)[:, None] if offsets is not None else torch.full((batch, 1), offset, device=x.device)
    positions = torch.arange(seqlen, device=x.device)[None, :] + shift.to(x.device)
    inside = ((positions >= 0) & (positions < seqlen_ro))[..., None]
    positions = positions.clamp(0, seqlen_ro - 1)
    grads = []
    for d, table in ((d_cos, cos), (d_sin, sin)):
        d = torch.where(inside, d, 0.0)
        if table.dim() == 2:
            total = d.new_zeros(seqlen_ro, half).index_add_(0, positions.flatten(), d.flatten(0, 1))
        else:
            total = d.new_zeros(batch, seqlen_ro, half).scatter_add_(1, positions[..., None].expand(-1, -1, half), d)
        grads.append(total.to(table.dtype))
    return tuple(grads)


def varlen(fn: Callable, cu_seqlens: Tensor, x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor],
           offset: int, *rest, others=()):
    """fn(x_b, cos_b, sin_b, offsets_b, offset, *rest) per sequence b of packed x (total, H, D),
    with `others` (packed like x) split alongside and passed first; x-shaped results are joined
    back into (total, H, D), table-shaped ones summed (shared tables) or stacked (per sequence)."""
    bounds = cu_seqlens.tolist()
    results = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        tables = (cos, sin) if cos.dim() == 2 else (cos[b:b + 1], sin[b:b + 1])
        seq_offsets = None if offsets is None else offsets[b:b + 1]
        split = [t[start:end][None] for t in (*others, x)]
        results.append(fn(*split, *tables, seq_offsets, offset, *rest))
    if isinstance(results[0], Tensor):
        return torch.cat([r[0] for r in results])
    if cos.dim() == 2:
        return tuple(torch.stack(parts).sum(0) for parts in zip(*results))
    return tuple(torch.cat(parts) for parts in zip(*results))
