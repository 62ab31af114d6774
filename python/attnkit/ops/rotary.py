"""`attnkit.ops.apply_rotary`: rotary position embedding (RoPE) as FlashAttention's
`flash_attn.layers.rotary.apply_rotary_emb`, forward and backward, on the backend
the dispatcher picks (Triton on GPUs).

Two torch.library custom ops: `attnkit::rotary` (out of place, with a fake
implementation and an autograd formula: the gradient of a rotation is the
rotation by the opposite angle; plain eager calls run its kernels and formula
without the op's dispatch, attnkit._eager) and `attnkit::rotary_` (mutates x). The in-place
form goes through a torch.autograd.Function that marks x dirty when autograd
records it, and calls `attnkit::rotary_` directly otherwise (so torch.compile
sees one mutating node).
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _eager, _validate
from ..backends.rotary import ROTARY
from ..reference import rotary as ref

OP = "attnkit.ops.apply_rotary"
LAYOUTS = ("bnhd", "bhnd")


def _rotary_kernels(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int, interleaved: bool,
                    conjugate: bool, cu_seqlens: Optional[Tensor], max_seqlen: int) -> Tensor:
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        # Strided head dims take the kernel's element-wise path: a copy first is ~4x faster for
        # the broadcast gradient of out.sum().backward() (0.34 -> 0.09 ms at (1, 512, 16, 64)).
        x = x.contiguous()
    out = torch.empty_like(x)
    ROTARY.select(_describe_tensors(x)).apply(x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens,
                                              max_seqlen)
    return out


_rotary = torch.library.custom_op("attnkit::rotary", _rotary_kernels, mutates_args=())


@_rotary.register_fake
def _(x, cos, sin, offsets, offset, interleaved, conjugate, cu_seqlens, max_seqlen):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, cos, sin, offsets, offset, interleaved, conjugate, cu_seqlens, max_seqlen = inputs
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, offsets, cu_seqlens, x if ctx.table_grads else None)
    ctx.options = (offset, interleaved, conjugate, max_seqlen)


def _table_grads(grad, x, cos, sin, offsets, offset, interleaved, conjugate, cu_seqlens):
    if cu_seqlens is None:
        return ref.table_grads(grad, x, cos, sin, offsets, offset, interleaved, conjugate)
    return ref.varlen(ref.table_grads, cu_seqlens, x, cos, sin, offsets, offset, interleaved, conjugate, others=(grad,))


def _rotated(*args) -> Tensor:
    """attnkit::rotary, or the same kernels without its dispatch where only eager autograd sees the call
    (attnkit._eager: the dispatch was ~40% of a one-token fwd+bwd), through _RotaryFunction when
    autograd records it: a rotation's backward is a rotation, so double backward works either way."""
    return _eager.forward(_RotaryFunction, _rotary_kernels, _rotary, *args,
                          training=_eager.needs_grad(args[:3]))


def _backward(ctx, grad):
    cos, sin, offsets, cu_seqlens, x = ctx.saved_tensors
    offset, interleaved, conjugate, max_seqlen = ctx.options
    dx = _rotated(grad, cos, sin, offsets, offset, interleaved, not conjugate, cu_seqlens, max_seqlen)
    d_cos = d_sin = None
    if ctx.table_grads:  # learned tables are rare and small: plain PyTorch, on every backend
        d_cos, d_sin = _table_grads(grad, x, cos, sin, offsets, offset, interleaved, conjugate, cu_seqlens)
    return (dx, d_cos, d_sin) + (None,) * 6


_eager.register_autograd(_rotary, _backward, _setup_context)
_RotaryFunction = _eager.autograd_function("_RotaryFunction", _rotary_kernels, _setup_context, _backward, once=False)


@torch.library.custom_op("attnkit::rotary_", mutates_args=("x",))
def _rotary_(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int, interleaved: bool,
             cu_seqlens: Optional[Tensor], max_seqlen: int) -> None:
    ROTARY.select(_describe_tensors(x)).apply(x, cos, sin, offsets, offset, interleaved, False, x, cu_seqlens,
                                              max_seqlen)


@_rotary_.register_fake
def _(x, cos, sin, offsets, offset, interleaved, cu_seqlens, max_seqlen):
    return None


