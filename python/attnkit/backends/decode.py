"""Implementations of attention_decode (inference only):
forward(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes) -> (out, lse)."""
from __future__ import annotations

from typing import Any, List, Mapping

import torch

from .. import _extensions
from .._dispatch import Implementation, Op
from . import triton_dot_refuses
from ..reference import attention as ref

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
        refused = triton_dot_refuses(call["dtype"])
        return reasons + ([refused] if refused else [])

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        from ..triton_kernels.decode import decode

        return decode(q, k_cache, v_cache, cache_seqlens, scale=scale, softcap=softcap, window_left=window_left,
                      alibi_slopes=alibi_slopes)


# What csrc/cpu/attention_decode.cpp takes (flash_attention's few-query route asks it too).
CPP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Cpp(Implementation):
    """csrc/cpu/attention_decode.cpp: one task per (sequence, KV head) reads its valid cache
    rows once for all the query rows of its GQA group (exact two-pass softmax)."""

    backend = "cpp"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        if call["dtype"] not in CPP_DTYPES:
            return [f"dtype {call['dtype']}: the cpp decode kernel takes float32/float16/bfloat16"]
        return []

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        ext, _ = _extensions.load("_C")
        return tuple(ext.attention_decode_forward(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left,
                                                  alibi_slopes, None, None))


class Reference(Implementation):
    backend = "reference"

    def forward(self, q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
        return ref.decode(q, k_cache, v_cache, cache_seqlens, scale=scale, softcap=softcap, window_left=window_left,
                          alibi_slopes=alibi_slopes)


DECODE = Op("attention_decode", [Triton(), Cpp(), Reference()])
