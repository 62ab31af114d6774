"""Implementations of attention (dense and varlen). Every backend honours one contract:

forward(call) -> (out, lse)            lse fp32 (fp64 for fp64 inputs), -inf for empty rows;
                                       dense (B, H, Nq), varlen (H, total_q)
backward(call, grad_out, out, lse) -> (dq, dk, dv, d_mask)
                                       d_mask: None, or with call.mask_grad the additive
                                       mask's gradient (B, H, Nq, Nk) in lse's dtype

where `call` is an AttentionCall holding validated, normalized arguments.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from .. import _extensions
from .._dispatch import Implementation, Op
from . import triton_dot_refuses
from .decode import CPP_DTYPES as decode_cpp_dtypes
from ..reference import attention as ref

MAX_HEAD_DIM = 256
MAX_GRID_AXIS = 65535


@dataclasses.dataclass
class AttentionCall:
    q: Tensor
    k: Tensor
    v: Tensor
    cu_seqlens_q: Optional[Tensor]  # int32 (B+1,) for varlen, else None
    cu_seqlens_k: Optional[Tensor]
    max_seqlen_q: int
    max_seqlen_k: int
    attn_mask: Optional[Tensor]  # bool or float, expanded (stride 0) to (B, H, Nq, Nk)
    key_padding_mask: Optional[Tensor]  # bool (B, Nk), True = padding
    window: Tuple[int, int]
    bottom_right: bool
    softcap: float
    scale: float
    dropout_p: float
    seed: int
    alibi_slopes: Optional[Tensor] = None  # fp32 (B, H) contiguous: bias -slope * |j - (i + diag)|
    rotary_cos: Optional[Tensor] = None  # (max_position, rotary_dim / 2), contiguous; RoPE fused when given
    rotary_sin: Optional[Tensor] = None
    rotary_offsets: Optional[Tensor] = None  # int32 (B,): position of each sequence's first key
    rotary_interleaved: bool = False
    mask_grad: bool = False  # backward: also the gradient of the (floating, dense) attn_mask

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    def describe(self) -> dict:
        return describe(self.q, self.v, self.varlen, self.rotary_cos is not None, self.batch)


def describe(q: Tensor, v: Tensor, varlen: bool, rotary: bool = False, batch: int = 0) -> dict:
    return {"device": q.device, "dtype": q.dtype, "head_dim": q.shape[-1], "head_dim_v": v.shape[-1], "varlen": varlen,
            "rotary": rotary, "batch": batch}


class Triton(Implementation):
    backend = "triton"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        head_dim = max(call.get("head_dim", 0), call.get("head_dim_v", 0))
        if head_dim > MAX_HEAD_DIM:
            return [f"head dim {head_dim} > {MAX_HEAD_DIM}"]
        if call.get("batch", 0) > MAX_GRID_AXIS:  # the sequences are the grid's z axis (CUDA's limit)
            return [f"{call['batch']} sequences > {MAX_GRID_AXIS}"]
        refused = triton_dot_refuses(call["dtype"])
        return [refused] if refused else []

    @staticmethod
    def _kwargs(c: AttentionCall) -> dict:
        mask = c.attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)  # same bytes; Triton loads uint8 more portably than i1
        pad = c.key_padding_mask.view(torch.uint8) if c.key_padding_mask is not None else None
        return dict(
            cu_q=c.cu_seqlens_q, cu_k=c.cu_seqlens_k, max_q=c.max_seqlen_q, max_k=c.max_seqlen_k, mask=mask, pad=pad,
            bottom_right=c.bottom_right, window=c.window, softcap=c.softcap, scale=c.scale, dropout_p=c.dropout_p,
            seed=c.seed, alibi_slopes=c.alibi_slopes,
            rotary=None if c.rotary_cos is None else (c.rotary_cos, c.rotary_sin, c.rotary_offsets, c.rotary_interleaved),
        )

    def forward(self, c: AttentionCall):
        from ..triton_kernels import flash_attention_launch as launch

        return launch.forward(c.q, c.k, c.v, **self._kwargs(c))

    def backward(self, c: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor):
        from ..triton_kernels import flash_attention_launch as launch

        return launch.backward(grad_out, c.q, c.k, c.v, out, lse, mask_grad=c.mask_grad, **self._kwargs(c))


class Cpp(Implementation):
    """csrc/cpu/attention.cpp: tiled flash attention in C++ (attnkit._C); with fused RoPE,
    q and k are rotated inside the kernels where they are already copied (Q tiles, K^T, the
    backward's transposed operands) and dq, dk rotated back where they are written
    (csrc/cpu/attention_rope.h)."""

    backend = "cpp"
    extension = "_C"

    @staticmethod
    def _args(c: AttentionCall) -> tuple:
        args = (c.cu_seqlens_q, c.cu_seqlens_k, c.max_seqlen_q, c.max_seqlen_k, c.attn_mask, c.key_padding_mask,
                c.alibi_slopes, c.window[0], c.window[1], c.bottom_right, c.softcap, c.scale, c.dropout_p, c.seed)
        if c.rotary_cos is None:
            return args
        return args + (c.rotary_cos, c.rotary_sin, c.rotary_offsets, c.rotary_interleaved)

    def forward(self, c: AttentionCall):
        ext, _ = _extensions.load(self.extension)
        if _decode_kernel_suits(c):
            if c.varlen:
                return tuple(ext.attention_decode_varlen_forward(c.q, c.k, c.v, c.cu_seqlens_q, c.cu_seqlens_k,
                                                                 c.scale, c.softcap, c.window[0], c.alibi_slopes))
            lengths = torch.full((c.q.shape[0],), c.k.shape[2], dtype=torch.int32)
            return tuple(ext.attention_decode_forward(c.q, c.k, c.v, lengths, c.scale, c.softcap, c.window[0],
                                                      c.alibi_slopes, c.attn_mask, c.key_padding_mask))
        kernel = ext.attention_forward if c.rotary_cos is None else ext.attention_rotary_forward
        return tuple(kernel(c.q, c.k, c.v, *self._args(c)))

    def backward(self, c: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor):
        ext, _ = _extensions.load(self.extension)
        kernel = ext.attention_backward if c.rotary_cos is None else ext.attention_rotary_backward
        grads = tuple(kernel(grad_out, c.q, c.k, c.v, out, lse, *self._args(c), c.mask_grad))
        return grads if c.mask_grad else grads + (None,)


def _decode_kernel_suits(c: AttentionCall) -> bool:
    """Whether the cpp forward of this call runs the decoding kernel (csrc/cpu/attention_decode.cpp)
    rather than the tiled one: a few queries against the keys, with what that kernel has (masks
    and key padding, no dropout or RoPE; float32, float16, bfloat16). Packed (varlen) calls take
    it when every sequence has the same few queries (a decoding step over a packed batch).
    Each of its rows reads its keys once, with no K^T formed per call: measured here 1.5-15x
    faster than the tiles for one query, and for up to 8 (bottom-right causal) while Nk >= 512 Nq;
    slower beyond. Its lse is the tiles', so the backward is the same."""
    if c.varlen:  # max_seqlen_q is an upper bound: every sequence has exactly it when they sum to total_q
        n_q, n_k = c.max_seqlen_q, c.max_seqlen_k
        if n_q == 0 or c.q.shape[0] != c.batch * n_q:
            return False
    else:
        n_q, n_k = c.q.shape[2], c.k.shape[2]
    if not (n_q <= 2 or (n_q <= 8 and n_k >= 512 * n_q)):
        return False
    if c.dropout_p > 0 or c.rotary_cos is not None:
        return False
    if c.q.dtype not in decode_cpp_dtypes:
        return False
    left, right = c.window
    if n_q == 1:  # bottom-right, one query sees every key up to its position: causal or not
        return c.bottom_right or (left < 0 and right < 0 and c.alibi_slopes is None)  # top-left: at key 0
    return c.bottom_right and right == 0  # the decoding kernel's rows are causal, bottom-right


class Reference(Implementation):
    backend = "reference"

    @staticmethod
    def _sequences(c: AttentionCall, *extra: Tensor):
        """Per sequence: (q, k, v, *extra, options) as dense (1, H, n, D) tensors."""
        keep = None
        if c.dropout_p > 0:
            keep = ref.dropout_keep_mask(c.seed, c.batch, c.q.shape[1], c.max_seqlen_q, c.max_seqlen_k, c.dropout_p,
                                         c.q.device)
        options = dict(window=c.window, bottom_right=c.bottom_right, softcap=c.softcap, scale=c.scale,
                       dropout_p=c.dropout_p)
        if not c.varlen:
            n_q, n_k = c.q.shape[2], c.k.shape[2]
            yield (c.q, c.k, c.v, *extra), dict(options, attn_mask=c.attn_mask, key_padding_mask=c.key_padding_mask,
                                                 dropout_keep=None if keep is None else keep[:, :, :n_q, :n_k],
                                                 alibi_slopes=c.alibi_slopes)
            return
        cu_q, cu_k = c.cu_seqlens_q, c.cu_seqlens_k
        parts = [ref.split_varlen(t, cu_q) for t in (c.q, *extra)]
        kv = [ref.split_varlen(t, cu_k) for t in (c.k, c.v)]
        for b in range(c.batch):
            q_b, *extra_b = (p[b] for p in parts)
            n_q, n_k = q_b.shape[2], kv[0][b].shape[2]
            seq_keep = None if keep is None else keep[b : b + 1, :, :n_q, :n_k]
            slopes = None if c.alibi_slopes is None else c.alibi_slopes[b : b + 1]
            yield (q_b, kv[0][b], kv[1][b], *extra_b), dict(options, dropout_keep=seq_keep, alibi_slopes=slopes)

    @staticmethod
    def _rotated(c: AttentionCall, b: int, q: Tensor, k: Tensor, inverse: bool = False):
        """q, k of sequence b rotated (or rotated back) by the fused RoPE, if any."""
        if c.rotary_cos is None:
            return q, k
        offsets = (c.rotary_offsets[b : b + 1] if c.varlen else c.rotary_offsets).long()[:, None]
        diag = k.shape[2] - q.shape[2] if c.bottom_right else 0
        positions_q = torch.arange(q.shape[2], device=q.device)[None, :] + diag + offsets
        positions_k = torch.arange(k.shape[2], device=k.device)[None, :] + offsets
        spin = dict(interleaved=c.rotary_interleaved, inverse=inverse)
        return (ref.rotate(q, c.rotary_cos, c.rotary_sin, positions_q, **spin),
                ref.rotate(k, c.rotary_cos, c.rotary_sin, positions_k, **spin))

    def forward(self, c: AttentionCall):
        outs, lses = [], []
        for b, ((q, k, v), options) in enumerate(self._sequences(c)):
            q, k = self._rotated(c, b, q, k)
            out, lse = ref.attention(q, k, v, **options)
            outs.append(out)
            lses.append(lse)
        if not c.varlen:
            return outs[0], lses[0].to(_stat_dtype(c.q))
        return ref.join_varlen(outs), torch.cat([x.squeeze(0) for x in lses], dim=1).to(_stat_dtype(c.q))

    def backward(self, c: AttentionCall, grad_out: Tensor, out: Tensor, lse: Tensor):
        grads = []
        for b, ((q, k, v, do, o), options) in enumerate(self._sequences(c, grad_out, out)):
            q, k = self._rotated(c, b, q, k)
            dq, dk, dv, *d_mask = ref.attention_backward(do, q, k, v, o, mask_grad=c.mask_grad, **options)
            dq, dk = self._rotated(c, b, dq, dk, inverse=True)
            grads.append((dq, dk, dv))
        if not c.varlen:  # (a mask gradient needs a dense call: only one sequence)
            return grads[0] + (d_mask[0] if d_mask else None,)
        dq = ref.join_varlen([g[0] for g in grads])
        dk = ref.join_varlen([g[1] for g in grads])
        dv = ref.join_varlen([g[2] for g in grads])
        return dq, dk, dv, None


def _stat_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


ATTENTION = Op("flash_attention", [Triton(), Cpp(), Reference()])
