"""Drop-in `torch.nn.MultiheadAttention` running attnkit.ops.flash_attention.

A subclass: constructor arguments, parameters (in_proj_weight or q/k/v_proj_weight,
in_proj_bias, out_proj, bias_k/bias_v), state_dict and initialisation are torch.nn's.
The projections run in PyTorch; the attention runs in attnkit's kernel.

Differences from torch.nn.MultiheadAttention, all deliberate:
- need_weights=True (torch's default) computes the weights separately with explicit
  softmax(q k^T) math (the slow path, O(L*S) memory); the output still comes from the
  kernel, except in training with dropout, where it comes from the returned (dropped)
  weights so that the two agree. Pass need_weights=False for speed.
- A query row that may attend to no key gives output 0 (and weights 0), not NaN.
- is_causal=True applies a top-left causal mask (query i sees keys j <= i, as torch)
  in the kernel; an attn_mask passed with it is trusted to be that mask (torch's hint)
  and not read. Unlike torch, is_causal=True without attn_mask is accepted. With
  add_bias_kv / add_zero_attn, as torch: need_weights=True or a key_padding_mask reads
  attn_mask (the causal one if none), padded so every query sees the extra keys; otherwise
  the causal mask spans all keys, extra ones included (torch's SDPA path).
- Dropout in the kernel (need_weights=False) draws from attnkit's Philox stream, not
  torch's; with need_weights=True the returned weights are dropped by F.dropout, as torch's
  (the same seed gives the same output). dropout=1.0 drops everything, as torch.
- NestedTensor input goes to torch's own forward (only its inference fast path takes it).

Extras torch lacks (keyword-only): num_kv_heads (GQA: K/V projections produce
num_kv_heads heads; separate q/k/v_proj_weight parameters even when kdim == vdim ==
embed_dim, in_proj_bias of size embed_dim + 2 * num_kv_heads * head_dim, so the
state_dict differs from torch's), window_size (left, right), alibi (True: the
ALiBi slopes of attnkit.nn.alibi_slopes) and rotary (True or a RotaryEmbedding:
RoPE fused into the kernel; query i and key j at positions i and j).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter

from .. import _validate
from ..backends.attention import MAX_HEAD_DIM
from ..ops.attention import flash_attention, flash_attention_varlen
from ..ops.rotary import apply_rotary
from ._share import check_from_torch, shared
from .positional import RotaryEmbedding, alibi_slopes, refilled


def _mask_dtype_check(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.nn's mask convention as an additive float mask: bool True (not allowed) -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _kernel_p(dropout_p: float) -> float:
    """The kernels take p < 1; dropout=1.0 (every weight dropped, which torch.nn allows) runs
    them without dropout and `_all_dropped` zeroes the result."""
    return 0.0 if dropout_p >= 1.0 else dropout_p


def _all_dropped(out: Tensor, dropout_p: float) -> Tensor:
    return out * 0.0 if dropout_p >= 1.0 else out  # zero values and gradients, on the graph


class MultiheadAttention(torch.nn.MultiheadAttention):
    __doc__ = __doc__  # the module's: the deliberate differences from torch's and the extras

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 num_kv_heads: Optional[int] = None, window_size: Sequence[int] = (-1, -1), alibi: bool = False,
                 rotary: Union[bool, RotaryEmbedding, None] = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device=device, dtype=dtype)
        self._init_extras(num_kv_heads, window_size, alibi, rotary)
        if self.num_kv_heads != num_heads:
            self._make_gqa_projections(bias, add_bias_kv, device, dtype)

    def _init_extras(self, num_kv_heads=None, window_size=(-1, -1), alibi=False, rotary=None) -> None:
        num_kv_heads = self.num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 or \
                self.num_heads % num_kv_heads:
            raise ValueError(f"MultiheadAttention: num_kv_heads must be a positive divisor of num_heads "
                             f"({self.num_heads}), got {num_kv_heads!r}")
        if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or \
                any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window_size):
            raise ValueError(f"MultiheadAttention: window_size must be a pair of ints >= -1, got {window_size!r}")
        positional = bool(alibi) or tuple(window_size) != (-1, -1) or bool(rotary)
        if positional and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError("MultiheadAttention: window_size, alibi and rotary give keys positions; they cannot be "
                             "combined with add_bias_kv or add_zero_attn, whose extra keys have none")
        self.num_kv_heads = num_kv_heads
        self.window_size = tuple(int(w) for w in window_size)
        self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads, device=self.out_proj.weight.device)
                             if alibi else None, persistent=False)
        if rotary is True:
            rotary = RotaryEmbedding(self.head_dim, device=self.out_proj.weight.device)
        elif rotary is False:
            rotary = None
        if rotary is not None and not isinstance(rotary, RotaryEmbedding):
            raise TypeError(f"MultiheadAttention: rotary must be a bool or a RotaryEmbedding, got {type(rotary).__name__}")
        if rotary is not None and rotary.dim > self.head_dim:
            raise ValueError(f"MultiheadAttention: rotary dim {rotary.dim} exceeds the head dim {self.head_dim}")
        self.rotary = rotary

    def _make_gqa_projections(self, bias, add_bias_kv, device, dtype) -> None:
        """Separate q/k/v projections, K and V of num_kv_heads * head_dim features."""
        kw = {"device": device, "dtype": dtype}
        kv = self.num_kv_heads * self.head_dim
        self._qkv_same_embed_dim = False
        self.in_proj_weight = None
        self.q_proj_weight = Parameter(torch.empty(self.embed_dim, self.embed_dim, **kw))
        self.k_proj_weight = Parameter(torch.empty(kv, self.kdim, **kw))
        self.v_proj_weight = Parameter(torch.empty(kv, self.vdim, **kw))
        self.in_proj_bias = Parameter(torch.empty(self.embed_dim + 2 * kv, **kw)) if bias else None
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty(1, 1, kv, **kw))
            self.bias_v = Parameter(torch.empty(1, 1, kv, **kw))
        self._reset_parameters()

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """An attnkit MultiheadAttention sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, torch.nn.MultiheadAttention)
        new = shared(cls, module)
        if not isinstance(module, MultiheadAttention):
            new._init_extras()
        return new

    def __setstate__(self, state):
        super().__setstate__(state)
        if "num_kv_heads" not in self.__dict__:  # pickled as a torch.nn.MultiheadAttention
            self._init_extras()

    # -- projections ----------------------------------------------------------------------------

    def _biases(self):
        if self.in_proj_bias is None:
            return None, None, None
        kv = self.num_kv_heads * self.head_dim
        return self.in_proj_bias.split([self.embed_dim, kv, kv])

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same_qkv: bool, same_kv: bool):
        """q (..., E), k/v (..., num_kv_heads * head_dim): torch's _in_projection(_packed)."""
        b_q, b_k, b_v = self._biases()
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if same_qkv:
                return F.linear(query, w, self.in_proj_bias).chunk(3, dim=-1)
            w_q, w_kv = w.split([self.embed_dim, 2 * self.embed_dim])
            q = F.linear(query, w_q, b_q)
            if same_kv:
                b_kv = None if self.in_proj_bias is None else self.in_proj_bias[self.embed_dim:]
                k, v = F.linear(key, w_kv, b_kv).chunk(2, dim=-1)
                return q, k, v
            w_k, w_v = w_kv.chunk(2)
            return q, F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                F.linear(value, self.v_proj_weight, b_v))

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.alibi_slopes is not None:  # computed, not loaded: refilled after to_empty (positional.refilled)
            self.alibi_slopes = refilled(self.alibi_slopes, alibi_slopes(self.num_heads))
        return module

    def _rotary_tables(self, length: int, device):
        if self.rotary is None:
            return None, None
        return self.rotary.cos_sin(length, device)

    def _slopes(self):
        if self.alibi_slopes is None:
            return None
        if self.alibi_slopes.is_meta and not self.out_proj.weight.is_meta:
            # load_state_dict(assign=True) after meta-device construction refills no computed buffer
            self.alibi_slopes = alibi_slopes(self.num_heads, device=self.out_proj.weight.device)
        return self.alibi_slopes.float()

    # -- forward --------------------------------------------------------------------------------

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        _mask_dtype_check(key_padding_mask, "key_padding_mask")
        _mask_dtype_check(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=2)
        same_qkv, same_kv = query is key and key is value, key is value
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask, is_causal,
                                    same_qkv, same_kv)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, same_qkv, same_kv):
        """Batch-first (B, L, E) query, (B, S, kdim/vdim) key/value -> (B, L, E), weights (B, H, L, S') or None."""
        batch, tgt_len, embed = query.shape
        src_len = key.shape[1]
        if embed != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed}")
        if not self._qkv_same_embed_dim:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's "
                                     f"{tuple(value.shape[:2])}")
        elif key.shape != value.shape:
            raise AssertionError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        # Before the projections, which would fail with a bare matmul shape error (torch's own check:
        # RuntimeError with packed weights, AssertionError with separate ones; this is both).
        for name, tensor, dim_name, width in (("key", key, "kdim", self.kdim), ("value", value, "vdim", self.vdim)):
            if tensor.shape[-1] != width:
                raise _validate.DropInShapeError(f"MultiheadAttention: expected {name} with last dimension "
                                                 f"{dim_name}={width}, but got {tensor.shape[-1]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, src_len):
            raise AssertionError(f"Expected key_padding_mask of shape {(batch, src_len)} (N, S), "
                                 f"but got {tuple(key_padding_mask.shape)}")
        mask = self._attn_mask_4d(attn_mask, batch, tgt_len, src_len)
        has_bias_kv = self.bias_k is not None and self.bias_v is not None
        extra = int(has_bias_kv) + int(self.add_zero_attn)
        if is_causal and extra and (need_weights or key_padding_mask is not None):
            # torch then reads attn_mask, padded like any mask so that every query sees the extra
            # key(s); a causal flag would span the S + extra keys and hide them from queries i < S.
            if mask is None:
                mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=query.device).triu(1)[None, None]
            is_causal = False
        elif is_causal:
            # The hint: attn_mask is the causal mask, applied in the kernel instead. With extra keys
            # this is torch's SDPA path (no weights, no padding mask): causal over all S + extra keys.
            mask = None

        q, k, v = self._project(query, key, value, same_qkv, same_kv)
        if has_bias_kv:
            # In k's dtype: under autocast the projections are in its dtype, the Parameters not
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(batch, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[-1])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[-1])], dim=1)

        # Kernel masks: bool True = attend (torch.nn's bool means the opposite), float added.
        pad = key_padding_mask
        if pad is not None and pad.dtype != torch.bool:
            pad = pad.view(batch, 1, 1, src_len)
            mask = pad if mask is None else _additive(mask, q.dtype) + pad
            pad = None
        elif mask is not None and mask.dtype == torch.bool:
            mask = ~mask
        if extra:
            if mask is not None:
                mask = F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)
            if pad is not None:
                pad = F.pad(pad, (0, extra), value=False)

        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = q.view(batch, tgt_len, heads, dim).transpose(1, 2)
        k = k.view(batch, k.shape[1], kv_heads, dim).transpose(1, 2)
        v = v.view(batch, v.shape[1], kv_heads, dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights or dim > MAX_HEAD_DIM:  # the slow path: explicit softmax(q k^T) weights
            weights = self._weights(q, k, mask, pad, is_causal)
            if dropout_p > 0 or dim > MAX_HEAD_DIM:
                weights = F.dropout(weights, dropout_p) if dropout_p > 0 else weights
                out = weights @ (v if kv_heads == heads else v.repeat_interleave(heads // kv_heads, dim=1))
                return self._output(out, batch, tgt_len), weights if need_weights else None
        cos, sin = self._rotary_tables(max(tgt_len, k.shape[2]), q.device)
        out = flash_attention(q, k, v, causal=is_causal, causal_alignment="top_left", attn_mask=mask,
                              key_padding_mask=pad, window_size=self.window_size, dropout_p=_kernel_p(dropout_p),
                              alibi_slopes=self._slopes(), rotary_cos=cos, rotary_sin=sin,
                              rotary_interleaved=self.rotary is not None and self.rotary.interleaved)
        return self._output(_all_dropped(out, dropout_p), batch, tgt_len), weights

    def _output(self, out: Tensor, batch: int, tgt_len: int) -> Tensor:
        out = out.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    def _attn_mask_4d(self, attn_mask, batch, tgt_len, src_len) -> Optional[Tensor]:
        """torch.nn's (L, S) or (B * H, L, S) attn_mask as a (1, 1, L, S) or (B, H, L, S) view."""
        if attn_mask is None:
            return None
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            return attn_mask.view(1, 1, tgt_len, src_len)
        if attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (batch * self.num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(batch * self.num_heads, tgt_len, src_len)}.")
            return attn_mask.view(batch, self.num_heads, tgt_len, src_len)
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    def _weights(self, q: Tensor, k: Tensor, mask: Optional[Tensor], pad: Optional[Tensor], causal: bool) -> Tensor:
        """softmax weights (B, H, L, S') with every mask and extra of the kernel call, as plain PyTorch."""
        heads, n_q, n_k = q.shape[1], q.shape[2], k.shape[2]
        if self.rotary is not None:  # one table for both, as the kernel call's (dynamic NTK scales by its length)
            cos, sin = self._rotary_tables(max(n_q, n_k), q.device)
            q, k = (apply_rotary(t, cos, sin, interleaved=self.rotary.interleaved, layout="bhnd") for t in (q, k))
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        rel = torch.arange(n_k, device=q.device)[None, :] - torch.arange(n_q, device=q.device)[:, None]
        if self.alibi_slopes is not None:
            scores = scores - self._slopes().to(scores.dtype)[:, None, None] * rel.abs().to(scores.dtype)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.to(scores.dtype)  # weights in q's dtype, as torch (autocast: its dtype)
        hidden = torch.zeros(n_q, n_k, dtype=torch.bool, device=q.device)
        left, right = self.window_size
        if causal:
            right = 0 if right < 0 else min(right, 0)
        if left >= 0:
            hidden |= rel < -left
        if right >= 0:
            hidden |= rel > right
        hidden = hidden.expand_as(scores)
        if mask is not None and mask.dtype == torch.bool:
            hidden = hidden | ~mask
        if pad is not None:
            hidden = hidden | pad[:, None, None, :]
        scores = scores.masked_fill(hidden, float("-inf"))
        # Rows with no visible key: 0 weights (and gradients), not NaN.
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)

    # -- packed (varlen) self-attention, used by TransformerEncoder for padded batches ----------

    def packed_self_attention(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool = False) -> Tensor:
        """Self-attention over packed tokens x (total, E) of sequences delimited by int32
        cu_seqlens, through flash_attention_varlen; positions restart at 0 in each sequence."""
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("MultiheadAttention.packed_self_attention: add_bias_kv / add_zero_attn are not supported")
        q, k, v = self._project(x, x, x, True, True)
        total = x.shape[0]
        q = q.view(total, self.num_heads, self.head_dim)
        k = k.view(total, self.num_kv_heads, self.head_dim)
        v = v.view(total, self.num_kv_heads, self.head_dim)
        cos, sin = self._rotary_tables(max_seqlen, x.device)
        dropout_p = self.dropout if self.training else 0.0
        out = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                     window_size=self.window_size, dropout_p=_kernel_p(dropout_p),
                                     alibi_slopes=self._slopes(), rotary_cos=cos, rotary_sin=sin,
                                     rotary_interleaved=self.rotary is not None and self.rotary.interleaved)
        out = _all_dropped(out, dropout_p)
        return F.linear(out.reshape(total, self.embed_dim), self.out_proj.weight, self.out_proj.bias)

    def extra_repr(self) -> str:
        extras = []
        if self.num_kv_heads != self.num_heads:
            extras.append(f"num_kv_heads={self.num_kv_heads}")
        if self.window_size != (-1, -1):
            extras.append(f"window_size={self.window_size}")
        if self.alibi_slopes is not None:
            extras.append("alibi=True")
        return ", ".join(extras)