class _RotaryInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, offsets, offset, interleaved, cu_seqlens, max_seqlen):
        _rotary_(x, cos, sin, offsets, offset, interleaved, cu_seqlens, max_seqlen)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, offsets, cu_seqlens)
        ctx.options = (offset, interleaved, max_seqlen)
        ctx.attnkit_forcing = _dispatch.context_forcing()
        return x

    @staticmethod
    @_dispatch.forced_as_forward
    def backward(ctx, grad):
        cos, sin, offsets, cu_seqlens = ctx.saved_tensors
        offset, interleaved, max_seqlen = ctx.options
        # Through the custom op: this backward is not wrapped for legacy-vmap batched gradients
        # (attnkit._eager), whose tensors the kernels cannot read.
        return (_rotary(grad, cos, sin, offsets, offset, interleaved, True, cu_seqlens, max_seqlen),) + (None,) * 7


def _describe_tensors(x: Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype, "head_dim": x.shape[-1]}


def _packed(x, cu_seqlens, max_seqlen, layout) -> int:
    """Checks packed x (total, H, D) and its cu_seqlens; returns the batch size."""
    if layout != "bnhd":
        raise ValueError(f"{OP}: layout applies to dense x; packed x (with cu_seqlens) is (total, H, D)")
    _validate.tensor(OP, "x", x, ndim=3)
    _validate.tensor(OP, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.device != x.device:
        raise RuntimeError(f"{OP}: cu_seqlens is on {cu_seqlens.device} but x is on {x.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: cu_seqlens must have batch + 1 >= 2 entries, got {cu_seqlens.numel()}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{OP}: max_seqlen must be a non-negative int with cu_seqlens, got {max_seqlen!r}")
    if not torch.compiler.is_compiling():  # reading values syncs; skipped when traced
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != x.shape[0] or min(lengths) < 0:
            raise ValueError(f"{OP}: cu_seqlens must rise from 0 to the packed length {x.shape[0]}, got {bounds}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"{OP}: max_seqlen = {max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    return cu_seqlens.numel() - 1


def _validated(x, cos, sin, interleaved, seqlen_offsets, inplace, layout, cu_seqlens, max_seqlen):
    """(x, as a (B, N, H, D) view when dense, cos, sin, offsets tensor or None, int offset, max_seqlen)."""
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"{OP}: layout must be one of {LAYOUTS} (batch, seq, heads, dim order), got {layout!r}")
    if cu_seqlens is not None:
        batch, seqlen = _packed(x, cu_seqlens, max_seqlen, layout), max_seqlen
    else:
        if max_seqlen is not None:
            raise ValueError(f"{OP}: max_seqlen goes with cu_seqlens (packed x); dense x has its own length")
        _validate.tensor(OP, "x", x, ndim=4)
        x = x.transpose(1, 2) if layout == "bhnd" else x
        batch, seqlen, max_seqlen = x.shape[0], x.shape[1], 0
    if inplace and any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        # Several elements share memory: the kernels would rotate each of them once, racing.
        raise ValueError(f"{OP}: x is expanded (a stride is 0), so inplace=True would write one element many "
                         f"times; pass x.clone() or inplace=False")
    head_dim = x.shape[-1]
    for name, table in (("cos", cos), ("sin", sin)):
        _validate.tensor(OP, name, table)
        if table.dim() not in (2, 3) or (table.dim() == 3 and table.shape[0] != batch):
            raise ValueError(f"{OP}: {name} must have shape (seqlen_ro, rotary_dim / 2) or "
                             f"(B, seqlen_ro, rotary_dim / 2) with B = {batch}, got {tuple(table.shape)}")
        if table.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{OP}: {name} has dtype {table.dtype}; expected x's dtype ({x.dtype}) or float32")
        if table.device != x.device:
            raise RuntimeError(f"{OP}: {name} is on {table.device} but x is on {x.device}")
        if inplace and table.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{OP}: gradients with respect to {name} are not implemented in place (x is "
                                      f"overwritten); pass inplace=False or {name}.detach()")
    if sin.shape != cos.shape or sin.dtype != cos.dtype:
        raise ValueError(f"{OP}: sin must match cos in shape and dtype, got sin {tuple(sin.shape)} {sin.dtype} "
                         f"and cos {tuple(cos.shape)} {cos.dtype}")
    rotary_dim, seqlen_ro = 2 * cos.shape[-1], cos.shape[-2]
    if not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"{OP}: rotary_dim = 2 * cos.shape[-1] = {rotary_dim} must be between 2 and the head dim "
                         f"of x ({head_dim})")
    offsets, offset = None, 0
    if isinstance(seqlen_offsets, Tensor):
        _validate.tensor(OP, "seqlen_offsets", seqlen_offsets, ndim=1, dtypes=(torch.int32, torch.int64))
        _validate.shape(OP, "seqlen_offsets", seqlen_offsets, (batch,), "one offset per sequence")
        if seqlen_offsets.device != x.device:
            raise RuntimeError(f"{OP}: seqlen_offsets is on {seqlen_offsets.device} but x is on {x.device}")
        offsets = seqlen_offsets.contiguous()
    elif isinstance(seqlen_offsets, int) and not isinstance(seqlen_offsets, bool):
        offset = seqlen_offsets
        if offset < 0 or offset + seqlen > seqlen_ro:
            raise ValueError(f"{OP}: seqlen_offsets + seqlen = {offset} + {seqlen} must lie in [0, seqlen_ro = "
                             f"{seqlen_ro}] (cos/sin have {seqlen_ro} rows)")
    else:
        raise TypeError(f"{OP}: seqlen_offsets must be an int or an int32/int64 (B,) tensor, got "
                        f"{type(seqlen_offsets).__name__}")
    return x, cos.contiguous(), sin.contiguous(), offsets, offset, max_seqlen


def apply_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0, inplace: bool = False, layout: str = "bnhd",
    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
) -> Tensor:
    """Rotary position embedding of the first rotary_dim dims of x (RoFormer), as
    FlashAttention's `apply_rotary_emb`.

    Args:
        x: (B, N, H, D), FlashAttention's layout (batch, sequence, heads, head dim); with
            layout="bhnd", (B, H, N, D) as SDPA and attnkit.ops.flash_attention take. Any strides.
        cos, sin: (seqlen_ro, rotary_dim / 2), or (B, seqlen_ro, rotary_dim / 2) for a table per
            sequence (arbitrary position ids); x's dtype or float32. rotary_dim <= D; dims past it
            pass through unchanged. Gradients flow to cos/sin when they require grad (computed in
            plain PyTorch, not by the kernel), except with inplace=True (NotImplementedError).
        interleaved: False rotates the pairs (i, i + rotary_dim/2) (GPT-NeoX, Llama); True the
            pairs (2i, 2i + 1) (GPT-J).
        seqlen_offsets: int, or an int32/int64 (B,) tensor: row n of sequence b takes position
            n + offset[b] (decoding with a KV cache). An int must keep every position inside
            cos; with a tensor, rows whose position falls outside [0, seqlen_ro) are returned
            unrotated (as FlashAttention; checking would cost a device sync).
        inplace: rotate x in place and return it; the gradient still flows through.
        layout: "bnhd" (default) or "bhnd".
        cu_seqlens, max_seqlen: packed x (total, H, D) of B sequences, as FlashAttention's varlen:
            int32 cumulative lengths (B + 1,) from 0, and the longest length (offsets, per-sequence
            tables and the seqlen_ro check apply per sequence).

    Returns:
        x rotated, same shape, dtype and layout (x itself when inplace). Computed in fp32
        (fp64 for fp64 x): out[:R] = x cos + rotate_half(x) sin per pair.
    """
    _eager.refuse_differentiating_transforms("apply_rotary")
    _eager.refuse_forward_ad("apply_rotary", (x, cos, sin))
    original = x
    x, cos, sin, offsets, offset, max_seqlen = _validated(x, cos, sin, interleaved, seqlen_offsets, inplace, layout,
                                                          cu_seqlens, max_seqlen)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()  # Triton reads it so
    if inplace and torch._C._are_functorch_transforms_active():  # the mutating op has no batching rule
        rotated = _rotary(x, cos, sin, offsets, offset, interleaved, False, cu_seqlens, max_seqlen)
        x.copy_(rotated)
        return original
    if inplace:
        if torch.is_grad_enabled() and x.requires_grad:
            _RotaryInplace.apply(x, cos, sin, offsets, offset, interleaved, cu_seqlens, max_seqlen)
        else:
            _rotary_(x, cos, sin, offsets, offset, interleaved, cu_seqlens, max_seqlen)
        return original
    out = _rotated(x, cos, sin, offsets, offset, interleaved, False, cu_seqlens, max_seqlen)
    return out.transpose(1, 2) if layout == "bhnd" else out


def _describe_call(x, cos, sin, **kwargs) -> dict:
    keys = ("interleaved", "seqlen_offsets", "inplace", "layout", "cu_seqlens", "max_seqlen")
    defaults = dict(interleaved=False, seqlen_offsets=0, inplace=False, layout="bnhd", cu_seqlens=None, max_seqlen=None)
    x = _validated(x, cos, sin, *(kwargs.get(k, defaults[k]) for k in keys))[0]
    return _describe_tensors(x)


_dispatch.register_describer("rotary", _describe_call)
_dispatch.register_describer("apply_rotary", _describe_call)
