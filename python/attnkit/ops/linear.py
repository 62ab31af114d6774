"""`attnkit.ops.linear`: torch.nn.functional.linear (y = x W^T + b) with a CPU
kernel for few rows, the matrix-vector products of a decoding step (GPT-2
generation, beam search), which are bound by how fast W is read; other calls go
to F.linear. A torch.library custom op with a fake implementation and an
autograd formula, so it traces and trains like F.linear; plain eager calls skip
its dispatch (attnkit._eager), which costs as much as a small decoding GEMV."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _autocast, _dispatch, _eager, _validate
from ..backends.linear import LINEAR

OP = "attnkit.ops.linear"


def _describe(x: Tensor, weight: Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype, "rows": x.shape[0]}


def _linear_kernels(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return LINEAR.select(_describe(x, weight)).forward(x, weight, bias)


_linear = torch.library.custom_op("attnkit::linear", _linear_kernels, mutates_args=())


@_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x if weight.requires_grad else None, weight if x.requires_grad else None)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx = grad @ weight if ctx.needs_input_grad[0] else None
    dw = grad.t() @ x if ctx.needs_input_grad[1] else None
    db = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_eager.register_autograd(_linear, _backward, _setup_context)
# The formula is plain torch: differentiable again, as through the custom op.
_LinearFunction = _eager.autograd_function("_LinearFunction", _linear_kernels, _setup_context, _backward, once=False)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """As torch.nn.functional.linear (same argument names): input (..., in_features), weight (out_features,
    in_features), bias (out_features,) or None; returns (..., out_features).

    On CPU in float32 with at most 16 rows (the product of x's leading dims) it runs
    csrc/cpu/linear.cpp; everything else runs F.linear itself. Under autocast it
    computes in the autocast dtype, as F.linear (on autocast's lower-precision list).
    Complex or integer input and weight of one dtype, which no kernel here takes, run F.linear, as torch.nn.Linear;
    so do forward-mode AD tangents, which the kernel would drop, torch.func's grad/jvp transforms
    (whose rules the custom op lacks), and the shapes only F.linear takes (a 1-D weight, a bias
    broadcast to the output other than (out_features,))."""
    x = input
    if isinstance(x, Tensor) and not x.is_floating_point() and isinstance(weight, Tensor) and weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if _eager.has_tangent((x, weight, bias)) or _eager.differentiating_transform():
        return F.linear(x, weight, bias)
    _validate.tensor(OP, "input", x)
    dtype = _autocast.lower_precision_dtype(x.device.type)
    if dtype is not None:
        x, weight, bias = _autocast.cast_floating(dtype, (x, weight, bias))
        with _autocast.off(x.device.type, True):
            return linear(x, weight, bias)
    try:
        _check(x, weight, bias)
    except ValueError:  # asked only here, off the decoding step's path (~0.6 us a call)
        if _shapes_only_f_linear_takes(x, weight, bias):
            return F.linear(x, weight, bias)
        raise
    rows = math.prod(x.shape[:-1])
    args = (x.reshape(rows, x.shape[-1]).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous())
    y = _eager.forward(_LinearFunction, _linear_kernels, _linear, *args, training=_eager.needs_grad(args))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _shapes_only_f_linear_takes(x, weight, bias) -> bool:
    """Whether F.linear takes these shapes but no kernel here does: a 1-D weight (a dot product
    with x's last dim) or a bias broadcast to the output other than (out_features,). They are
    rare, so F.linear runs them, as torch.nn.Linear; shapes neither takes get _check's errors."""
    if not all(isinstance(t, Tensor) for t in (x, weight)) or not (bias is None or isinstance(bias, Tensor)):
        return False
    if weight.dim() == 1:
        return x.dim() >= 1 and bias is None
    if weight.dim() != 2 or x.dim() == 0 or bias is None or bias.shape == (weight.shape[0],):
        return False
    out_shape = (*x.shape[:-1], weight.shape[0])
    try:
        return _validate.broadcast_shapes(bias.shape, out_shape) == out_shape
    except RuntimeError:
        return False


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _validate.tensor(OP, "input", x)
    _validate.tensor(OP, "weight", weight, ndim=2)
    if x.dim() == 0:
        raise ValueError(f"{OP}: input must have at least 1 dimension (in_features), got a 0-D tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: input has {x.shape[-1]} features (last dim) but weight is {tuple(weight.shape)}: "
                         f"expected weight (out_features, {x.shape[-1]})")
    if bias is not None:
        _validate.tensor(OP, "bias", bias, ndim=1)
        _validate.shape(OP, "bias", bias, (weight.shape[0],), "out_features")
    _validate.same_dtype_and_device(OP, (("input", x), ("weight", weight), ("bias", bias)))


def _describe_call(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    x = input
    _check(x, weight, bias)
    dtype = _autocast.lower_precision_dtype(x.device.type)  # the op casts to it first (float64 left alone)
    if dtype is None or not x.is_floating_point() or x.dtype == torch.float64:
        dtype = x.dtype
    return {"device": x.device, "dtype": dtype, "rows": math.prod(x.shape[:-1])}


_dispatch.register_describer("linear", _describe_call)
