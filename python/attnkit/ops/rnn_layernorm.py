"""`attnkit.ops.layer_norm_lstm` / `layer_norm_gru`: one layer-normalized LSTM
or GRU layer, one direction, over a whole time-major sequence, with optional
zoneout (the math: attnkit.reference.rnn_layernorm; the kernels:
csrc/cpu/rnn_layernorm.cpp). Stacks are attnkit.nn.LayerNormLSTM / LayerNormGRU.

torch.library custom ops with fake implementations and autograd formulas, like
attnkit.ops.lstm; the backend is chosen inside the op (see attnkit._dispatch). Under autocast
they compute in float32, as layer_norm (on autocast's float32 list): half inputs are cast to
it, and the kernels, their products included, run with autocast off (its products came back
in the autocast dtype, which the kernels do not take).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _autocast, _dispatch, _eager, _validate
from ..backends.rnn_layernorm import LAYER_NORM_GRU, LAYER_NORM_LSTM
from .._autocast import run_without_autocast
from .rnn import Lengths, _describe_tensors, _distinct, _validated, _zeros_if_none

LSTM_OP, GRU_OP = "attnkit.ops.layer_norm_lstm", "attnkit.ops.layer_norm_gru"

LayerNormParams = Sequence[Tensor]  # (gamma, beta)


# --------------------------------------------------------------------------- LSTM custom ops


@torch.library.custom_op("attnkit::ln_lstm_forward", mutates_args=())
def _ln_lstm_forward(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    g_ih: Tensor, be_ih: Tensor, g_hh: Tensor, be_hh: Tensor, g_c: Tensor, be_c: Tensor,
    lengths: Optional[Tensor], zoneout: Optional[Tensor], save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LAYER_NORM_LSTM.select(_describe_tensors(x))
    out = run_without_autocast(impl.forward, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c,
                               lengths, zoneout, save)
    return tuple(t.contiguous() for t in out)


@_ln_lstm_forward.register_fake
def _(x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, save):
    (T, B, _), H = x.shape, h0.shape[1]
    saved = lambda *shape: x.new_empty(shape if save else (0,))  # noqa: E731
    return (x.new_empty((T, B, H)), torch.empty_like(h0), torch.empty_like(c0), saved(T, B, 4 * H),
            saved(T, B, 4 * H), saved(T, B, 4 * H), saved(T, B, H), saved(T, B, H), saved(T, B, 3))


@torch.library.custom_op("attnkit::ln_lstm_backward", mutates_args=())
def _ln_lstm_backward(
    grad_output: Tensor, grad_hn: Tensor, grad_cn: Tensor, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor,
    w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], g_ih: Tensor, be_ih: Tensor, g_hh: Tensor,
    be_hh: Tensor, g_c: Tensor, be_c: Tensor, lengths: Optional[Tensor], zoneout: Optional[Tensor], output: Tensor,
    xhat: Tensor, hhat: Tensor, gates: Tensor, cs: Tensor, chat: Tensor, rstd: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LAYER_NORM_LSTM.select(_describe_tensors(x))
    grads = run_without_autocast(impl.backward, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih,
                                 be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, output, xhat, hhat, gates, cs, chat,
                                 rstd)
    return tuple(g.contiguous() for g in grads)


@_ln_lstm_backward.register_fake
def _(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths,
      zoneout, output, xhat, hhat, gates, cs, chat, rstd):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), torch.empty_like(g_ih), torch.empty_like(g_ih), torch.empty_like(g_hh),
            torch.empty_like(g_c), torch.empty_like(be_c))


def _ln_lstm_setup_context(ctx, inputs, output):
    *args, _save = inputs
    out, _, _, *saved = output
    ctx.save_for_backward(*args, out, *saved)
    ctx.mark_non_differentiable(*saved)


def _ln_lstm_autograd(ctx, grad_output, grad_hn, grad_cn, *_saved_grads):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, out, *saved = (
        ctx.saved_tensors
    )
    dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbe_c = _ln_lstm_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hn, h0), _zeros_if_none(grad_cn, c0),
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, out, *saved,
    )
    return _distinct((dx, dh0, dc0, dw_ih, dw_hh, db if b_ih is not None else None, db if b_hh is not None else None,
                      dg_ih, db, dg_hh, db, dg_c, dbe_c, None, None, None))


_eager.register_autograd(_ln_lstm_forward, _ln_lstm_autograd, _ln_lstm_setup_context)


# --------------------------------------------------------------------------- GRU custom ops


@torch.library.custom_op("attnkit::ln_gru_forward", mutates_args=())
def _ln_gru_forward(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    g_ih: Tensor, be_ih: Tensor, g_hh: Tensor, be_hh: Tensor, lengths: Optional[Tensor], zoneout: Optional[Tensor],
    save: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LAYER_NORM_GRU.select(_describe_tensors(x))
    out = run_without_autocast(impl.forward, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout,
                               save)
    return tuple(t.contiguous() for t in out)


@_ln_gru_forward.register_fake
def _(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save):
    (T, B, _), H = x.shape, h0.shape[1]
    saved = lambda *shape: x.new_empty(shape if save else (0,))  # noqa: E731
    return (x.new_empty((T, B, H)), torch.empty_like(h0), saved(T, B, 3 * H), saved(T, B, 3 * H), saved(T, B, 4 * H),
            saved(T, B, 2))


@torch.library.custom_op("attnkit::ln_gru_backward", mutates_args=())
def _ln_gru_backward(
    grad_output: Tensor, grad_hn: Tensor, x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
    b_hh: Optional[Tensor], g_ih: Tensor, be_ih: Tensor, g_hh: Tensor, be_hh: Tensor, lengths: Optional[Tensor],
    zoneout: Optional[Tensor], output: Tensor, xhat: Tensor, hhat: Tensor, gates: Tensor, rstd: Tensor,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = LAYER_NORM_GRU.select(_describe_tensors(x))
    grads = run_without_autocast(impl.backward, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh,
                                 be_hh, lengths, zoneout, output, xhat, hhat, gates, rstd)
    return tuple(g.contiguous() for g in grads)


@_ln_gru_backward.register_fake
def _(grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, output, xhat,
      hhat, gates, rstd):
    return (torch.empty_like(x), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            torch.empty_like(g_ih), torch.empty_like(g_hh), torch.empty_like(g_ih), torch.empty_like(g_hh))


def _ln_gru_setup_context(ctx, inputs, output):
    *args, _save = inputs
    out, _, *saved = output
    ctx.save_for_backward(*args, out, *saved)
    ctx.mark_non_differentiable(*saved)


def _ln_gru_autograd(ctx, grad_output, grad_hn, *_saved_grads):
    x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, out, *saved = ctx.saved_tensors
    dx, dh0, dw_ih, dw_hh, db_ih, db_hh, dg_ih, dg_hh = _ln_gru_backward(
        _zeros_if_none(grad_output, out), _zeros_if_none(grad_hn, h0),
        x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, out, *saved,
    )
    return _distinct((dx, dh0, dw_ih, dw_hh, db_ih if b_ih is not None else None,
                      db_hh if b_hh is not None else None, dg_ih, db_ih, dg_hh, db_hh, None, None, None))


_eager.register_autograd(_ln_gru_forward, _ln_gru_autograd, _ln_gru_setup_context)


# --------------------------------------------------------------------------- validation


def _float32_under_autocast(input, *args) -> tuple:
    """(input, *args) as autocast casts the arguments of layer_norm (on its float32 list):
    float16/bfloat16 tensors, inside tuples too, in float32 where autocast is on for the
    input's device; as they are elsewhere (and where input is no tensor: validation says so)."""
    if not isinstance(input, Tensor) or _autocast.lower_precision_dtype(input.device.type) is None:
        return (input, *args)

    def cast(value):
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v) for v in value)
        return _autocast.cast_floating(torch.float32, [value])[0]

    return tuple(cast(v) for v in (input, *args))


