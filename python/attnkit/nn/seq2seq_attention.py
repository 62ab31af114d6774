"""Attention of an RNN decoder over encoder states (Bahdanau et al. 2015, Luong et al. 2015).

At each decoder step the query (the decoder state) scores every encoder state (the keys),
a softmax over the real keys turns the scores into weights, and the context is the weighted
sum of the values (usually the keys themselves).

- `BahdanauAttention`: additive, score = v . tanh(W_q q + W_k k).
- `LuongAttention(score=...)`: "dot" q . k, "general" q . (W k), "concat" v . tanh(W [q; k]).
  "concat" is additive attention with W split column-wise into W_q and W_k, so it runs the
  same op as Bahdanau's (parameters `query_proj`, `key_proj`, `v`, W = [W_q, W_k]).

Shapes: query (B, Dq) for one decoder step or (B, Tq, Dq) for several; keys (B, Tk, Dk);
values (B, Tk, Dv), default the keys; mask (B, Tk) bool, True = a real key (a source padding
mask: note nn.MultiheadAttention's key_padding_mask is the opposite). Returns
(context (B, [Tq,] Dv), weights (B, [Tq,] Tk)); weights on masked keys are exactly 0, and a
query with no real key gets weights 0 and context 0, never NaN.

Neither projection has a bias: Bahdanau's formula has none, and attnkit.ops.additive_attention
(which runs both additive scores) takes none. A decoder attending to the same source at every
step projects the keys once (`project_keys`) and passes them as `projected_keys`: the projection,
a (B*Tk, Dk) x (Dk, A) GEMM, costs Dk times the scoring it feeds.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops.additive_attention import additive_attention


def _check(name: str, query: Tensor, keys: Tensor, values: Optional[Tensor], mask: Optional[Tensor],
           query_size: int, key_size: int) -> Tuple[Tensor, bool]:
    """Validates the call; returns the query as (B, Tq, Dq) and whether it was one step (B, Dq)."""
    _validate.tensor(name, "query", query)
    _validate.tensor(name, "keys", keys, ndim=3)
    if query.dim() not in (2, 3):
        raise ValueError(f"{name}: query must be (B, Dq) or (B, Tq, Dq), got shape {tuple(query.shape)}")
    if query.shape[-1] != query_size:
        raise ValueError(f"{name}: query has {query.shape[-1]} features but the module was built with "
                         f"query_size={query_size} (query shape {tuple(query.shape)})")
    if keys.shape[-1] != key_size:
        raise ValueError(f"{name}: keys have {keys.shape[-1]} features but the module was built with "
                         f"key_size={key_size} (keys shape {tuple(keys.shape)})")
    batch, length = keys.shape[0], keys.shape[1]
    if length == 0:
        raise ValueError(f"{name}: keys must hold at least one key (Tk >= 1), got shape {tuple(keys.shape)}")
    if query.shape[0] != batch:
        raise ValueError(f"{name}: query has batch {query.shape[0]} but keys have batch {batch}")
    if values is not None:
        _validate.tensor(name, "values", values, ndim=3)
        if values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"{name}: values must be (B, Tk, Dv) with (B, Tk) = {tuple(keys.shape[:2])} "
                             f"as the keys, got shape {tuple(values.shape)}")
    _validate.same_dtype_and_device(name, [("query", query), ("keys", keys), ("values", values)])
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name}: mask must be a bool tensor (True = real key), got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        _validate.shape(name, "mask", mask, (batch, length), "batch, key length; True = real key")
        if mask.device != keys.device:
            raise RuntimeError(f"{name}: mask is on {mask.device} but keys are on {keys.device}")
    single = query.dim() == 2
    return (query.unsqueeze(1) if single else query), single


def masked_softmax(scores: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim of (B, Tq, Tk) scores, keys where mask (B, Tk) is False
    excluded (weight exactly 0); rows with no real key give 0. fp32 statistics for half inputs."""
    stat_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(stat_dtype)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()  # the shift does not change the softmax
    empty = torch.isneginf(row_max)
    e = torch.exp(s - torch.where(empty, torch.zeros_like(row_max), row_max))
    weights = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(stat_dtype).tiny)
    return weights.masked_fill(empty, 0.0).to(scores.dtype)


