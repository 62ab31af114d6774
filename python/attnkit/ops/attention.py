"""`attnkit.ops.flash_attention` and `flash_attention_varlen`: tiled attention in
O(N) memory with causal/window/mask/padding/softcap/GQA/dropout, forward and
backward, on the backend the dispatcher picks (Triton on GPUs).

Both are one pair of torch.library custom ops (`attnkit::attention_forward`,
`attnkit::attention_backward`) with fake implementations and an autograd
formula, so torch.compile traces them without graph breaks; plain eager calls
run the same kernels and formula without their dispatch (attnkit._eager).
"""

import inspect
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _eager
from .._autocast import without_autocast
from ..backends.attention import ATTENTION, AttentionCall, describe
from . import attention_validation as check

OP = "attnkit.ops.flash_attention"
OP_VARLEN = "attnkit.ops.flash_attention_varlen"
_ALIGNMENTS = ("bottom_right", "top_left")


def _call(q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, window_left, window_right, bottom_right, softcap, scale,
          dropout_p, seed, alibi_slopes, rotary_cos, rotary_sin, rotary_offsets, rotary_interleaved,
          mask_grad=False) -> AttentionCall:
    if cu_q is None:  # dense: the lengths are q's and k's (torch.jit.trace froze the ints it was given)
        max_q, max_k = q.shape[2], k.shape[2]
    return AttentionCall(q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, (window_left, window_right), bottom_right,
                         softcap, scale, dropout_p, 0 if seed is None else int(seed), alibi_slopes, rotary_cos,
                         rotary_sin, rotary_offsets, rotary_interleaved, mask_grad)


def _attention_forward_kernels(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
    window_left: int, window_right: int, bottom_right: bool, softcap: float, scale: float, dropout_p: float,
    seed: Optional[Tensor], alibi_slopes: Optional[Tensor], rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor],
    rotary_offsets: Optional[Tensor], rotary_interleaved: bool,
) -> Tuple[Tensor, Tensor]:
    call = _call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                 window_left, window_right, bottom_right, softcap, scale, dropout_p, seed, alibi_slopes, rotary_cos,
                 rotary_sin, rotary_offsets, rotary_interleaved)
    out, lse = without_autocast(q.device.type, ATTENTION.select(call.describe()).forward, call)
    if cu_seqlens_q is None and _heads_inside_rows(q):
        return out.transpose(1, 2).contiguous().transpose(1, 2), lse.contiguous()
    return out.contiguous(), lse.contiguous()


def _heads_inside_rows(q: Tensor) -> bool:
    """q (B, H, N, D) laid out as (B, N, H, D), a transposed view as MultiheadAttention and HF
    models make it: the output takes that layout too, as SDPA's, so that the caller's
    transpose(1, 2).reshape(B, N, H * Dv) is a view. (Else that reshape copies the output, and
    training kept it twice: the op saves it, and the output projection saves the copy.)"""
    return q.shape[1] > 1 and q.shape[2] > 1 and q.stride(1) < q.stride(2)


_attention_forward = torch.library.custom_op("attnkit::attention_forward", _attention_forward_kernels, mutates_args=())


@_attention_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
      window_left, window_right, bottom_right, softcap, scale, dropout_p, seed, *rest):
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:-1]
    if cu_seqlens_q is None and _heads_inside_rows(q):
        out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
    else:
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty(lse_shape, dtype=stat_dtype)


