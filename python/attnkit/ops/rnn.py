"""`attnkit.ops.lstm` / `attnkit.ops.gru`: one LSTM or GRU layer, one
direction, over a whole time-major sequence, fused (see csrc/include/attnkit/rnn.h).
Multi-layer, bidirectional and batch-first stacks are attnkit.nn.LSTM / GRU.

Registered as torch.library custom ops (`attnkit::lstm_forward`, ...) with
fake implementations and autograd formulas, like attnkit.ops.lstm_cell; the
backend is chosen inside the op at run time (see attnkit._dispatch). Plain
eager calls run the same kernels and formulas without the custom op's
dispatch (attnkit._eager): a torch.autograd.Function when training.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch, _eager, _validate
from .._autocast import run_without_autocast
from ..backends.rnn import GRU, LSTM

LSTM_OP, GRU_OP = "attnkit.ops.lstm", "attnkit.ops.gru"


def _describe_tensors(x: Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype}


def _describe_call(x: Tensor, w_hh: Tensor, gates: int, proj: bool, save: bool) -> dict:
    """Device and dtype, plus what the inference-only persistent CUDA kernel looks at:
    batch, hidden size, projection, and `save` (a training forward, or a backward);
    and the steps and input size, which decide whether float16/bfloat16 go to the cpp kernels."""
    return {**_describe_tensors(x), "steps": x.shape[0], "batch": x.shape[1], "input_size": x.shape[2],
            "hidden_size": w_hh.shape[0] // gates, "proj": proj, "save": save}


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _distinct(grads: tuple) -> tuple:
    """The gradients with a tensor returned for several inputs (the kernels' one bias
    gradient serves b_ih, b_hh and LayerNorm shifts alike) copied after its first use:
    each input gets its own, as torch returns them, so a hook or caller changing one in
    place cannot change another."""
    seen = set()
    out = []
    for g in grads:
        if g is not None and id(g) in seen:
            g = g.clone()
        elif g is not None:
            seen.add(id(g))
        out.append(g)
    return tuple(out)


def _bias_grads(db: Tensor, needs_b_ih: bool, needs_b_hh: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of b_ih and b_hh from the kernels' one `db` (both biases enter
    every gate alike): a tensor of its own for each that needs one."""
    return _distinct((db if needs_b_ih else None, db if needs_b_hh else None))


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


# --------------------------------------------------------------------------- LSTM custom ops


def _lstm_forward_kernels(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    w_hr: Optional[Tensor], lengths: Optional[Tensor], save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LSTM.select(_describe_call(x, w_hh, 4, w_hr is not None, save))
    outputs = run_without_autocast(impl.forward, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)
    return tuple(t.contiguous() for t in outputs)


_lstm_forward = torch.library.custom_op("attnkit::lstm_forward", _lstm_forward_kernels, mutates_args=())


@_lstm_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
    (T, B, _), H = x.shape, c0.shape[1]
    P = h0.shape[1]
    saved = lambda *shape: x.new_empty(shape if save else (0,))  # noqa: E731
    hc = saved(T, B, H) if w_hr is not None else x.new_empty((0,))
    return x.new_empty((T, B, P)), torch.empty_like(h0), torch.empty_like(c0), saved(T, B, 4 * H), saved(T, B, H), hc


def _lstm_backward_kernels(
    grad_output: Tensor, grad_hn: Tensor, grad_cn: Tensor, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor,
    w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], lengths: Optional[Tensor],
    output: Tensor, gates: Tensor, cs: Tensor, hc: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LSTM.select(_describe_call(x, w_hh, 4, w_hr is not None, save=True))
    grads = run_without_autocast(
        impl.backward, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates,
        cs, hc
    )
    return tuple(g.contiguous() for g in grads)


_lstm_backward = torch.library.custom_op("attnkit::lstm_backward", _lstm_backward_kernels, mutates_args=())


@_lstm_backward.register_fake
def _(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
    dw_hr = torch.empty_like(w_hr) if w_hr is not None else x.new_empty((0,))
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty((w_ih.shape[0],)), dw_hr)


def _lstm_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, _ = inputs
    out, _, _, gates, cs, hc = output
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, out, gates, cs, hc)
    ctx.mark_non_differentiable(gates, cs, hc)
    # Unused gradients come as None (made zeros below where needed), not as
    # zero tensors the size of gates and cs: filling those cost ~5% of a training step.
    ctx.set_materialize_grads(False)


def _lstm_autograd(ctx, grad_output, grad_hn, grad_cn, *_saved_grads):
    saved = ctx.saved_tensors
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, out, gates, cs, hc = saved
    grads = (_zeros_if_none(grad_output, out), _zeros_if_none(grad_hn, h0), _zeros_if_none(grad_cn, c0))
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _eager.call(_lstm_backward_kernels, _lstm_backward, *grads, *saved)
    db_ih, db_hh = _bias_grads(db, *ctx.needs_input_grad[5:7])  # False for an absent bias
    return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr if w_hr is not None else None, None, None