def _validated_ln(op: str, name: str, params, size: int, like: Tensor) -> List[Tensor]:
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise TypeError(f"{op}: {name} must be a (weight, bias) pair of tensors, got {type(params).__name__}")
    out = []
    for part, value in zip(("weight", "bias"), params):
        label = f"{name}[{0 if part == 'weight' else 1}] ({part})"
        _validate.tensor(op, label, value, ndim=1)
        _validate.shape(op, label, value, (size,), "the normalized size")
        _validate.same_dtype_and_device(op, [("input", like), (label, value)])
        out.append(value.contiguous())
    return out


def _validated_zoneout(op: str, zoneout, like: Tensor, H: int) -> Optional[Tensor]:
    if zoneout is None:
        return None
    T, B, _ = like.shape
    _validate.tensor(op, "zoneout", zoneout, ndim=3)
    _validate.shape(op, "zoneout", zoneout, (T, B, H), "T, batch, hidden_size")
    _validate.same_dtype_and_device(op, [("input", like), ("zoneout", zoneout)])
    if zoneout.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{op}: gradients with respect to zoneout are not implemented; pass zoneout.detach()")
    # Written so that NaN fails too.
    if not torch.compiler.is_compiling() and not zoneout.is_meta and not bool(((zoneout >= 0) & (zoneout <= 1)).all()):
        raise ValueError(f"{op}: zoneout must hold values in [0, 1] (the probability of keeping h_(t-1))")
    return zoneout.contiguous()


