"""Implementations of the rotary embedding. Every backend honours one contract:

apply(x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens, max_seqlen) -> None

writes x rotated into `out`, which is a fresh tensor or x itself (in place);
x (B, N, H, D) any strides, or packed (total, H, D) with int32 cu_seqlens (B + 1,)
(else None), cos/sin (S, R/2) or (B, S, R/2) contiguous, offsets (B,) int32/int64
or None (then `offset` for every sequence).
"""
from __future__ import annotations

from typing import Any, List, Mapping

from .. import _extensions
from .._dispatch import Implementation, Op
from ..reference import rotary as ref

MAX_HEAD_DIM = 1024  # one program holds a (rows, head dim) tile


class Triton(Implementation):
    backend = "triton"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        if call.get("head_dim", 0) > MAX_HEAD_DIM:
            return [f"head dim {call['head_dim']} > {MAX_HEAD_DIM}"]
        return []

    def apply(self, x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens, max_seqlen):
        from ..triton_kernels import rotary as kernels

        kernels.rotary(x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens, max_seqlen)


class Cpp(Implementation):
    """csrc/cpu/rotary.cpp (attnkit._C): head rows walked in memory order, at::vec pairs."""

    backend = "cpp"

    def apply(self, x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens, max_seqlen):
        ext, _ = _extensions.load("_C")
        ext.rotary_apply(x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens)


class Reference(Implementation):
    backend = "reference"

    def apply(self, x, cos, sin, offsets, offset, interleaved, conjugate, out, cu_seqlens, max_seqlen):
        if cu_seqlens is None:
            out.copy_(ref.rotary(x, cos, sin, offsets, offset, interleaved, conjugate))
        else:
            out.copy_(ref.varlen(ref.rotary, cu_seqlens, x, cos, sin, offsets, offset, interleaved, conjugate))


ROTARY = Op("rotary", [Triton(), Cpp(), Reference()])
