"""`attnkit.scaled_dot_product_attention`: a drop-in for
torch.nn.functional.scaled_dot_product_attention running attnkit's flash
attention: the same arguments and the same results, shapes and broadcasting
((..., L, E) inputs of any rank from 2 on; leading dims, heads included,
broadcast as SDPA's math path does; GQA along dim -3), with these differences:
dropout draws its mask from attnkit's Philox stream, not torch's; a query row
whose keys are all masked gives 0 (as torch 2.14's SDPA does; earlier torch
versions gave NaN on some paths); head dims above 256 raise NotImplementedError.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _autocast, _dispatch, _validate
from .backends.attention import describe
from .ops.attention import flash_attention

OP = "attnkit.scaled_dot_product_attention"


def _padded(t: Tensor, rank: int) -> Tensor:
    """t viewed with leading 1s up to `rank` dims."""
    return t if t.dim() == rank else t.reshape((1,) * (rank - t.dim()) + tuple(t.shape))


def _heads(hq: int, hk: int, hv: int, enable_gqa: bool) -> Tuple[int, int]:
    """(output heads, key/value heads the kernel sees) as SDPA's math path pairs them:
    with enable_gqa each K/V head serves hq / h_kv query heads; without, dim -3
    broadcasts like any batch dim."""
    if enable_gqa:
        for name, h in (("key", hk), ("value", hv)):
            if h == 0 or hq % h != 0:
                raise ValueError(f"{OP}: query heads ({hq}) must be a multiple of {name} heads ({h}) with enable_gqa")
        return hq, hk if hk == hv else hq
    heads = {int(h) for h in (hq, hk, hv) if h != 1}  # int: torch.jit.trace gives sizes as tensors
    if len(heads) > 1:
        raise ValueError(f"{OP}: query, key and value have {hq}, {hk} and {hv} heads (dim -3), which do not "
                         f"broadcast; pass enable_gqa=True for GQA/MQA")
    out_heads = heads.pop() if heads else 1
    return out_heads, out_heads


def _as_heads(t: Tensor, heads: int) -> Tensor:
    """t (..., h, N, E) with h heads as `heads`: a stride-0 view from 1, else repeated as GQA does."""
    h = t.shape[-3]
    if h == heads:
        return t
    if h == 1:
        return t.expand(*t.shape[:-3], heads, *t.shape[-2:])
    return t.repeat_interleave(heads // h, dim=-3)  # enable_gqa with different key and value heads


def _flat_batch(t: Tensor, batch: Sequence[int]) -> Tensor:
    """t (..., H, N, E) broadcast to `batch` leading dims and those flattened into one."""
    if len(batch) == 1 and t.shape[0] == batch[0]:
        return t  # the usual 4-D call: nothing to broadcast or flatten
    t = t.expand(*batch, *t.shape[-3:])
    return t.reshape(math.prod(batch), *t.shape[-3:]) if len(batch) != 1 else t


_ARGUMENT_NAMES = {"q": "query", "k": "key", "v": "value", "causal": "is_causal"}


def _in_drop_in_terms(error: Exception) -> Exception:
    """flash_attention's argument error in this function's terms (query, not q), so that it names
    what the caller passed; other errors as they are."""
    prefix = "attnkit.ops.flash_attention: "
    text = str(error)
    if not text.startswith(prefix):
        return error
    text = re.sub(r"\b(q|k|v|causal)\b", lambda name: _ARGUMENT_NAMES[name.group(1)], text[len(prefix):])
    return type(error)(f"{OP}: {text}")


def _empty_head_dims(q, k, v, is_causal, attn_mask, scale, dropout_p) -> Tensor:
    """SDPA with E = 0 (every score 0, plus the masks: mean-like rows of v) or Ev = 0 (an empty
    output): the kernels take one zero column in place of an empty dim, sliced off after."""
    def widened(t):
        return torch.cat([t, t.new_zeros(t.shape[:-1] + (1,))], -1) if t.shape[-1] == 0 else t

    out = flash_attention(widened(q), widened(k), widened(v), causal=is_causal, attn_mask=attn_mask,
                          scale=1.0 if q.shape[-1] == 0 else scale, dropout_p=dropout_p, causal_alignment="top_left")
    return out[..., : v.shape[-1]]


def _plain_call(query, key, value, attn_mask, dropout_p, enable_gqa) -> bool:
    """The common call that needs none of the drop-in's own work: 4-D tensors of one batch and
    one head count, no mask, no dropout, no autocast. flash_attention takes it as it is (its
    shapes, broadcasting and casts would be the identity), saving ~10 us of Python a call."""
    if attn_mask is not None or type(dropout_p) not in (float, int) or dropout_p != 0 or type(enable_gqa) is not bool:
        return False
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    (batch, heads, _, dim), (dim_v, heads_v, batch_v) = query.shape, (value.shape[3], value.shape[1], value.shape[0])
    if key.shape[0] != batch or batch_v != batch or key.shape[1] != heads or heads_v != heads or heads == 0:
        return False
    return dim > 0 and dim_v > 0 and _autocast.lower_precision_dtype(query.device.type) is None


@_validate.torch_compatible_errors
def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
    is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
) -> Tensor:
    """query (..., Hq, L, E), key (..., H_kv, S, E), value (..., H_kv, S, Ev); 2-D and up.
    is_causal is top-left aligned, as in SDPA; for bottom-right use attnkit.ops.flash_attention."""
    if _plain_call(query, key, value, attn_mask, dropout_p, enable_gqa):
        try:
            return flash_attention(query, key, value, causal=is_causal, scale=scale, causal_alignment="top_left")
        except (TypeError, ValueError) as error:
            raise _in_drop_in_terms(error) from None
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{OP}: {name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    if not isinstance(enable_gqa, bool):  # is_causal is checked by flash_attention
        raise TypeError(f"{OP}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{OP}: pass either attn_mask or is_causal=True, not both (as SDPA)")
    dtype = _autocast.lower_precision_dtype(query.device.type)
    if dtype is not None:  # as autocast casts SDPA's inputs (on its lower-precision list)
        query, key, value, attn_mask = _autocast.cast_floating(dtype, (query, key, value, attn_mask))
        with _autocast.off(query.device.type, True):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if (isinstance(attn_mask, Tensor) and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype
            and attn_mask.is_floating_point()):  # as SDPA (ops.flash_attention takes any float mask)
        raise TypeError(f"{OP}: a float attn_mask must have query's dtype {query.dtype}, got {attn_mask.dtype} "
                        "(or pass a bool mask)")
    if isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{OP}: dropout_p must be in [0, 1], got {dropout_p}")
    if isinstance(dropout_p, numbers.Real) and not isinstance(dropout_p, bool) and dropout_p == 1.0:
        drop_all, dropout_p = True, 0.0  # every probability dropped: zeros, as SDPA
    else:
        drop_all = False
    out_rank = max(query.dim(), key.dim(), value.dim())
    rank = max(out_rank, 4)
    q, k, v = (_padded(t, rank) for t in (query, key, value))
    heads, kv_heads = _heads(q.shape[-3], k.shape[-3], v.shape[-3], enable_gqa)
    q, k, v = _as_heads(q, heads), _as_heads(k, kv_heads), _as_heads(v, kv_heads)
    try:
        batch = _validate.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"{OP}: the leading (batch) dims of query {tuple(query.shape)}, key {tuple(key.shape)} "
                         f"and value {tuple(value.shape)} do not broadcast") from None
    scores = (*batch, heads, q.shape[-2], k.shape[-2])
    if attn_mask is not None and isinstance(attn_mask, Tensor):
        try:  # the mask is added to the scores, so it broadcasts to their shape (as SDPA's math path)
            if attn_mask.dim() > len(scores) or _validate.broadcast_shapes(attn_mask.shape, scores) != scores:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"{OP}: attn_mask of shape {tuple(attn_mask.shape)} cannot broadcast to the scores' "
                             f"shape {scores[len(scores) - out_rank:]}") from None
        mask = _padded(attn_mask, rank)
        attn_mask = _flat_batch(mask, batch) if any(d != 1 for d in mask.shape[:-3]) else mask.reshape(mask.shape[-4:])
    q, k, v = (_flat_batch(t, batch) for t in (q, k, v))
    if heads == 0:  # nothing to compute: SDPA's empty result, still on the autograd graph
        out = q.new_zeros(q.shape[:-1] + v.shape[-1:]) + (q.sum() + k.sum() + v.sum()) * 0
    elif q.shape[-1] == 0 or v.shape[-1] == 0:
        out = _empty_head_dims(q, k, v, is_causal, attn_mask, scale, dropout_p)
    else:
        try:
            out = flash_attention(q, k, v, causal=is_causal, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p,
                                  causal_alignment="top_left")
        except (TypeError, ValueError) as error:
            raise _in_drop_in_terms(error) from None
    if drop_all:
        out = out.masked_fill(torch.ones((), dtype=torch.bool, device=out.device), 0.0)
    shape = (*batch, heads, out.shape[-2], out.shape[-1])
    return out.reshape(shape[len(shape) - out_rank:])


def _describe_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False) -> dict:
    """The flash_attention call the drop-in makes, as the backends see it."""
    batch = math.prod(_validate.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])) \
        if max(query.dim(), key.dim(), value.dim()) > 3 else 1
    return describe(query, value, varlen=False, batch=batch)


_dispatch.register_describer("scaled_dot_product_attention", _describe_call)
