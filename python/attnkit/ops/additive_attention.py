"""`attnkit.ops.additive_attention`: Bahdanau (additive) attention,
score[b, i, j] = v_a . tanh(W_q q_i + W_k k_j), softmax over the keys, context =
weights @ values; forward and backward without the (B, Tq, Tk, A) tensor of tanh
inputs that the plain PyTorch version builds.

The projections Qp = query W_q^T and Kp = keys W_k^T are computed once with
GEMMs (O(T * A), autograd carries their gradients to query, keys, W_q, W_k); the
rest is a pair of torch.library custom ops (`attnkit::additive_attention_forward`,
`attnkit::additive_attention_backward`) with fake implementations and an
autograd formula, on the backend the dispatcher picks (see
attnkit.backends.additive_attention); plain eager calls run the same kernels
and formula without their dispatch (attnkit._eager), as a decoder's per-step
calls are small.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _eager, _validate
from ..backends.additive_attention import ADDITIVE_ATTENTION, describe
from .._autocast import run_without_autocast

OP = "attnkit.ops.additive_attention"


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_kernels(qp: Tensor, kp: Tensor, values: Tensor, v_a: Tensor, mask: Optional[Tensor],
             return_weights: bool) -> Tuple[Tensor, Tensor, Tensor]:
    impl = ADDITIVE_ATTENTION.select(describe(v_a, values))
    context, lse, weights = run_without_autocast(impl.forward, qp, kp, values, v_a, mask, return_weights)
    if weights is None:  # a custom op returns a fixed number of tensors: an empty one stands for "not asked"
        weights = qp.new_empty((0,), dtype=values.dtype)
    return context.contiguous(), lse.contiguous(), weights.contiguous()


_forward = torch.library.custom_op("attnkit::additive_attention_forward", _forward_kernels, mutates_args=())


@_forward.register_fake
def _(qp, kp, values, v_a, mask, return_weights):
    batch, n_q, n_k = qp.shape[0], qp.shape[1], kp.shape[1]
    weights_shape = (batch, n_q, n_k) if return_weights else (0,)
    return (values.new_empty((batch, n_q, values.shape[-1])), qp.new_empty((batch, n_q), dtype=_stat_dtype(qp.dtype)),
            values.new_empty(weights_shape))


def _backward_kernels(grad_context: Tensor, grad_weights: Optional[Tensor], delta: Tensor, qp: Tensor, kp: Tensor,
                 values: Tensor, v_a: Tensor, mask: Optional[Tensor], lse: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = ADDITIVE_ATTENTION.select(describe(v_a, values))
    grads = run_without_autocast(impl.backward, grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse)
    return tuple(g.contiguous() for g in grads)


_backward_op = torch.library.custom_op("attnkit::additive_attention_backward", _backward_kernels, mutates_args=())


@_backward_op.register_fake
def _(grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse):
    return torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(values), torch.empty_like(v_a)


def _setup_context(ctx, inputs, output):
    qp, kp, values, v_a, mask, return_weights = inputs
    context, lse, weights = output
    ctx.return_weights = return_weights
    ctx.save_for_backward(qp, kp, values, v_a, mask, context, lse, weights if return_weights else None)
    ctx.mark_non_differentiable(lse)
    if not return_weights:
        ctx.mark_non_differentiable(weights)


def _backward(ctx, grad_context, _grad_lse, grad_weights):
    qp, kp, values, v_a, mask, context, lse, weights = ctx.saved_tensors
    if grad_context is None:
        grad_context = torch.zeros_like(context)
    stat = lse.dtype
    delta = (grad_context.to(stat) * context.to(stat)).sum(-1)
    if not ctx.return_weights or grad_weights is None:
        grad_weights = None
    else:
        grad_weights = grad_weights.contiguous()
        delta = delta + (weights.to(stat) * grad_weights.to(stat)).sum(-1)
    grads = _eager.call(_backward_kernels, _backward_op, grad_context.contiguous(), grad_weights, delta.contiguous(),
                        qp, kp, values, v_a, mask, lse)
    return grads + (None, None)


_eager.register_autograd(_forward, _backward, _setup_context)
_AdditiveFunction = _eager.autograd_function("_AdditiveFunction", _forward_kernels, _setup_context, _backward)


def _validated(query, keys, values, W_q, W_k, v_a, mask) -> None:
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        _validate.tensor(OP, name, t, ndim=3)
    _validate.tensor(OP, "W_q", W_q, ndim=2)
    _validate.tensor(OP, "W_k", W_k, ndim=2)
    _validate.tensor(OP, "v_a", v_a, ndim=1)
    _validate.same_dtype_and_device(OP, [("query", query), ("keys", keys), ("values", values), ("W_q", W_q),
                                         ("W_k", W_k), ("v_a", v_a)])
    batch, n_q, d_q = query.shape
    _, n_k, d_k = keys.shape
    hidden = v_a.shape[0]
    if keys.shape[0] != batch or values.shape[0] != batch:
        raise ValueError(f"{OP}: query, keys, values must have the same batch size, got {batch}, {keys.shape[0]}, "
                         f"{values.shape[0]}")
    if values.shape[1] != n_k:
        raise ValueError(f"{OP}: keys and values must have the same length, got {n_k} and {values.shape[1]}")
    if 0 in (batch, n_q, n_k, hidden, d_q, d_k, values.shape[2]):
        raise ValueError(f"{OP}: empty input: query {tuple(query.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, v_a {tuple(v_a.shape)}; every size must be at least 1")
    _validate.shape(OP, "W_q", W_q, (hidden, d_q), "(attention hidden size A = len(v_a), query features)")
    _validate.shape(OP, "W_k", W_k, (hidden, d_k), "(attention hidden size A = len(v_a), key features)")
    if mask is not None:
        _validate.tensor(OP, "mask", mask, dtypes=(torch.bool,))
        _validate.shape(OP, "mask", mask, (batch, n_k), "(batch, key length), True = a real key")
        if mask.device != query.device:
            raise RuntimeError(f"{OP}: mask is on {mask.device} but query is on {query.device}")


def additive_attention(
    query: Tensor, keys: Tensor, values: Tensor, W_q: Tensor, W_k: Tensor, v_a: Tensor,
    mask: Optional[Tensor] = None, *, return_weights: bool = False, projected_keys: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Additive (Bahdanau) attention, fused: the (B, Tq, Tk, A) tanh tensor is never built.

    Args:
        query: (B, Tq, Dq), e.g. the decoder states. keys: (B, Tk, Dk), values: (B, Tk, Dv)
            (Bahdanau's encoder annotations are both keys and values).
        W_q: (A, Dq), W_k: (A, Dk), v_a: (A,): score[b, i, j] = v_a . tanh(W_q q_i + W_k k_j).
            All six tensors share one dtype (float32, float64, float16, bfloat16) and device;
            gradients flow to each of them.
        mask: (B, Tk) bool, True = a real key (a source padding mask), or None. A query whose
            keys are all masked gets weights 0, context 0 and gradient 0 (never NaN).
        return_weights: also return the attention weights (differentiable).
        projected_keys: (B, Tk, A), keys @ W_k.T computed by the caller, or None. A decoder
            attending to the same source at every step projects it once and passes it here
            (the projection costs Dk times the scoring); the scores then use it instead of
            keys and W_k, and gradients reach keys and W_k through it.

    Returns:
        context (B, Tq, Dv) in the input dtype; with return_weights, (context, weights (B, Tq, Tk)).
        Softmax statistics and accumulation in fp32 (fp64 for fp64 inputs).
    """
    if not isinstance(return_weights, bool):
        raise TypeError(f"{OP}: return_weights must be a bool, got {type(return_weights).__name__}")
    _validated(query, keys, values, W_q, W_k, v_a, mask)
    if projected_keys is not None:
        _validate.tensor(OP, "projected_keys", projected_keys, ndim=3)
        if not torch.is_autocast_enabled(keys.device.type):  # under autocast keys @ W_k.T is in its dtype
            _validate.same_dtype_and_device(OP, [("keys", keys), ("projected_keys", projected_keys)])
        _validate.shape(OP, "projected_keys", projected_keys, (keys.shape[0], keys.shape[1], v_a.shape[0]),
                        "(batch, key length, attention hidden size A): keys @ W_k.T")
    qp = query @ W_q.t()
    kp = keys @ W_k.t() if projected_keys is None else projected_keys.to(qp.dtype)
    args = (qp.contiguous(), kp.contiguous(), values.contiguous(), v_a.contiguous(),
            None if mask is None else mask.contiguous(), return_weights)
    context, _, weights = _eager.forward(_AdditiveFunction, _forward_kernels, _forward, *args,
                                         training=_eager.needs_grad(args[:4]))
    return (context, weights) if return_weights else context


def _describe_call(query, keys, values, W_q, W_k, v_a, mask=None, **kwargs) -> dict:
    _validated(query, keys, values, W_q, W_k, v_a, mask)
    return dict(describe(v_a, values))


_dispatch.register_describer("additive_attention", _describe_call)
