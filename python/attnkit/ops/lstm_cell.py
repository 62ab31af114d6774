"""`attnkit.ops.lstm_cell`: one fused LSTM step, as torch.lstm_cell computes it.

Registered as torch.library custom ops (`attnkit::lstm_cell_forward` and
`attnkit::lstm_cell_backward`) with fake (meta) implementations and an autograd
formula, so torch.compile traces calls as single nodes without graph breaks.
The backend is chosen inside the op at run time (see attnkit._dispatch).
Plain eager calls run the same kernels and formula without the custom op's
dispatch (attnkit._eager), which cost about as much as a batch-1 step's kernel.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch, _eager, _validate
from ..backends.lstm_cell import LSTM_CELL
from .._autocast import run_without_autocast
from .rnn import _bias_grads

OP = "attnkit.ops.lstm_cell"


def _lstm_cell_forward_kernels(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor]
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = LSTM_CELL.select(_describe_tensors(x))
    return tuple(t.contiguous() for t in run_without_autocast(impl.forward, x, h, c, w_ih, w_hh, b_ih, b_hh))


_lstm_cell_forward = torch.library.custom_op("attnkit::lstm_cell_forward", _lstm_cell_forward_kernels, mutates_args=())


@_lstm_cell_forward.register_fake
def _(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return torch.empty_like(c), torch.empty_like(c), x.new_empty((x.shape[0], w_ih.shape[0]))


def _lstm_cell_backward_kernels(
    grad_h: Tensor, grad_c: Tensor, x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, gates: Tensor, c_new: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LSTM_CELL.select(_describe_tensors(x))
    grads = run_without_autocast(impl.backward, grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new)
    return tuple(g.contiguous() for g in grads)


_lstm_cell_backward = torch.library.custom_op(
    "attnkit::lstm_cell_backward", _lstm_cell_backward_kernels, mutates_args=()
)


@_lstm_cell_backward.register_fake
def _(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new):
    return (
        torch.empty_like(x),
        torch.empty_like(h),
        torch.empty_like(c),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        w_ih.new_empty((w_ih.shape[0],)),
    )


def _setup_context(ctx, inputs, output):
    x, h, c, w_ih, w_hh, _, _ = inputs
    _, c_new, gates = output
    state_needs_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x, h, c, w_ih, w_hh if state_needs_grad else None, gates, c_new)
    # w_hh enters only the state's gradient (every backend's backward takes the saved gates), so
    # torch.nn.LSTMCell lets weight_hh be edited in place before backward when the state needs none:
    # held without the version check then, its edited values change nothing that is returned.
    ctx.w_hh_unversioned = None if state_needs_grad else w_hh
    ctx.mark_non_differentiable(gates)


def _backward(ctx, grad_h, grad_c, _grad_gates):
    x, h, c, w_ih, w_hh, gates, c_new = ctx.saved_tensors
    w_hh = ctx.w_hh_unversioned if w_hh is None else w_hh
    # An output that did not reach the loss comes back as None.
    grad_h = torch.zeros_like(c_new) if grad_h is None else grad_h.contiguous()
    grad_c = torch.zeros_like(c_new) if grad_c is None else grad_c.contiguous()
    dx, dh, dc, dw_ih, dw_hh, db = _eager.call(
        _lstm_cell_backward_kernels, _lstm_cell_backward, grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new
    )
    return (dx, dh, dc, dw_ih, dw_hh, *_bias_grads(db, *ctx.needs_input_grad[5:7]))  # False for an absent bias


_eager.register_autograd(_lstm_cell_forward, _backward, _setup_context)
_LstmCellFunction = _eager.autograd_function("_LstmCellFunction", _lstm_cell_forward_kernels, _setup_context, _backward)


def _describe_tensors(x: Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype}


def _validated(input, hx, w_ih, w_hh, b_ih, b_hh):
    state = _validate.well_formed_rnn(4, input, 2, hx, w_ih, w_hh, b_ih, b_hh)
    if state is not None:
        return [t.contiguous() for t in (input, *state, w_ih, w_hh, b_ih, b_hh)]
    x = _validate.tensor(OP, "input", input, ndim=2)
    _validate.tensor(OP, "w_ih", w_ih, ndim=2)
    _validate.tensor(OP, "w_hh", w_hh, ndim=2)
    gate_rows, hidden = w_hh.shape
    if gate_rows != 4 * hidden:
        raise ValueError(f"{OP}: w_hh must have shape (4*hidden_size, hidden_size), got {tuple(w_hh.shape)}")
    _validate.rnn_input_weights(OP, x, w_ih, b_ih, b_hh, 4 * hidden, 4)
    if hx is None:
        zeros = x.new_zeros((x.shape[0], hidden))
        h, c = zeros, zeros
    else:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{OP}: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}")
        h = _validate.tensor(OP, "hx[0]", hx[0], ndim=2)
        c = _validate.tensor(OP, "hx[1]", hx[1], ndim=2)
        _validate.shape(OP, "hx[0]", h, (x.shape[0], hidden), "batch, hidden_size")
        _validate.shape(OP, "hx[1]", c, (x.shape[0], hidden), "batch, hidden_size")
    named = [("input", x), ("hx[0]", h), ("hx[1]", c), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)]
    _validate.same_dtype_and_device(OP, named)
    return [None if t is None else t.contiguous() for _, t in named]


def lstm_cell(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM time step, fused; the arguments of `torch.lstm_cell`.

    Args:
        input: (B, input_size).
        hx: (h, c), each (B, hidden_size); None means zeros.
        w_ih: (4*hidden_size, input_size), gate rows in PyTorch's order i, f, g, o.
        w_hh: (4*hidden_size, hidden_size).
        b_ih, b_hh: (4*hidden_size,) or None.

    Returns:
        (h_new, c_new), each (B, hidden_size), in the dtype of `input`.
    """
    args = _validated(input, hx, w_ih, w_hh, b_ih, b_hh)
    training = _eager.needs_grad(args)
    h_new, c_new, _ = _eager.forward(_LstmCellFunction, _lstm_cell_forward_kernels, _lstm_cell_forward, *args,
                                     training=training)
    # The backward saved c_new: the caller gets a copy to edit in place (cell-state clipping,
    # c.clamp_()), as torch.nn.LSTMCell allows. (B, H): a copy costs next to nothing.
    return h_new, (c_new.clone() if c_new.requires_grad or torch.jit.is_tracing() else c_new)


def _describe_call(input, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None):
    x = _validated(input, hx, w_ih, w_hh, b_ih, b_hh)[0]
    return _describe_tensors(x)


_dispatch.register_describer("lstm_cell", _describe_call)