def layer_norm_lstm(
    input: Tensor,
    hx: Optional[Tuple[Tensor, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    ln_ih: LayerNormParams,
    ln_hh: LayerNormParams,
    ln_c: LayerNormParams,
    lengths: Lengths = None,
    zoneout: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One layer-normalized LSTM layer over a whole sequence, fused:
    pre = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh, c' = f*c + i*g,
    h' = o * tanh(LN_c(c')), h_t = m*h_(t-1) + (1-m)*h' (zoneout, on h only).

    Args:
        input: (T, B, input_size), time-major; T >= 1.
        hx: (h0, c0), each (B, hidden_size); None means zeros.
        w_ih: (4*hidden_size, input_size), gates i, f, g, o; w_hh: (4*hidden_size, hidden_size).
        b_ih, b_hh: (4*hidden_size,) or None.
        ln_ih, ln_hh: (weight, bias) of the LNs over the 4*hidden_size projections; ln_c: of the LN of c (hidden_size).
        lengths: None, or (B,) integers in [0, T] (PackedSequence semantics, as attnkit.ops.lstm).
        zoneout: None, or (T, B, hidden_size) values m in [0, 1]: a Bernoulli(p) mask in training, p at eval.

    Returns:
        (output (T, B, hidden_size), (h_n, c_n)); output[t] is h_t after zoneout.
    """
    input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, zoneout = _float32_under_autocast(
        input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, zoneout
    )
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _, lengths = _validated(
        LSTM_OP, 4, input, hx, w_ih, w_hh, b_ih, b_hh, None, lengths
    )
    H = w_hh.shape[1]
    g_ih, be_ih = _validated_ln(LSTM_OP, "ln_ih", ln_ih, 4 * H, x)
    g_hh, be_hh = _validated_ln(LSTM_OP, "ln_hh", ln_hh, 4 * H, x)
    g_c, be_c = _validated_ln(LSTM_OP, "ln_c", ln_c, H, x)
    zoneout = _validated_zoneout(LSTM_OP, zoneout, x, H)
    _eager.refuse_differentiating_transforms(LSTM_OP)
    _eager.refuse_forward_ad(LSTM_OP, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c))
    save = _eager.needs_grad((x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c))
    output, h_n, c_n, *_ = _ln_lstm_forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, save
    )
    return output, (h_n, c_n)


def layer_norm_gru(
    input: Tensor,
    hx: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    ln_ih: LayerNormParams,
    ln_hh: LayerNormParams,
    lengths: Lengths = None,
    zoneout: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One layer-normalized GRU layer over a whole sequence, fused: torch.nn.GRU's
    math on gi = LN_ih(W_ih x) + b_ih and gh = LN_hh(W_hh h) + b_hh (b_hn, and
    LN_hh's n part, inside the reset product), then zoneout on h.

    Args:
        input: (T, B, input_size); hx: h0 (B, hidden_size) or None (zeros).
        w_ih: (3*hidden_size, input_size), gates r, z, n; w_hh: (3*hidden_size, hidden_size).
        b_ih, b_hh: (3*hidden_size,) or None.
        ln_ih, ln_hh: (weight, bias) of the LNs over the 3*hidden_size projections.
        lengths, zoneout: as for `layer_norm_lstm`.

    Returns:
        (output (T, B, hidden_size), h_n (B, hidden_size)).
    """
    input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, zoneout = _float32_under_autocast(
        input, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, zoneout
    )
    x, h0, _, w_ih, w_hh, b_ih, b_hh, _, lengths = _validated(GRU_OP, 3, input, hx, w_ih, w_hh, b_ih, b_hh, None, lengths)
    H = w_hh.shape[1]
    g_ih, be_ih = _validated_ln(GRU_OP, "ln_ih", ln_ih, 3 * H, x)
    g_hh, be_hh = _validated_ln(GRU_OP, "ln_hh", ln_hh, 3 * H, x)
    zoneout = _validated_zoneout(GRU_OP, zoneout, x, H)
    _eager.refuse_differentiating_transforms(GRU_OP)
    _eager.refuse_forward_ad(GRU_OP, (x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh))
    save = _eager.needs_grad((x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh))
    output, h_n, *_ = _ln_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save)
    return output, h_n


def _describe(op, gates):
    def describe(input, hx=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None, **_):
        return _describe_tensors(_validated(op, gates, input, hx, w_ih, w_hh, b_ih, b_hh, None, None)[0])
    return describe


_dispatch.register_describer("layer_norm_lstm", _describe(LSTM_OP, 4))
_dispatch.register_describer("layer_norm_gru", _describe(GRU_OP, 3))
