"""`attnkit.scaled_dot_product_attention`: a drop-in for
torch.nn.functional.scaled_dot_product_attention running attnkit's flash
attention (same arguments, same results), with two documented differences:
a query row whose keys are all masked gives 0 (SDPA gives NaN), and dropout
draws its mask from attnkit's Philox stream, not torch's.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .ops.attention import flash_attention

OP = "attnkit.scaled_dot_product_attention"


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
) -> Tensor:
    """query (N, H, L, E) or (N, L, E); key (N, H_kv, S, E); value (N, H_kv, S, Ev).
    is_causal is top-left aligned, as in SDPA; for bottom-right use attnkit.ops.flash_attention."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{OP}: {name} must be 3-D (N, L, E) or 4-D (N, H, L, E), got shape {tuple(t.shape)}")
    if not query.dim() == key.dim() == value.dim():
        raise ValueError(f"{OP}: query, key and value must have the same rank, got {query.dim()}, {key.dim()}, {value.dim()}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{OP}: pass either attn_mask or is_causal=True, not both (as SDPA)")
    unbatched_heads = query.dim() == 3
    if unbatched_heads:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (N, L, S) -> (N, 1, L, S)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(
            f"{OP}: query has {query.shape[1]} heads but key has {key.shape[1]}; pass enable_gqa=True for GQA/MQA"
        )
    out = flash_attention(query, key, value, causal=is_causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p,
                          causal_alignment="top_left")
    return out.squeeze(1) if unbatched_heads else out