def _attention_backward_kernels(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, attn_mask: Optional[Tensor],
    key_padding_mask: Optional[Tensor], window_left: int, window_right: int, bottom_right: bool, softcap: float,
    scale: float, dropout_p: float, seed: Optional[Tensor], alibi_slopes: Optional[Tensor],
    rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], rotary_offsets: Optional[Tensor], rotary_interleaved: bool,
    mask_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d_mask): d_mask is the (B, H, Nq, Nk) gradient of the expanded additive
    attn_mask in its dtype with mask_grad, else an empty tensor (a custom op returns tensors)."""
    call = _call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                 window_left, window_right, bottom_right, softcap, scale, dropout_p, seed, alibi_slopes, rotary_cos,
                 rotary_sin, rotary_offsets, rotary_interleaved, mask_grad)
    dq, dk, dv, d_mask = without_autocast(q.device.type, ATTENTION.select(call.describe()).backward, call, grad_out,
                                          out, lse)
    d_mask = d_mask.to(attn_mask.dtype) if mask_grad else q.new_empty(0)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), d_mask


_attention_backward = torch.library.custom_op(
    "attnkit::attention_backward", _attention_backward_kernels, mutates_args=()
)


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, *args):
    # Contiguous like the real gradients (q may be a strided view: empty_like would copy its strides).
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    mask_grad = args[-1]
    d_mask = torch.empty(attn_mask.shape, dtype=attn_mask.dtype, device=q.device) if mask_grad else q.new_empty(0)
    return grads + (d_mask,)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, window_left, window_right, bottom_right, softcap, scale, dropout_p,
     seed, alibi_slopes, rotary_cos, rotary_sin, rotary_offsets, rotary_interleaved) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, mask, pad, seed, alibi_slopes, rotary_cos, rotary_sin,
                          rotary_offsets)
    ctx.scalars = (max_q, max_k, window_left, window_right, bottom_right, softcap, scale, dropout_p)
    ctx.rotary_interleaved = rotary_interleaved
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, mask, pad, seed, alibi_slopes, cos, sin, rot_offsets = ctx.saved_tensors
    max_q, max_k, window_left, window_right, bottom_right, softcap, scale, dropout_p = ctx.scalars
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    mask_grad = ctx.needs_input_grad[_MASK_INPUT]
    dq, dk, dv, d_mask = _eager.call(_attention_backward_kernels, _attention_backward, grad_out.contiguous(), q, k, v,
                                     out, lse, cu_q, cu_k, max_q, max_k, mask, pad, window_left, window_right,
                                     bottom_right, softcap, scale, dropout_p, seed, alibi_slopes, cos, sin,
                                     rot_offsets, ctx.rotary_interleaved, mask_grad)
    return (dq, dk, dv) + (None,) * 4 + (d_mask if mask_grad else None,) + (None,) * 13


_MASK_INPUT = 7  # attn_mask's place among the forward op's inputs


_eager.register_autograd(_attention_forward, _backward, _setup_context)
_AttentionFunction = _eager.autograd_function("_AttentionFunction", _attention_forward_kernels, _setup_context,
                                              _backward)


def _run_forward(*args):
    """attnkit::attention_forward, or the same kernels and formula without its dispatch where only eager
    autograd sees the call (attnkit._eager)."""
    return _eager.forward(_AttentionFunction, _attention_forward_kernels, _attention_forward, *args,
                          training=_eager.needs_grad(args[:3] + args[_MASK_INPUT : _MASK_INPUT + 1]))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _seed(op: str, dropout_p: float, generator: Optional[torch.Generator]) -> Optional[Tensor]:
    if dropout_p == 0:
        return None
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    # 40 random bits, times 2^20 so that the per-(batch, head) streams of two calls never overlap.
    return torch.randint(0, 1 << 40, (), generator=generator, device=device, dtype=torch.int64).cpu() << 20


def _window(op: str, causal: bool, window_size: Sequence[int]) -> Tuple[int, int]:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    left, right = check.window(op, window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _finish(out: Tensor, lse: Tensor, return_lse: bool):
    return (out, lse) if return_lse else out


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
    scale: Optional[float] = None, dropout_p: float = 0.0, generator: Optional[torch.Generator] = None,
    return_lse: bool = False, deterministic: bool = False, causal_alignment: str = "bottom_right",
    alibi_slopes: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
    rotary_interleaved: bool = False, rotary_seqlen_offsets: Union[int, Tensor] = 0,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention softmax(q k^T * scale + masks) v without materializing the scores.

    Args:
        q: (B, H, Nq, D); k: (B, H_kv, Nk, D); v: (B, H_kv, Nk, Dv). H must be a multiple of
            H_kv (GQA/MQA; K/V are never repeated in memory). D, Dv in 1..256. fp16, bf16, fp32, fp64.
        causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, as FlashAttention),
            or j <= i with causal_alignment="top_left" (as SDPA's is_causal).
        attn_mask: bool (True = attend) or float (added to the scores), broadcastable to
            (B, H, Nq, Nk). A float mask that requires grad gets its gradient (a learned bias, as
            T5's or Swin's relative position bias); the backward then writes a (B, H, Nq, Nk)
            float32 (float64 for float64 inputs) buffer, summed to the mask's shape, as SDPA does.
        key_padding_mask: bool (B, Nk), True marks padding keys (ignored), as nn.MultiheadAttention;
            no (Nq, Nk) tensor is built for it.
        window_size: (left, right): query i sees keys j with -left <= j - i - diag <= right;
            -1 = unbounded. Combined with causal, right becomes 0.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) before masks (Gemma 2).
        alibi_slopes: fp32 (H,) or (B, H): adds -slope * |j - i - diag| to the scores, computed in
            the kernel (no (Nq, Nk) bias tensor); attnkit.nn.alibi_slopes(H) gives the paper's slopes.
        rotary_cos, rotary_sin: (positions, rotary_dim / 2) tables: RoPE fused into the kernel,
            q and k rotated as their tiles load (FlashAttention's apply_rotary_emb convention: the
            first rotary_dim dims rotate as halves, or even/odd pairs when rotary_interleaved).
            Key j sits at position j + offset, query i at i + diag + offset (diag = Nk - Nq
            bottom-right, 0 top-left); rotary_seqlen_offsets: int or int32 (B,) offset (KV cache).
        scale: multiplies q k^T; default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities (Philox; the backward redraws the
            same mask). The seed comes from `generator` (default: torch's CPU generator), so
            torch.manual_seed makes it reproducible.
        return_lse: also return the log-sum-exp (B, H, Nq) in fp32 (fp64 for fp64 inputs; -inf for
            rows with no visible key), without gradient.
        deterministic: accepted for API compatibility: the backward never uses atomics, so
            it is always deterministic.

    Returns:
        out (B, H, Nq, Dv) in q's dtype; rows with no visible key are 0 (gradient 0).
    """
    attn_mask, key_padding_mask = check.dense(OP, q, k, v, attn_mask, key_padding_mask)
    softcap, scale, dropout_p = check.scalars(OP, softcap, scale, dropout_p, q.shape[-1])
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"{OP}: causal_alignment must be one of {_ALIGNMENTS}, got {causal_alignment!r}")
    left, right = _window(OP, causal, window_size)
    check.flags(OP, return_lse=return_lse, deterministic=deterministic, rotary_interleaved=rotary_interleaved)
    slopes = check.alibi(OP, alibi_slopes, q.shape[0], q.shape[1], q.device)
    bottom_right = causal_alignment == "bottom_right"
    batch = q.shape[0]
    # Per-sequence lengths only for RoPE's position check: a list of a symbolic batch's length
    # tied compiled graphs to one batch size (a recompile per batch size, even with dynamic=True).
    lengths_q, lengths_k = ([q.shape[2]] * batch, [k.shape[2]] * batch) if rotary_cos is not None else ([], [])
    cos, sin, offsets = check.rotary(OP, rotary_cos, rotary_sin, rotary_seqlen_offsets, q.shape[-1], batch,
                                     lengths_q, lengths_k, bottom_right, q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = _run_forward(q, k, v, None, None, q.shape[2], k.shape[2], attn_mask, key_padding_mask, left, right,
                            bottom_right, softcap, scale, dropout_p, _seed(OP, dropout_p, generator), slopes, cos, sin,
                            offsets, bool(rotary_interleaved))
    return _finish(out, lse, return_lse)


def flash_attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, *, causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
    scale: Optional[float] = None, dropout_p: float = 0.0, generator: Optional[torch.Generator] = None,
    return_lse: bool = False, deterministic: bool = False, alibi_slopes: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None, rotary_interleaved: bool = False,
    rotary_seqlen_offsets: Union[int, Tensor] = 0,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over a packed batch of variable-length sequences, as FlashAttention's varlen API.

    Args:
        q: (total_q, H, D); k: (total_k, H_kv, D); v: (total_k, H_kv, Dv): the sequences
            concatenated. cu_seqlens_q / cu_seqlens_k: int32 (B + 1,) cumulative lengths
            starting at 0. max_seqlen_q / max_seqlen_k: the longest sequence of each.
        The rest as flash_attention; causal is bottom-right aligned per sequence.

    Returns:
        out (total_q, H, Dv); with return_lse also lse (H, total_q) fp32 (fp64 for fp64 inputs).
    """
    check.varlen(OP_VARLEN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    # An upper bound, as FlashAttention's: no sequence is longer than all the tokens, and the
    # kernels size their grids (and loops) by it
    max_seqlen_q, max_seqlen_k = min(max_seqlen_q, q.shape[0]), min(max_seqlen_k, k.shape[0])
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # Triton reads them so
    softcap, scale, dropout_p = check.scalars(OP_VARLEN, softcap, scale, dropout_p, q.shape[-1])
    left, right = _window(OP_VARLEN, causal, window_size)
    check.flags(OP_VARLEN, return_lse=return_lse, deterministic=deterministic, rotary_interleaved=rotary_interleaved)
    batch = cu_seqlens_q.numel() - 1
    slopes = check.alibi(OP_VARLEN, alibi_slopes, batch, q.shape[1], q.device)
    lengths_q = lengths_k = []
    if rotary_cos is not None and not torch.compiler.is_compiling():
        lengths_q, lengths_k = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    cos, sin, offsets = check.rotary(OP_VARLEN, rotary_cos, rotary_sin, rotary_seqlen_offsets, q.shape[-1], batch,
                                     lengths_q, lengths_k, True, q.device)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = _run_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None, left,
                            right, True, softcap, scale, dropout_p, _seed(OP_VARLEN, dropout_p, generator), slopes, cos, sin,
                            offsets, bool(rotary_interleaved))
    return _finish(out, lse, return_lse)


def _bound(op, function, *args, **kwargs) -> None:
    """explain's arguments checked against the op's signature: a misspelt keyword (casual=True) is an error."""
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"attnkit.explain({op!r}, ...): these are not {op}'s arguments: {error}") from None


def _describe_call(q, k, v, **kwargs):
    _bound("flash_attention", flash_attention, q, k, v, **kwargs)
    check.dense(OP, q, k, v, kwargs.get("attn_mask"), kwargs.get("key_padding_mask"))
    return describe(q, v, varlen=False, rotary=kwargs.get("rotary_cos") is not None, batch=q.shape[0])


def _describe_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs):
    _bound("flash_attention_varlen", flash_attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
           max_seqlen_k, **kwargs)
    check.varlen(OP_VARLEN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return describe(q, v, varlen=True, rotary=kwargs.get("rotary_cos") is not None, batch=cu_seqlens_q.numel() - 1)


_dispatch.register_describer("flash_attention", _describe_call)
_dispatch.register_describer("flash_attention_varlen", _describe_varlen_call)