class _AdditiveParameters(nn.Module):
    """W_q = query_proj.weight (A, Dq), W_k = key_proj.weight (A, Dk), v (A,); no biases."""

    def _init_additive(self, query_size: int, key_size: int, attention_size: int, device, dtype) -> None:
        self.query_proj = nn.Linear(query_size, attention_size, bias=False, device=device, dtype=dtype)
        self.key_proj = nn.Linear(key_size, attention_size, bias=False, device=device, dtype=dtype)
        self.v = nn.Parameter(torch.empty(attention_size, device=device, dtype=dtype))
        self._reset_v()

    def _reset_v(self) -> None:
        bound = 1.0 / math.sqrt(self.v.shape[0])  # as a Linear(attention_size, 1) would be
        nn.init.uniform_(self.v, -bound, bound)

    def reset_parameters(self) -> None:
        """Every parameter as at construction: after to_empty() (meta-device construction), v
        was left uninitialized, having no reset of its own."""
        for child in self.children():
            child.reset_parameters()
        if getattr(self, "v", None) is not None:
            self._reset_v()

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys (B, Tk, Dk) -> W_k keys (B, Tk, A), for `forward(..., projected_keys=)`."""
        return keys @ self.key_proj.weight.t()

    def _additive(self, query: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor],
                  projected_keys: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return additive_attention(query, keys, values, self.query_proj.weight, self.key_proj.weight, self.v, mask,
                                  return_weights=True, projected_keys=projected_keys)


def _positive(name: str, arg: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
    return value


class BahdanauAttention(_AdditiveParameters):
    """Additive attention: score(q, k) = v . tanh(W_q q + W_k k), via attnkit.ops.additive_attention.

    Args:
        query_size: Dq, the decoder state size.
        key_size: Dk, the encoder state size.
        attention_size: A, the size inside the tanh (default query_size).
    """

    def __init__(self, query_size: int, key_size: int, attention_size: Optional[int] = None, *, device=None,
                 dtype=None):
        super().__init__()
        self.query_size = _positive("BahdanauAttention", "query_size", query_size)
        self.key_size = _positive("BahdanauAttention", "key_size", key_size)
        self.attention_size = _positive("BahdanauAttention", "attention_size",
                                        query_size if attention_size is None else attention_size)
        self._init_additive(self.query_size, self.key_size, self.attention_size, device, dtype)

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                projected_keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """projected_keys: `project_keys(keys)`, computed once per source by a decoder, or None."""
        q, single = _check("BahdanauAttention", query, keys, values, mask, self.query_size, self.key_size)
        context, weights = self._additive(q, keys, keys if values is None else values, mask, projected_keys)
        return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)

    def extra_repr(self) -> str:
        return f"query_size={self.query_size}, key_size={self.key_size}, attention_size={self.attention_size}"


class LuongAttention(_AdditiveParameters):
    """Multiplicative ("dot", "general") or concat attention of Luong et al. 2015.

    Args:
        query_size: Dq, the decoder state size.
        key_size: Dk, the encoder state size; must equal query_size for "dot".
        score: "dot" (q . k), "general" (q . W k, W = proj.weight (Dq, Dk)) or
            "concat" (v . tanh(W_q q + W_k k), parameters as BahdanauAttention's).
        attention_size: A for "concat" (default query_size); not allowed otherwise.
    Scores are not scaled (as in the paper).
    """

    SCORES = ("dot", "general", "concat")

    def __init__(self, query_size: int, key_size: int, score: str = "general", attention_size: Optional[int] = None,
                 *, device=None, dtype=None):
        super().__init__()
        self.query_size = _positive("LuongAttention", "query_size", query_size)
        self.key_size = _positive("LuongAttention", "key_size", key_size)
        if score not in self.SCORES:
            raise ValueError(f"LuongAttention: score must be one of {self.SCORES}, got {score!r}")
        self.score = score
        if score == "dot" and query_size != key_size:
            raise ValueError(f"LuongAttention: score='dot' needs query_size == key_size, got query_size={query_size}, "
                             f"key_size={key_size} (use 'general' or 'concat' for different sizes)")
        if score != "concat" and attention_size is not None:
            raise ValueError(f"LuongAttention: attention_size is only used by score='concat', got {attention_size!r} "
                             f"with score={score!r}")
        self.attention_size = None
        if score == "general":
            self.proj = nn.Linear(key_size, query_size, bias=False, device=device, dtype=dtype)
        elif score == "concat":
            self.attention_size = _positive("LuongAttention", "attention_size",
                                            query_size if attention_size is None else attention_size)
            self._init_additive(self.query_size, self.key_size, self.attention_size, device, dtype)

    def project_keys(self, keys: Tensor) -> Tensor:
        """keys (B, Tk, Dk) as `forward(..., projected_keys=)` takes them, for a decoder to
        compute once per source: W_k keys (B, Tk, A) for "concat", W keys (B, Tk, Dq) for
        "general", the keys themselves for "dot"."""
        if self.score == "concat":
            return super().project_keys(keys)
        return keys @ self.proj.weight.t() if self.score == "general" else keys

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                projected_keys: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """projected_keys: `project_keys(keys)` (computed once per source), or None."""
        q, single = _check("LuongAttention", query, keys, values, mask, self.query_size, self.key_size)
        values = keys if values is None else values
        if self.score == "concat":
            context, weights = self._additive(q, keys, values, mask, projected_keys)
        else:
            if projected_keys is None:
                if self.score == "general":
                    _validate.same_dtype_and_device("LuongAttention",
                                                    [("query", query), ("proj.weight", self.proj.weight)])
                # general: q . (W k) = (q W) . k, so W meets the Tq queries, not the Tk keys.
                q_k, k = (q if self.score == "dot" else q @ self.proj.weight), keys  # (B, Tq, Dk)
            else:
                _validate.tensor("LuongAttention", "projected_keys", projected_keys, ndim=3)
                _validate.shape("LuongAttention", "projected_keys", projected_keys, (*keys.shape[:2], self.query_size),
                                "batch, key length, query_size: project_keys(keys)")
                _validate.same_dtype_and_device("LuongAttention", [("query", query), ("projected_keys", projected_keys)])
                q_k, k = q, projected_keys
            weights = masked_softmax(q_k @ k.transpose(1, 2), mask)
            context = weights @ values
        return (context.squeeze(1), weights.squeeze(1)) if single else (context, weights)

    def extra_repr(self) -> str:
        extra = f", attention_size={self.attention_size}" if self.score == "concat" else ""
        return f"query_size={self.query_size}, key_size={self.key_size}, score={self.score!r}{extra}"
