"""Reference attention in plain PyTorch: materializes the (Nq, Nk) scores, so it
is slow and O(N^2) in memory, but short enough to check by eye. Every backend
of attnkit.ops.flash_attention is tested against it.

Conventions (the kernels follow them; see triton_kernels/flash_attention.py):
- q (B, H, Nq, D), k (B, H_kv, Nk, D), v (B, H_kv, Nk, Dv); H divisible by H_kv.
- Query i sits at key position i + diag, diag = Nk - Nq when `bottom_right`
  (FlashAttention's causal alignment) else 0 (SDPA's). Key j is visible iff
  -left <= j - (i + diag) <= right for window (left, right), -1 = unbounded.
- attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, Nq, Nk).
- key_padding_mask: bool (B, Nk), True = padding (ignored), as nn.MultiheadAttention.
- softcap > 0: scores become softcap * tanh(scores / softcap) before masks.
- alibi_slopes (B, H) fp32: -slope * |j - (i + diag)| is added after soft-capping.
- RoPE, when fused: q row i is rotated at position i + diag + offset, k row j at j + offset
  (`rotate`, FlashAttention's apply_rotary_emb convention).
- A row with no visible key gives output 0 and log-sum-exp -inf.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

# Philox 4x32-10 constants, as Triton's tl.randint.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """High and low 32 bits of a * b for a constant a and uint32 values in an int64 tensor."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi
    rest = (mid << 16) + low  # < 2^50: no int64 overflow
    return a_hi * b_hi + (rest >> 32), rest & _MASK32


def philox_randint(seed: Tensor, c0: Tensor, c1: Tensor) -> Tensor:
    """Triton's tl.philox(seed, c0, c1, 0, 0)'s first word for int32 counters, as uint32 values in int64."""
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64) & _MASK32, c1.to(torch.int64) & _MASK32)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed.to(torch.int64) & _MASK32
    k1 = (seed.to(torch.int64) >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def dropout_keep_mask(seed: int, batch: int, heads: int, max_q: int, max_k: int, dropout_p: float, device=None) -> Tensor:
    """The keep mask (B, H, max_q, max_k) every backend draws for `seed`:
    keep (i, j) of head stream s = seed + b * H + h iff
    philox(s, c0 = j, c1 = i) >> 8 >= round(dropout_p * 2^24): the key and query index in
    two counter words (one i * max_k + j word repeated rows 2^32 / max_k apart)."""
    threshold = int(round(dropout_p * (1 << 24)))
    rows = torch.arange(max_q, device=device, dtype=torch.int64)[:, None]
    cols = torch.arange(max_k, device=device, dtype=torch.int64)[None, :]
    streams = seed + torch.arange(batch * heads, device=device, dtype=torch.int64).view(batch, heads, 1, 1)
    bits = philox_randint(streams, cols.expand(batch, heads, max_q, max_k), rows)
    return (bits >> 8) >= threshold


def rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool = False,
           inverse: bool = False) -> Tensor:
    """RoPE on the last dim of x (B, H, N, D) at `positions` (N,) or (B, N): cos/sin are
    (max_position, rotary_dim / 2); the first rotary_dim dims rotate, as pairs of
    halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), or of even/odd
    neighbours when interleaved; `inverse` rotates back (the transpose)."""
    rotary_dim = 2 * cos.shape[1]
    c = cos[positions].to(x.dtype)
    s = sin[positions].to(x.dtype) * (-1 if inverse else 1)
    if positions.dim() == 2:  # per-batch positions broadcast over heads
        c, s = c[:, None], s[:, None]
    head, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = head.chunk(2, dim=-1)
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def visible_keys(
    batch: int, heads: int, n_q: int, n_k: int, window: Tuple[int, int], bottom_right: bool,
    attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], device,
) -> Tensor:
    """Boolean (B, H, Nq, Nk): which key each query may attend to."""
    diag = n_k - n_q if bottom_right else 0
    rel = torch.arange(n_k, device=device)[None, :] - (torch.arange(n_q, device=device)[:, None] + diag)
    left, right = window
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= rel >= -left
    if right >= 0:
        visible &= rel <= right
    visible = visible.expand(batch, heads, n_q, n_k)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    return visible


def alibi_bias(slopes: Tensor, n_q: int, n_k: int, bottom_right: bool) -> Tensor:
    """(B, H, Nq, Nk) ALiBi bias -slope * |j - (i + diag)|."""
    diag = n_k - n_q if bottom_right else 0
    distance = torch.arange(n_k, device=slopes.device)[None, :] - (torch.arange(n_q, device=slopes.device)[:, None] + diag)
    return -slopes[:, :, None, None] * distance.abs()


def _scores(q, k, scale, softcap, attn_mask, alibi_slopes=None, bottom_right=True):
    """Scaled, soft-capped scores (+ ALiBi, + additive mask) in the compute dtype,
    and the tanh for the soft-cap derivative."""
    s = (q @ k.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(s.dtype), q.shape[2], k.shape[2], bottom_right)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(s.dtype)
    return s, t


