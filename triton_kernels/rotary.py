"""Rotary position embedding (RoPE) in Triton: one kernel serves the forward,
the backward (`CONJUGATE`: rotation by the opposite angle) and the in-place
form (OUT is X). Semantics as attnkit.reference.rotary (FlashAttention's):
x (B, N, H, D) with any strides, or packed (total, H, D) with cu_seqlens
(VARLEN: a zero batch stride, each sequence starting at its cu_seqlens row),
cos/sin (S, R/2) or (B, S, R/2), the first R dims rotated, rows at positions
outside [0, S) left as they are.

A program takes BLOCK_M rows of one sequence and BLOCK_H heads: it loads the
cos/sin rows once and reuses them for every head. Each output element needs
its own value and its pair partner's (i +- R/2, or i ^ 1 interleaved), so both
are loaded with the same contiguous tile shape and combined as
out = x * cos + partner * (+-sin); dims past R get cos = 1, sin = 0.
"""
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    OUT, X, COS, SIN, OFFSETS, CU_SEQLENS,
    stride_ob, stride_on, stride_oh, stride_od, stride_xb, stride_xn, stride_xh, stride_xd,
    stride_cb, stride_cn, seqlen, heads, seqlen_ro, offset,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, STORE_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    OFFSETS_TENSOR: tl.constexpr, VARLEN: tl.constexpr, COMPUTE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b * stride may pass 2^31 elements
    pid_h = tl.program_id(2)
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - start
        X += start.to(tl.int64) * stride_xn
        OUT += start.to(tl.int64) * stride_on
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if OFFSETS_TENSOR:
        shift = tl.load(OFFSETS + b).to(tl.int32)
    else:
        shift = offset
    positions = rows + shift
    if INTERLEAVED:  # pairs (2i, 2i + 1), angle i
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
        freq = offs_d // 2
    else:  # pairs (i, i + R/2), angle i
        first = offs_d < ROTARY_DIM // 2
        partner = tl.where(first, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
        freq = tl.where(first, offs_d, offs_d - ROTARY_DIM // 2)
    row_ok = rows < seqlen
    rotate = (row_ok & (positions >= 0) & (positions < seqlen_ro))[:, None] & (offs_d < ROTARY_DIM)[None, :]
    table = b * stride_cb + positions[:, None] * stride_cn + freq[None, :]
    cos = tl.load(COS + table, mask=rotate, other=1.0).to(COMPUTE)
    sin = tl.load(SIN + table, mask=rotate, other=0.0).to(COMPUTE)
    # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): the first of a pair takes -sin.
    sign = tl.where(first, -1.0, 1.0)
    if CONJUGATE:
        sign = -sign
    sin = sin * sign[None, :].to(COMPUTE)
    keep = row_ok[:, None] & (offs_d < STORE_DIM)[None, :]
    for i in range(BLOCK_H):
        h = pid_h * BLOCK_H + i
        head_ok = h < heads
        x_row = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn
        x = tl.load(x_row + offs_d[None, :] * stride_xd, mask=keep & head_ok, other=0.0).to(COMPUTE)
        pair = tl.load(x_row + partner[None, :] * stride_xd, mask=rotate & head_ok, other=0.0).to(COMPUTE)
        out = x * cos + pair * sin
        o_row = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
        tl.store(o_row + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty), mask=keep & head_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rotary(x, cos, sin, offsets, offset: int, interleaved: bool, conjugate: bool, out, cu_seqlens=None,
           max_seqlen: int = 0, launch=None):
    """Writes x rotated into `out` (which may be x itself: in place).

    x, out (B, N, H, D), or (total, H, D) with int32 cu_seqlens (B + 1,) and max_seqlen; any
    strides. cos, sin (S, R/2) or (B, S, R/2) with the last dim contiguous; offsets int32/int64
    (B,) or None (then every sequence starts at `offset`).
    `launch(kernel, grid, args, kwargs)` replaces the launch (compile_check).
    """
    varlen = cu_seqlens is not None
    if varlen:  # a zero batch stride: the kernel adds each sequence's start row
        batch, seqlen, (heads, head_dim) = cu_seqlens.numel() - 1, max_seqlen, x.shape[1:]
        x_strides, out_strides = (0, *x.stride()), (0, *out.stride())
    else:
        batch, seqlen, heads, head_dim = x.shape
        x_strides, out_strides = x.stride(), out.stride()
    rotary_dim = 2 * cos.shape[-1]
    if x.numel() == 0 or seqlen == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreting():  # few, large programs: each costs Python time there
        block_m, block_h = max(16, min(64, triton.next_power_of_2(seqlen))), max(1, heads)
    else:
        block_m, block_h = (4 if block_d > 128 else 8), 4
    grid = (triton.cdiv(seqlen, block_m), batch, triton.cdiv(heads, block_h))
    batched = cos.dim() == 3
    args = (
        out, x, cos, sin, offsets if offsets is not None else cos, cu_seqlens if varlen else cos,
        *out_strides, *x_strides, cos.stride(0) if batched else 0, cos.stride(-2),
        seqlen, heads, cos.shape[-2], offset,
    )
    kwargs = dict(
        HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, STORE_DIM=rotary_dim if out is x else head_dim,
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_H=block_h, INTERLEAVED=interleaved, CONJUGATE=conjugate,
        OFFSETS_TENSOR=offsets is not None, VARLEN=varlen,
        COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )
    if launch is None:
        _rotary_kernel[grid](*args, **kwargs)
    else:
        launch(_rotary_kernel, grid, args, kwargs)
    return out
