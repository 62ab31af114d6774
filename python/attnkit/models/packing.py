"""Unpadding: a padded (B, N) batch becomes the packed real tokens plus cu_seqlens, so
that every layer (and flash_attention_varlen) works on real tokens only, as
FlashAttention's BERT does; `unpack` re-pads with zeros at the end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Packing:
    batch: int
    length: int
    index: Optional[Tensor]  # flat (B * N) indices of the real tokens; None when nothing is padded
    cu_seqlens: Tensor  # int32 (B + 1,)
    max_seqlen: int
    # Set by with_first_tokens: the packed tokens that are keys (the others are queries only).
    keys: Optional[Tensor] = None
    cu_seqlens_k: Optional[Tensor] = None
    max_seqlen_k: int = 0

    @classmethod
    def from_mask(cls, attention_mask: Optional[Tensor], batch: int, length: int, device) -> "Packing":
        """attention_mask (B, N): 1/True = real token, 0/False = padding (transformers' convention)."""
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must have shape {(batch, length)} like input_ids, got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask is None or bool(attention_mask.all()):
            cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
            return cls(batch, length, None, cu, length)
        keep = attention_mask.bool()
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        index = keep.reshape(-1).nonzero().squeeze(1)
        return cls(batch, length, index, cu, int(lengths.max()))

    @classmethod
    def for_ids(cls, input_ids: Tensor, attention_mask: Optional[Tensor]) -> "Packing":
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids (batch, length), got {type(input_ids).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(input_ids.shape)}")
        return cls.from_mask(attention_mask, *input_ids.shape, input_ids.device)

    def with_first_tokens(self, attention_mask: Tensor) -> Optional["Packing"]:
        """This packing plus position 0 of each row that starts with padding (and has a real
        token), as a query only: transformers' BERT pools position 0 whatever it holds, with
        left padding a pad token that attends to the row's real tokens. None when no row needs it."""
        if self.index is None:
            return None
        keep = attention_mask.bool()
        first_is_pad = ~keep[:, 0] & keep.any(dim=1)
        if not bool(first_is_pad.any()):
            return None
        queries = keep.clone()
        queries[:, 0] |= first_is_pad
        packing = Packing.from_mask(queries, self.batch, self.length, keep.device)
        is_key = keep.reshape(-1) if packing.index is None else keep.reshape(-1)[packing.index]
        packing.keys = is_key.nonzero().squeeze(1)
        packing.cu_seqlens_k, packing.max_seqlen_k = self.cu_seqlens, self.max_seqlen
        return packing

    def key_lengths(self):
        """(cu_seqlens, max_seqlen) of the keys."""
        if self.keys is None:
            return self.cu_seqlens, self.max_seqlen
        return self.cu_seqlens_k, self.max_seqlen_k

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1]) if self.index is not None else self.batch * self.length

    def pack(self, t: Tensor) -> Tensor:
        """(B, N, ...) -> (total, ...): the real tokens in order."""
        flat = t.reshape(self.batch * self.length, *t.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, t: Tensor) -> Tensor:
        """(total, ...) -> (B, N, ...), zeros at the padding."""
        if self.index is not None:
            t = t.new_zeros(self.batch * self.length, *t.shape[1:]).index_copy(0, self.index, t)
        return t.view(self.batch, self.length, *t.shape[1:])

    def rows(self) -> Tensor:
        """(total,) the batch row of each packed token."""
        lengths = self.cu_seqlens.diff().long()
        return torch.repeat_interleave(torch.arange(self.batch, device=lengths.device), lengths)

    def offsets(self) -> Tensor:
        """(total,) each packed token's index among its row's real tokens (its KV-cache slot)."""
        starts = self.cu_seqlens[:-1].long()
        return torch.arange(self.total, device=starts.device) - starts[self.rows()]