def _row_max(s: Tensor) -> Tensor:
    """Max over the keys, -inf for zero keys (amax refuses an empty dim; a varlen
    sequence may have queries and no keys): such rows are empty rows."""
    if s.shape[-1] == 0:
        return s.new_full(s.shape[:-1] + (1,), float("-inf"))
    return s.amax(-1, keepdim=True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, window: Tuple[int, int] = (-1, -1), bottom_right: bool = True,
    attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None, softcap: float = 0.0,
    scale: Optional[float] = None, dropout_p: float = 0.0, dropout_keep: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(out, lse) of dense attention; differentiable with autograd (in q, k, v).
    `dropout_keep` (B, H, Nq, Nk) bool says which probabilities survive dropout."""
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    work = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(work), _expand_kv(k, heads).to(work), _expand_kv(v, heads).to(work)
    s, _ = _scores(qc, kc, scale, softcap, attn_mask, alibi_slopes, bottom_right)
    visible = visible_keys(batch, heads, n_q, n_k, window, bottom_right, attn_mask, key_padding_mask, q.device)
    s = s.masked_fill(~visible, float("-inf"))
    # Shift by the row max (a constant for autograd: softmax is shift-invariant);
    # rows with nothing visible keep e = 0, so p = 0 and no NaN reaches a gradient.
    row_max = _row_max(s).detach()
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / denom.masked_fill(denom == 0, 1.0)
    lse = (row_max + torch.log(denom)).squeeze(-1).detach()
    if dropout_keep is not None and dropout_p > 0:
        p = p * dropout_keep / (1.0 - dropout_p)
    out = p @ vc
    return out.to(q.dtype), lse


def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, window: Tuple[int, int] = (-1, -1),
    bottom_right: bool = True, attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
    softcap: float = 0.0, scale: Optional[float] = None, dropout_p: float = 0.0, dropout_keep: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None, mask_grad: bool = False,
) -> Tuple[Tensor, ...]:
    """(dq, dk, dv) by the formulas the kernels use (recomputing the probabilities); with
    mask_grad also the additive mask's gradient P * (dP - delta), (B, H, Nq, Nk) in the
    compute dtype (float32, or float64 for float64 inputs)."""
    batch, heads, n_q, dim = q.shape
    n_k, heads_kv = k.shape[2], k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    work = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(work), _expand_kv(k, heads).to(work), _expand_kv(v, heads).to(work)
    do, oc = grad_out.to(work), out.to(work)
    s, t = _scores(qc, kc, scale, softcap, attn_mask, alibi_slopes, bottom_right)
    visible = visible_keys(batch, heads, n_q, n_k, window, bottom_right, attn_mask, key_padding_mask, q.device)
    s = s.masked_fill(~visible, float("-inf"))
    row_max = _row_max(s)
    row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
    e = torch.exp(s - row_max)
    denom = e.sum(-1, keepdim=True)
    p = e / denom.masked_fill(denom == 0, 1.0)
    dp = do @ vc.transpose(-1, -2)
    p_out = p
    if dropout_keep is not None and dropout_p > 0:
        p_out = p * dropout_keep / (1.0 - dropout_p)
        dp = dp * dropout_keep / (1.0 - dropout_p)
    dv = p_out.transpose(-1, -2) @ do
    delta = (do * oc).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    d_mask = ds  # the mask is added after soft-capping: its gradient stops before the cap's derivative
    if t is not None:
        ds = ds * (1 - t * t)
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-1, -2) @ qc) * scale
    group = heads // heads_kv
    dk = dk.view(batch, heads_kv, group, n_k, dim).sum(2)
    dv = dv.view(batch, heads_kv, group, n_k, v.shape[-1]).sum(2)
    grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    return grads + (d_mask,) if mask_grad else grads


def split_varlen(packed: Tensor, cu_seqlens: Tensor):
    """The sequences of a packed (total, H, D) tensor, each as (1, H, n, D)."""
    bounds = cu_seqlens.tolist()
    return [packed[a:b].transpose(0, 1).unsqueeze(0) for a, b in zip(bounds[:-1], bounds[1:])]


def join_varlen(parts) -> Tensor:
    """Inverse of split_varlen for outputs (1, H, n, D) -> (total, H, D)."""
    return torch.cat([p.squeeze(0).transpose(0, 1) for p in parts], dim=0)


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: Optional[float] = None,
           softcap: float = 0.0, window_left: int = -1, alibi_slopes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Attention of q (B, H, Nq, D) against the first cache_seqlens[b] cache positions, the new
    queries at the last Nq positions (bottom-right causal); a length outside [0, N_max] counts
    as the nearest bound, as in the kernels. Returns (out, lse)."""
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        length = min(max(length, 0), k_cache.shape[2])
        q_b = q[b : b + 1]
        if length == 0:  # nothing cached: every row is empty
            outs.append(q_b.new_zeros(q_b.shape[:-1] + (v_cache.shape[-1],)))
            lses.append(torch.full(q_b.shape[:-1], float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device))
            continue
        out, lse = attention(q_b, k_cache[b : b + 1, :, :length], v_cache[b : b + 1, :, :length],
                             window=(window_left, 0), bottom_right=True, softcap=softcap, scale=scale,
                             alibi_slopes=None if alibi_slopes is None else alibi_slopes[b : b + 1])
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
