"""`attnkit.ops.attention_decode`: attention of the newest query tokens against a
KV cache (generation), split over the keys ("flash-decoding") on GPUs.
Inference only: it has no backward (use flash_attention to train)."""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _eager, _validate
from .._autocast import without_autocast
from ..backends.decode import DECODE
from . import attention_validation as check

OP = "attnkit.ops.attention_decode"


def _describe(q: Tensor, k_cache: Tensor, v_cache: Tensor, alibi_slopes: Optional[Tensor] = None) -> dict:
    group = q.shape[1] // k_cache.shape[1]
    return {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v_cache.shape[-1],
            "rows": group * q.shape[2], "alibi": alibi_slopes is not None}


def _attention_decode_kernels(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, softcap: float, window_left: int,
    alibi_slopes: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    impl = DECODE.select(_describe(q, k_cache, v_cache, alibi_slopes))
    out, lse = without_autocast(q.device.type, impl.forward, q, k_cache, v_cache, cache_seqlens, scale, softcap,
                                window_left, alibi_slopes)
    return out.contiguous(), lse.contiguous()


_attention_decode = torch.library.custom_op("attnkit::attention_decode", _attention_decode_kernels, mutates_args=())


@_attention_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, scale, softcap, window_left, alibi_slopes):
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],)), q.new_empty(q.shape[:-1], dtype=stat_dtype)


def _check_tensors(q, k_cache, v_cache, cache_seqlens) -> None:
    """The op's checks of its tensors (attention_decode and explain)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _validate.tensor(OP, name, t, ndim=4, dtypes=check.FLOAT_DTYPES)
    _validate.same_dtype_and_device(OP, [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])
    batch, heads = q.shape[:2]
    if k_cache.shape[0] != batch or v_cache.shape[0] != batch:
        raise ValueError(f"{OP}: q, k_cache, v_cache must have the same batch size, got {batch}, {k_cache.shape[0]}, "
                         f"{v_cache.shape[0]}")
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"{OP}: k_cache and v_cache must have the same length, got {k_cache.shape[2]} and {v_cache.shape[2]}")
    names = ("q", "k_cache", "v_cache")
    check.check_heads(OP, heads, k_cache.shape[1], v_cache.shape[1], names)
    check.check_head_dims(OP, q, k_cache, v_cache, names)
    _validate.tensor(OP, "cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,))
    if cache_seqlens.shape[0] != batch or cache_seqlens.device != q.device:
        raise ValueError(f"{OP}: cache_seqlens must be ({batch},) int32 on {q.device}, got {tuple(cache_seqlens.shape)} "
                         f"on {cache_seqlens.device}")
    # CPU lengths are checked here; on a GPU reading them would synchronize with it, once per
    # layer and token of a generation: there the kernel takes a length outside [0, N_max]
    # as the nearest bound (never reading past the cache), as FlashAttention does not check them.
    if cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        lengths = cache_seqlens.tolist()
        if lengths and (min(lengths) < 0 or max(lengths) > k_cache.shape[2]):
            raise ValueError(f"{OP}: cache_seqlens must be within [0, {k_cache.shape[2]}] (the cache length), got {lengths}")


def attention_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: Optional[float] = None,
    softcap: float = 0.0, window_left: int = -1, alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of new query tokens against a preallocated KV cache.

    Args:
        q: (B, H, Nq, D), the Nq newest tokens (usually 1); their keys/values already written
            to the caches at positions cache_seqlens[b] - Nq .. cache_seqlens[b] - 1.
        k_cache, v_cache: (B, H_kv, N_max, D) / (B, H_kv, N_max, Dv); H a multiple of H_kv.
        cache_seqlens: int32 (B,): valid cache length per sequence (ragged batches), in
            [0, N_max]: checked on the CPU; on a GPU (not checked, to avoid a sync per call)
            a value outside counts as the nearest bound.
        scale, softcap, alibi_slopes: as flash_attention. window_left: sliding window, -1 = none.
        Query i attends to valid keys j <= cache_seqlens[b] - Nq + i (causal among new tokens).

    Returns:
        out (B, H, Nq, Dv); with return_lse also lse (B, H, Nq).
    """
    _check_tensors(q, k_cache, v_cache, cache_seqlens)
    batch, heads, _, dim = q.shape
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise NotImplementedError(f"{OP} is inference-only (no backward); use attnkit.ops.flash_attention to train")
    softcap, scale, _ = check.scalars(OP, softcap, scale, 0.0, dim)
    left, _ = check.window(OP, (window_left, -1), names=("window_left", "window_right"))
    check.flags(OP, return_lse=return_lse)
    slopes = check.alibi(OP, alibi_slopes, batch, heads, q.device)
    if batch == 0 or q.shape[2] == 0:  # nothing to attend; the backends' loops and grids assume a query
        stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = q.new_empty(q.shape[:-1] + (v_cache.shape[-1],)), q.new_empty(q.shape[:-1], dtype=stat_dtype)
        return (out, lse) if return_lse else out
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    # Plain eager calls skip the custom op's dispatch (attnkit._eager): one of these runs per layer and token.
    out, lse = _eager.call(_attention_decode_kernels, _attention_decode, q, k_cache, v_cache,
                           cache_seqlens.contiguous(), scale, softcap, left, slopes)
    return (out, lse) if return_lse else out


def _describe_call(q, k_cache, v_cache, cache_seqlens, **kwargs):
    _check_tensors(q, k_cache, v_cache, cache_seqlens)
    return _describe(q, k_cache, v_cache, kwargs.get("alibi_slopes"))


_dispatch.register_describer("attention_decode", _describe_call)