_eager.register_autograd(_lstm_forward, _lstm_autograd, _lstm_setup_context)


_LstmFunction = _eager.autograd_function("_LstmFunction", _lstm_forward_kernels, _lstm_setup_context, _lstm_autograd)


# --------------------------------------------------------------------------- GRU custom ops


def _gru_forward_kernels(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    lengths: Optional[Tensor], save: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = GRU.select(_describe_call(x, w_hh, 3, False, save))
    outputs = run_without_autocast(impl.forward, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save)
    return tuple(t.contiguous() for t in outputs)


_gru_forward = torch.library.custom_op("attnkit::gru_forward", _gru_forward_kernels, mutates_args=())


@_gru_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
    T, B, _ = x.shape
    H = h0.shape[1]
    gates = x.new_empty((T, B, 4 * H) if save else (0,))
    return x.new_empty((T, B, H)), torch.empty_like(h0), gates


def _gru_backward_kernels(
    grad_output: Tensor, grad_hn: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
    b_hh: Optional[Tensor], lengths: Optional[Tensor], output: Tensor, gates: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = GRU.select(_describe_call(x, w_hh, 3, False, save=True))
    grads = run_without_autocast(impl.backward, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output,
                                 gates)
    return tuple(g.contiguous() for g in grads)


_gru_backward = torch.library.custom_op("attnkit::gru_backward", _gru_backward_kernels, mutates_args=())


@_gru_backward.register_fake
def _(grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
    rows = (w_ih.shape[0],)
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_ih.new_empty(rows), w_ih.new_empty(rows))


def _gru_setup_context(ctx, inputs, output):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, _ = inputs
    out, _, gates = output
    # Copies of the (3H) biases: torch.nn.GRU lets a bias be edited in place before backward
    b_ih, b_hh = (None if b is None else b.detach().clone() for b in (b_ih, b_hh))
    ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out, gates)
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)  # as the LSTM's: no zero tensor the size of gates


def _gru_autograd(ctx, grad_output, grad_hn, _grad_gates):
    x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out, gates = ctx.saved_tensors
    grads = (_zeros_if_none(grad_output, out), _zeros_if_none(grad_hn, h0))
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh = _eager.call(
        _gru_backward_kernels, _gru_backward, *grads, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, out, gates
    )
    return dx, dh0, dw_ih, dw_hh, db_ih if b_ih is not None else None, db_hh if b_hh is not None else None, None, None


_eager.register_autograd(_gru_forward, _gru_autograd, _gru_setup_context)


_GruFunction = _eager.autograd_function("_GruFunction", _gru_forward_kernels, _gru_setup_context, _gru_autograd)


# --------------------------------------------------------------------------- validation


def _validated_lengths(op, lengths, T, B):
    if lengths is None:
        return None
    if isinstance(lengths, Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.is_meta:
            raise ValueError(f"{op}: lengths must hold values (a CPU tensor or on input's device), got a meta tensor")
        # Under torch.compile the values are data: the kernels' TORCH_CHECK checks them.
        values = None if torch.compiler.is_compiling() else lengths.tolist()
        lengths = lengths.detach().to("cpu", torch.int64)
    else:
        try:
            values = [int(v) for v in lengths]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{op}: lengths must be a tensor or sequence of integers ({exc})") from None
        lengths = torch.tensor(values, dtype=torch.int64, device="cpu")  # the kernels read them on the host
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{op}: lengths must have shape ({B},) (one per batch row), got {tuple(lengths.shape)}")
    if values is not None and any(v < 0 or v > T for v in values):
        raise ValueError(f"{op}: lengths must lie in [0, {T}] (the sequence length), got {values}")
    return lengths.contiguous()


def _validated(op, gates, input, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths):
    """Checks every argument before any kernel runs; returns the contiguous
    (x, h0, c0 or None, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)."""
    if w_hr is None and lengths is None:
        state = _validate.well_formed_rnn(gates, input, 3, hx, w_ih, w_hh, b_ih, b_hh)
        if state is not None:
            h0, c0 = state
            return [t if t is None else t.contiguous() for t in (input, h0, c0, w_ih, w_hh, b_ih, b_hh)] + [None, None]
    x = _validate.tensor(op, "input", input, ndim=3)
    if x.shape[0] == 0:
        raise ValueError(f"{op}: input must have at least one time step, got shape {tuple(x.shape)}")
    T, B, _ = x.shape
    _validate.tensor(op, "w_ih", w_ih, ndim=2)
    _validate.tensor(op, "w_hh", w_hh, ndim=2)
    rows, P = w_hh.shape
    if rows % gates:
        raise ValueError(f"{op}: w_hh must have {gates}*hidden_size rows, got shape {tuple(w_hh.shape)}")
    if rows == 0:
        raise ValueError(f"{op}: hidden_size must be >= 1 (w_hh has no rows), got w_hh of shape {tuple(w_hh.shape)}")
    H = rows // gates
    if w_hr is not None:
        _validate.tensor(op, "w_hr", w_hr, ndim=2)
        _validate.shape(op, "w_hr", w_hr, (P, H), "proj_size, hidden_size")
    elif P != H:
        raise ValueError(f"{op}: w_hh must have shape ({gates}*hidden_size, hidden_size), got {tuple(w_hh.shape)}")
    _validate.rnn_input_weights(op, x, w_ih, b_ih, b_hh, rows, gates)
    lstm = gates == 4
    if hx is None:
        h0 = x.new_zeros((B, P))
        c0 = x.new_zeros((B, H)) if lstm else None
    elif lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{op}: hx must be a tuple (h0, c0) of two tensors, got {type(hx).__name__}")
        h0 = _validate.tensor(op, "hx[0]", hx[0], ndim=2)
        c0 = _validate.tensor(op, "hx[1]", hx[1], ndim=2)
        _validate.shape(op, "hx[0]", h0, (B, P), "batch, proj_size or hidden_size")
        _validate.shape(op, "hx[1]", c0, (B, H), "batch, hidden_size")
    else:
        h0 = _validate.tensor(op, "hx", hx, ndim=2)
        _validate.shape(op, "hx", h0, (B, H), "batch, hidden_size")
        c0 = None
    named = [("input", x), ("hx[0]" if lstm else "hx", h0), ("hx[1]", c0), ("w_ih", w_ih), ("w_hh", w_hh),
             ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr)]
    _validate.same_dtype_and_device(op, named)
    lengths = _validated_lengths(op, lengths, T, B)
    return [None if t is None else t.contiguous() for _, t in named] + [lengths]


