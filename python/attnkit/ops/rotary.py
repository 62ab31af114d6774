"""`attnkit.ops.apply_rotary`: rotary position embedding (RoPE) as FlashAttention's
`flash_attn.layers.rotary.apply_rotary_emb`, forward and backward, on the backend
the dispatcher picks (Triton on GPUs).

Two torch.library custom ops: `attnkit::rotary` (out of place, with a fake
implementation and an autograd formula: the gradient of a rotation is the
rotation by the opposite angle) and `attnkit::rotary_` (mutates x). The in-place
form goes through a torch.autograd.Function that marks x dirty when autograd
records it, and calls `attnkit::rotary_` directly otherwise (so torch.compile
sees one mutating node).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _validate
from ..backends.rotary import ROTARY
from ..reference import rotary as ref

OP = "attnkit.ops.apply_rotary"
LAYOUTS = ("bnhd", "bhnd")


@torch.library.custom_op("attnkit::rotary", mutates_args=())
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int, interleaved: bool,
            conjugate: bool) -> Tensor:
    out = torch.empty_like(x)
    ROTARY.select(_describe_tensors(x)).apply(x, cos, sin, offsets, offset, interleaved, conjugate, out)
    return out


@_rotary.register_fake
def _(x, cos, sin, offsets, offset, interleaved, conjugate):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, cos, sin, offsets, offset, interleaved, conjugate = inputs
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, offsets, x if ctx.table_grads else None)
    ctx.options = (offset, interleaved, conjugate)


def _backward(ctx, grad):
    cos, sin, offsets, x = ctx.saved_tensors
    offset, interleaved, conjugate = ctx.options
    dx = _rotary(grad, cos, sin, offsets, offset, interleaved, not conjugate)
    d_cos = d_sin = None
    if ctx.table_grads:  # learned tables are rare and small: plain PyTorch, on every backend
        d_cos, d_sin = ref.table_grads(grad, x, cos, sin, offsets, offset, interleaved, conjugate)
    return dx, d_cos, d_sin, None, None, None, None


_rotary.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attnkit::rotary_", mutates_args=("x",))
def _rotary_(x: Tensor, cos: Tensor, sin: Tensor, offsets: Optional[Tensor], offset: int, interleaved: bool) -> None:
    ROTARY.select(_describe_tensors(x)).apply(x, cos, sin, offsets, offset, interleaved, False, x)


@_rotary_.register_fake
def _(x, cos, sin, offsets, offset, interleaved):
    return None


class _RotaryInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, offsets, offset, interleaved):
        _rotary_(x, cos, sin, offsets, offset, interleaved)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, offsets)
        ctx.options = (offset, interleaved)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, offsets = ctx.saved_tensors
        offset, interleaved = ctx.options
        return _rotary(grad, cos, sin, offsets, offset, interleaved, True), None, None, None, None, None


def _describe_tensors(x: Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype, "head_dim": x.shape[-1]}


def _validated(x, cos, sin, interleaved, seqlen_offsets, inplace, layout):
    """(x as a (B, N, H, D) view, cos, sin, offsets tensor or None, int offset)."""
    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {type(flag).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"{OP}: layout must be one of {LAYOUTS} (batch, seq, heads, dim order), got {layout!r}")
    _validate.tensor(OP, "x", x, ndim=4)
    if layout == "bhnd":
        x = x.transpose(1, 2)
    batch, seqlen, _, head_dim = x.shape
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
    return x, cos.contiguous(), sin.contiguous(), offsets, offset


def apply_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
    seqlen_offsets: Union[int, Tensor] = 0, inplace: bool = False, layout: str = "bnhd",
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

    Returns:
        x rotated, same shape, dtype and layout (x itself when inplace). Computed in fp32
        (fp64 for fp64 x): out[:R] = x cos + rotate_half(x) sin per pair.
    """
    original = x
    x, cos, sin, offsets, offset = _validated(x, cos, sin, interleaved, seqlen_offsets, inplace, layout)
    if inplace:
        if torch.is_grad_enabled() and x.requires_grad:
            _RotaryInplace.apply(x, cos, sin, offsets, offset, interleaved)
        else:
            _rotary_(x, cos, sin, offsets, offset, interleaved)
        return original
    out = _rotary(x, cos, sin, offsets, offset, interleaved, False)
    return out.transpose(1, 2) if layout == "bhnd" else out


def _describe_call(x, cos, sin, **kwargs) -> dict:
    keys = ("interleaved", "seqlen_offsets", "inplace", "layout")
    defaults = dict(interleaved=False, seqlen_offsets=0, inplace=False, layout="bnhd")
    x = _validated(x, cos, sin, *(kwargs.get(k, defaults[k]) for k in keys))[0]
    return _describe_tensors(x)


_dispatch.register_describer("rotary", _describe_call)
