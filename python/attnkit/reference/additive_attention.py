"""Reference additive (Bahdanau) attention in plain PyTorch, the ground truth of
attnkit.ops.additive_attention's backends. It builds the (B, Tq, Tk, A) tensor
of tanh inputs that the fused kernels avoid.

- query (B, Tq, Dq), keys (B, Tk, Dk), values (B, Tk, Dv)
- W_q (A, Dq), W_k (A, Dk), v_a (A,): score[b, i, j] = v_a . tanh(W_q q_i + W_k k_j)
- mask (B, Tk) bool, True = a real key (a source padding mask), or None
- weights = softmax_j(score) over the unmasked keys; a row with no unmasked key
  gets weights 0 and context 0 (never NaN), as the attention ops do
- context[b, i] = sum_j weights[b, i, j] values[b, j]
Arithmetic in the input dtype, softmax in fp32 for half inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def scores(query: Tensor, keys: Tensor, W_q: Tensor, W_k: Tensor, v_a: Tensor) -> Tensor:
    projected = (query @ W_q.t())[:, :, None, :] + (keys @ W_k.t())[:, None, :, :]  # (B, Tq, Tk, A)
    return torch.tanh(projected) @ v_a


def additive_attention(query: Tensor, keys: Tensor, values: Tensor, W_q: Tensor, W_k: Tensor, v_a: Tensor,
                       mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Returns (context (B, Tq, Dv), weights (B, Tq, Tk))."""
    context, weights, _ = attend(query @ W_q.t(), keys @ W_k.t(), values, v_a, mask)
    return context, weights


def attend(projected_query: Tensor, projected_keys: Tensor, values: Tensor, v_a: Tensor,
           mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """additive_attention from the projections W_q q (B, Tq, A) and W_k k (B, Tk, A),
    which the op computes once with GEMMs before its kernels. Returns (context,
    weights, log-sum-exp of the scores (B, Tq), -inf on a fully masked row)."""
    projected = projected_query[:, :, None, :] + projected_keys[:, None, :, :]  # (B, Tq, Tk, A)
    s = torch.tanh(projected) @ v_a
    stat_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s.to(stat_dtype)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    # A fully masked row: every score -inf; softmax would give NaN, we give 0.
    row_max = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    e = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
    total = e.sum(dim=-1, keepdim=True)
    weights = e / total.clamp_min(torch.finfo(stat_dtype).tiny)
    weights = weights.masked_fill(empty, 0.0).to(values.dtype)
    lse = (row_max + torch.log(total)).squeeze(-1)  # -inf + log(0) stays -inf on an empty row
    return weights @ values, weights, lse
