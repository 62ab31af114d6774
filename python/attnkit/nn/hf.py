"""Hugging Face transformers integration: `attnkit.nn.hf.register()` adds an "attnkit"
attention function to transformers' AttentionInterface and a mask function to its
AttentionMaskInterface, so that

    attnkit.nn.hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnkit")

runs attention through attnkit.ops.flash_attention in every model that uses those
interfaces (Llama, Mistral, Qwen, Gemma, BERT, ...). transformers is imported only
when register() is called: attnkit never needs it.

The mask function is transformers' SDPA one: None when the pattern is plain causal
(or plain bidirectional) without padding, which the kernel then applies itself, else
a (B, 1, Q, K) bool mask, True = attend (padding, sliding windows, chunks, packed
sequences), which the kernel reads through a stride-0 head dimension. Without a
registered mask function transformers would pass no mask at all and silently lose
causal masking. Query rows that see no key (left padding) give 0, where eager gives
a uniform average: those are padding positions.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _autocast
from ..backends.attention import MAX_HEAD_DIM
from ..ops.attention import flash_attention

NAME = "attnkit"
_warned_output_attentions = False


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, softcap: Optional[float] = None,
                      sliding_window: Optional[int] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function signature: q (B, H, Q, D), k/v (B, H_kv, K, D) ->
    ((B, Q, H, D), None). K/V heads are never repeated (GQA in the kernel). T5's
    `position_bias` (its learned relative bias, (1 or B, H, Q, K)) joins the mask as an
    additive one and gets its gradient from the kernel's backward. Attention sinks (GPT-OSS's
    `s_aux`, one logit a head; Inkling2's `sinks`, (B, H, Q, 1), one a query) run in inference
    only. Head dims above the kernels' 256 run transformers' own SDPA attention, as "sdpa" would."""
    _warn_output_attentions(kwargs)
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return _sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap,
                               sliding_window, **kwargs)
    dtype = _autocast.lower_precision_dtype(query.device.type)
    if dtype is not None:  # as autocast casts SDPA's inputs (RoPE leaves q, k in float32, v in bf16)
        query, key, value, attention_mask = _autocast.cast_floating(dtype, (query, key, value, attention_mask))
        kwargs = {k: _autocast.cast_floating(dtype, [v])[0] for k, v in kwargs.items()}
        with _autocast.off(query.device.type, True):
            return attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap,
                                     sliding_window, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (-1, -1)
    if attention_mask is not None:
        causal = False  # the mask holds the whole pattern
        if attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :kv_len]
    elif causal and sliding_window:
        window = (sliding_window - 1, -1)  # transformers: kv_idx > q_idx - sliding_window
    causal = bool(causal) and q_len > 1
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _with_bias(position_bias[..., :kv_len], attention_mask)
    sinks, sinks_name = _sinks(kwargs)
    if sinks is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, sinks)):
        raise NotImplementedError(f"attnkit attention: attention sinks ({sinks_name}, as GPT-OSS and Inkling2 pass "
                                  "them) run in inference only (torch.no_grad()): their gradient needs the "
                                  "log-sum-exp's, which the kernel does not give")
    # No mask: transformers' SDPA path calls SDPA with is_causal, whose diagonal is top-left (a
    # static cache's prompt pass has Q < K, the empty slots after the prompt).
    result = flash_attention(query, key, value, causal=causal, attn_mask=attention_mask, window_size=window,
                             softcap=float(softcap or 0.0), scale=scaling, dropout_p=float(dropout),
                             causal_alignment="top_left", return_lse=sinks is not None)
    out = _with_sinks(*result, sinks, sinks_name) if sinks is not None else result
    return out.transpose(1, 2).contiguous(), None


def _sinks(kwargs: dict) -> Tuple[Optional[Tensor], str]:
    """(the sink logits, their argument's name): `s_aux` (heads,) or `sinks` (B, H, Q, 1)."""
    given = [(kwargs[name], name) for name in ("s_aux", "sinks") if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("attnkit attention: got both s_aux and sinks (attention sinks); pass one")
    return given[0] if given else (None, "")


def _with_sinks(out: Tensor, lse: Tensor, sinks: Tensor, name: str) -> Tensor:
    """A sink is one more logit s in each row's softmax, attached to no value: it scales the
    row's output by Z / (Z + e^s) = sigmoid(lse - s) (0 for a row that sees no key)."""
    batch, heads, rows = lse.shape
    if name == "s_aux":
        if sinks.shape != (heads,):
            raise ValueError(f"attnkit attention: s_aux (attention sinks) must have shape (heads,) = ({heads},), "
                             f"got {tuple(sinks.shape)}")
        logits = sinks[None, :, None]
    else:
        if sinks.dim() != 4 or sinks.shape[-1] != 1 or any(
                s not in (1, full) for s, full in zip(sinks.shape[:3], (batch, heads, rows))):
            raise ValueError(f"attnkit attention: sinks (one sink logit a query) must have shape (B, H, Q, 1) = "
                             f"({batch}, {heads}, {rows}, 1) or broadcast to it, got {tuple(sinks.shape)}")
        logits = sinks[..., 0]
    factor = torch.sigmoid(lse - logits.to(lse.dtype))
    return (out.to(factor.dtype) * factor[..., None]).to(out.dtype)


def _sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap, sliding_window,
                    **kwargs) -> Tuple[Tensor, None]:
    """transformers' SDPA attention, for head dims the kernels do not take (up to 256): what
    attn_implementation="sdpa" runs, with the same masks (mask_function is its sdpa_mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _sinks(kwargs)[0] is not None:
        raise NotImplementedError(f"attnkit attention: head dims above {MAX_HEAD_DIM} (got {query.shape[-1]}) run "
                                  "transformers' SDPA attention, which has no attention sinks")
    if softcap:
        kwargs["softcap"] = softcap  # transformers' SDPA refuses it, naming it
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _warn_output_attentions(kwargs: dict) -> None:
    """transformers' eager attention returns the weights; flash attention never forms them."""
    global _warned_output_attentions
    if kwargs.get("output_attentions") and not _warned_output_attentions:
        _warned_output_attentions = True
        warnings.warn("attnkit attention does not return attention weights (output_attentions=True): the "
                      "attentions come back empty, as with attn_implementation='sdpa'; use 'eager' for them",
                      stacklevel=3)


def _with_bias(position_bias: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """One additive mask from T5's position bias and transformers' mask: a bool mask (True =
    attend) becomes -inf where it hides a key (a row it hides entirely gives 0, as the kernel
    does for any empty row), a float one is added."""
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return torch.where(attention_mask, position_bias, float("-inf"))
    return position_bias + attention_mask


def mask_function(*args, **kwargs):
    """transformers' sdpa_mask: None when the kernel's own causal/full attention suffices,
    else a (B, 1, Q, K) bool mask (True = attend)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register(name: str = NAME) -> str:
    """Registers the attention and mask functions under `name` (idempotent); returns `name`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError("attnkit.nn.hf.register needs transformers with AttentionInterface and "
                          "AttentionMaskInterface (>= 4.53): pip install 'attnkit[hf]'") from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)
    return name