Lengths = Union[Tensor, Sequence[int], None]


def lstm(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    w_hr: Optional[Tensor] = None,
    lengths: Lengths = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One LSTM layer over a whole sequence, fused; torch.nn.LSTM's math.

    Args:
        input: (T, B, input_size), time-major; T >= 1.
        hx: (h0, c0), h0 (B, proj_size or hidden_size), c0 (B, hidden_size); None means zeros.
        w_ih: (4*hidden_size, input_size), gate rows in PyTorch's order i, f, g, o.
        w_hh: (4*hidden_size, proj_size or hidden_size).
        b_ih, b_hh: (4*hidden_size,) or None.
        w_hr: (proj_size, hidden_size) or None: the projection h = W_hr (o * tanh c).
        lengths: None, or (B,) integers in [0, T]: row b runs lengths[b] steps,
            then keeps its state and outputs zeros (PackedSequence semantics).

    Returns:
        (output (T, B, P), (h_n (B, P), c_n (B, hidden_size))), P = proj_size or hidden_size.
    """
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths = _validated(
        LSTM_OP, 4, input, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths
    )
    save = _eager.needs_grad((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)
    output, h_n, c_n, *_ = _eager.forward(_LstmFunction, _lstm_forward_kernels, _lstm_forward, *args, training=save)
    return output, (h_n, c_n)


def gru(
    input: Tensor,
    hx: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    lengths: Lengths = None,
) -> Tuple[Tensor, Tensor]:
    """One GRU layer over a whole sequence, fused; torch.nn.GRU's math (gates
    r, z, n; b_hn inside the reset product: n = tanh(W_in x + b_in + r * (W_hn h + b_hn))).

    Args:
        input: (T, B, input_size), time-major; T >= 1.
        hx: h0 (B, hidden_size) or None (zeros).
        w_ih: (3*hidden_size, input_size); w_hh: (3*hidden_size, hidden_size).
        b_ih, b_hh: (3*hidden_size,) or None.
        lengths: as for `lstm`.

    Returns:
        (output (T, B, hidden_size), h_n (B, hidden_size)). The backward saves `output` itself:
        edit it in place only after backward (attnkit.nn.GRU hands out a copy to edit).
    """
    x, h0, _, w_ih, w_hh, b_ih, b_hh, _, lengths = _validated(GRU_OP, 3, input, hx, w_ih, w_hh, b_ih, b_hh, None, lengths)
    save = _eager.needs_grad((x, h0, w_ih, w_hh, b_ih, b_hh))
    args = (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save)
    output, h_n, _ = _eager.forward(_GruFunction, _gru_forward_kernels, _gru_forward, *args, training=save)
    return output, h_n


def _describe_lstm(input, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None, *, w_hr=None, lengths=None):
    args = _validated(LSTM_OP, 4, input, hx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
    return _describe_call(args[0], args[4], 4, w_hr is not None, _eager.needs_grad(args[:8]))


def _describe_gru(input, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None, *, lengths=None):
    args = _validated(GRU_OP, 3, input, hx, w_ih, w_hh, b_ih, b_hh, None, lengths)
    return _describe_call(args[0], args[4], 3, False, _eager.needs_grad(args[:7]))


_dispatch.register_describer("lstm", _describe_lstm)
_dispatch.register_describer("gru", _describe_gru)
