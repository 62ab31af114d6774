"""Rotary position embedding (RoPE) in Triton: one kernel serves the forward,
the backward (`CONJUGATE`: rotation by the opposite angle) and the in-place
form (OUT is X). Semantics as attnkit.reference.rotary (FlashAttention's):
x (B, N, H, D) with any strides, or packed (total, H, D) with cu_seqlens
(VARLEN: a zero batch stride, each sequence starting at its cu_seqlens row),
cos/sin (S, R/2) or (B, S, R/2), the first R dims rotated, rows at positions
outside [0, S) left as they are.

A program takes BLOCK_M rows of one sequence and BLOCK_H heads: it loads the
cos/sin rows once and reuses them for every head. Tiles run over the pair
index k < R/2: one thread loads both members of a pair (k and k + R/2, or 2k
and 2k + 1) and stores both results, so rotating in place never races with
another thread reading the old value. Out of place, dims R..D are copied.
"""
import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2, on_tensors_device
from .._dispatch import interpreter_active as _interpreting


@triton.jit
def _rotary_kernel(
    OUT, X, COS, SIN, OFFSETS, CU_SEQLENS,
    stride_ob, stride_on, stride_oh, stride_od, stride_xb, stride_xn, stride_xh, stride_xd,
    stride_cb, stride_cn, seqlen, heads, seqlen_ro, offset, m_blocks,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr,
    OFFSETS_TENSOR: tl.constexpr, VARLEN: tl.constexpr, COMPUTE: tl.constexpr,
):
    # (row block, sequence) on grid axis 0, whose limit is 2^31 - 1 (axes 1 and 2: 65535)
    pid_m = tl.program_id(0) % m_blocks
    b = (tl.program_id(0) // m_blocks).to(tl.int64)  # b * stride may pass 2^31 elements
    pid_h = tl.program_id(1)
    if VARLEN:
        start = tl.load(CU_SEQLENS + b)
        seqlen = tl.load(CU_SEQLENS + b + 1) - start
        X += start.to(tl.int64) * stride_xn
        OUT += start.to(tl.int64) * stride_on
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if OFFSETS_TENSOR:
        shift = tl.load(OFFSETS + b).to(tl.int32)
    else:
        shift = offset
    positions = rows + shift
    k = tl.arange(0, BLOCK_K)  # pair index = angle index
    if INTERLEAVED:
        first, second = 2 * k, 2 * k + 1
    else:
        first, second = k, k + ROTARY_DIM // 2
    pair_ok = (rows < seqlen)[:, None] & (k < ROTARY_DIM // 2)[None, :]
    in_table = pair_ok & ((positions >= 0) & (positions < seqlen_ro))[:, None]
    table = b * stride_cb + positions[:, None] * stride_cn + k[None, :]
    cos = tl.load(COS + table, mask=in_table, other=1.0).to(COMPUTE)  # outside the table: identity
    sin = tl.load(SIN + table, mask=in_table, other=0.0).to(COMPUTE)
    if CONJUGATE:
        sin = -sin
    for i in range(BLOCK_H):
        h = pid_h * BLOCK_H + i
        ok = pair_ok & (h < heads)
        x_row = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn
        o_row = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
        x0 = tl.load(x_row + first[None, :] * stride_xd, mask=ok, other=0.0).to(COMPUTE)
        x1 = tl.load(x_row + second[None, :] * stride_xd, mask=ok, other=0.0).to(COMPUTE)
        tl.store(o_row + first[None, :] * stride_od, (x0 * cos - x1 * sin).to(OUT.dtype.element_ty), mask=ok)
        tl.store(o_row + second[None, :] * stride_od, (x0 * sin + x1 * cos).to(OUT.dtype.element_ty), mask=ok)
        if BLOCK_TAIL > 0:  # out of place with rotary_dim < head dim: copy the rest
            tail = ROTARY_DIM + tl.arange(0, BLOCK_TAIL)
            tail_ok = (rows < seqlen)[:, None] & (tail < HEAD_DIM)[None, :] & (h < heads)
            rest = tl.load(x_row + tail[None, :] * stride_xd, mask=tail_ok)
            tl.store(o_row + tail[None, :] * stride_od, rest, mask=tail_ok)


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
    block_k = max(16, next_power_of_2(rotary_dim // 2))
    copy_tail = out is not x and rotary_dim < head_dim
    block_tail = max(16, next_power_of_2(head_dim - rotary_dim)) if copy_tail else 0
    if _interpreting():  # few, large programs: each costs Python time there
        block_m, block_h = max(16, min(64, next_power_of_2(seqlen))), max(1, heads)
    else:
        block_m, block_h = (4 if block_k > 64 else 8), 4
    m_blocks = cdiv(seqlen, block_m)
    grid = (m_blocks * batch, cdiv(heads, block_h))
    batched = cos.dim() == 3
    args = (
        out, x, cos, sin, offsets if offsets is not None else cos, cu_seqlens if varlen else cos,
        *out_strides, *x_strides, cos.stride(0) if batched else 0, cos.stride(-2),
        seqlen, heads, cos.shape[-2], offset, m_blocks,
    )
    kwargs = dict(
        HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, BLOCK_K=block_k, BLOCK_TAIL=block_tail, BLOCK_M=block_m,
        BLOCK_H=block_h, INTERLEAVED=interleaved, CONJUGATE=conjugate, OFFSETS_TENSOR=offsets is not None,
        VARLEN=varlen, COMPUTE=tl.float64 if x.dtype == torch.float64 else tl.float32,
    )
    if launch is None:
        with on_tensors_device(args):
            _rotary_kernel[grid](*args, **kwargs)
    else:
        launch(_rotary_kernel, grid, args, kwargs)
    return out
