"""Implementations of the fused additive-attention core. The op projects once
with GEMMs (Qp = query W_q^T, Kp = keys W_k^T) and hands the backends:

forward(qp, kp, values, v_a, mask, return_weights) -> (context, lse, weights or None)
backward(grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse) -> (d_qp, d_kp, d_values, d_v_a)

qp (B, Tq, A), kp (B, Tk, A), values (B, Tk, Dv) and v_a (A,) share one dtype;
mask (B, Tk) bool (True = real key) or None; lse (B, Tq) fp32 (fp64 for fp64),
-inf on a fully masked row; grad_weights (B, Tq, Tk) or None; delta (B, Tq) in
lse's dtype = rowsum(grad_context * context) + rowsum(weights * grad_weights),
flash attention's delta, so that dS = P * (dP - delta).
Gradients come back in the inputs' dtype.
"""
from __future__ import annotations

import functools
from typing import Any, List, Mapping

import torch

from .. import _extensions
from .._dispatch import Implementation, Op
from ..reference.additive_attention import attend


MAX_VALUE_DIM = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Triton(Implementation):
    """triton_kernels/additive_attention.py: online softmax over key tiles, tanh
    summed over A in chunks; GPUs, and CPU tensors under TRITON_INTERPRET=1."""

    backend = "triton"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        reasons = []
        if call.get("dtype") == torch.float64:
            reasons.append("float64: the kernel accumulates in float32 (use the cpp or reference backend)")
        if call.get("head_dim_v", 0) > MAX_VALUE_DIM:
            reasons.append(f"value dim {call['head_dim_v']} > {MAX_VALUE_DIM} (one register tile per query block)")
        return reasons

    def forward(self, qp, kp, values, v_a, mask, return_weights):
        from ..triton_kernels import additive_attention as kernels

        return kernels.forward(qp, kp, values, v_a, mask, return_weights)

    def backward(self, grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse):
        from ..triton_kernels import additive_attention as kernels

        return kernels.backward(grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse)


class Cpp(Implementation):
    """csrc/cpu/additive_attention.cpp: tanh recomputed pair by pair, never stored;
    half inputs are upcast to float32 (the kernel computes in float or double)."""

    backend = "cpp"

    def forward(self, qp, kp, values, v_a, mask, return_weights):
        ext, _ = _extensions.load("_C")
        compute = _compute_dtype(qp.dtype)
        context, weights, lse = ext.additive_attention_forward(*(t.to(compute) for t in (qp, kp, values, v_a)), mask)
        return context.to(values.dtype), lse, weights.to(values.dtype) if return_weights else None

    def backward(self, grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse):
        ext, _ = _extensions.load("_C")
        compute = _compute_dtype(qp.dtype)
        up = lambda t: None if t is None else t.to(compute).contiguous()  # noqa: E731
        grads = ext.additive_attention_backward(up(grad_context), up(grad_weights), up(delta), up(qp), up(kp),
                                                up(values), up(v_a), mask, up(lse))
        return tuple(g.to(like.dtype) for g, like in zip(grads, (qp, kp, values, v_a)))


class Reference(Implementation):
    """The plain-PyTorch reference on the projections, and the backward written
    out in plain PyTorch; both build (B, Tq, Tk, A) tensors."""

    backend = "reference"

    def forward(self, qp, kp, values, v_a, mask, return_weights):
        # One dtype for the plain ops (under autocast the projections come in its dtype)
        common = functools.reduce(torch.promote_types, (qp.dtype, kp.dtype, values.dtype, v_a.dtype))
        context, weights, lse = attend(*(t.to(common) for t in (qp, kp, values, v_a)), mask)
        return context.to(values.dtype), lse, weights.to(values.dtype) if return_weights else None

    def backward(self, grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse):
        stat, dtypes = lse.dtype, (qp.dtype, kp.dtype, values.dtype, v_a.dtype)
        qp, kp, values, v_a, grad_context = (t.to(stat) for t in (qp, kp, values, v_a, grad_context))
        t = torch.tanh(qp[:, :, None, :] + kp[:, None, :, :])  # (B, Tq, Tk, A)
        p = torch.exp(t @ v_a - lse[:, :, None])
        if mask is not None:
            p = p.masked_fill(~mask[:, None, :], 0.0)
        p = p.masked_fill(torch.isneginf(lse)[:, :, None], 0.0)  # a fully masked row has no weights
        d_p = grad_context @ values.transpose(1, 2)
        if grad_weights is not None:
            d_p = d_p + grad_weights.to(stat)
        d_s = p * (d_p - delta[:, :, None])  # d loss / d score
        d_pre = d_s[..., None] * (1 - t * t) * v_a  # d loss / d (qp_i + kp_j)
        grads = (d_pre.sum(2), d_pre.sum(1), p.transpose(1, 2) @ grad_context, (d_s[..., None] * t).sum((0, 1, 2)))
        return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes))


ADDITIVE_ATTENTION = Op("additive_attention", [Triton(), Cpp(), Reference()])


def describe(v_a, values) -> Mapping[str, Any]:
    """The call as the backends' not_supported_reasons see it."""
    return {"device": v_a.device, "dtype": v_a.dtype, "hidden": v_a.shape[0], "head_dim_v": values.shape[-1]}
