"""Implementations of attention_decode (inference only):
forward(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes) -> (out, lse)."""
from __future__ import annotations

from typing import Any, List, Mapping

import torch

from .._dispatch import Implementation, Op
from ..reference import attention as ref
from .attention import ATTENTION, AttentionCall

MAX_HEAD_DIM = 256


class Triton(Implementation):
    backend = "triton"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        from ..triton_kernels.decode import MAX_ROWS

        reasons = []
        if call.get("rows", 0) > MAX_ROWS:
            reasons.append(f"{call['rows']} query rows per KV head (GQA group x new tokens) > {MAX_ROWS}: use flash_attention")
        if max(call.get("head_dim", 0), call.get("head_dim_v", 0)) > MAX_HEAD_DIM:
            reasons.append(f"head dim > {MAX_HEAD_DIM}")
        return reasons

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        from ..triton_kernels.decode import decode

        return decode(q, k_cache, v_cache, cache_seqlens, scale=scale, softcap=softcap, window_left=window_left,
                      alibi_slopes=alibi_slopes)


class Cpp(Implementation):
    """The C++ flash attention over the cache cut at the longest length, with a
    (B, 1, Nq, N) visibility mask built from the lengths: the mask is tiny for a
    few new tokens, and it avoids the reference's per-sequence Python loop."""

    backend = "cpp"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        if call.get("alibi"):
            return ["ALiBi distances depend on each cache length, which the cpp path does not pass"]
        return []

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        batch, heads, n_q, _ = q.shape
        n = max(int(cache_seqlens.max()), 1)
        positions = cache_seqlens.long()[:, None] - n_q + torch.arange(n_q, device=q.device)  # (B, Nq)
        keys = torch.arange(n, device=q.device)[None, None, :]
        visible = keys <= positions[:, :, None]
        if window_left >= 0:
            visible &= keys >= positions[:, :, None] - window_left
        call = AttentionCall(q, k_cache[:, :, :n], v_cache[:, :, :n], None, None, n_q, n,
                             visible[:, None].expand(batch, heads, n_q, n), None, (-1, -1), True, softcap, scale, 0.0, 0)
        return ATTENTION.implementations["cpp"].forward(call)


class Reference(Implementation):
    backend = "reference"

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        return ref.decode(q, k_cache, v_cache, cache_seqlens, scale=scale, softcap=softcap, window_left=window_left,
                          alibi_slopes=alibi_slopes)


DECODE = Op("attention_decode", [Triton(), Cpp(), Reference()])
