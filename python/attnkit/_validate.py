"""Argument checks at the op boundary: every error names the argument and
what was expected, and is raised before any kernel runs."""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Plain tensors (Parameter: a module's weights). Any other subclass (FakeTensor,
# FunctionalTensor, DTensor, ...) may need the custom ops' registrations and the
# full checks: the eager route (attnkit._eager) and the ops' fast checks take only these.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def broadcast_shapes(*shapes: Sequence[int]) -> tuple:
    """torch.broadcast_shapes: in plain Python for an eager call's int sizes (torch's runs its
    reference implementation, ~15 us a call: the drop-in SDPA's largest cost at small shapes);
    torch's own for symbolic sizes (compile, export, tracing), whose comparisons would add guards."""
    rank = max(map(len, shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, size in enumerate(shape, rank - len(shape)):
            if type(size) is not int:
                return tuple(torch.broadcast_shapes(*shapes))
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast (dim {i - rank})")
                out[i] = size
    return tuple(out)


def tensor(op: str, name: str, value, ndim: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(value.dtype).replace('torch.', '')}; expected one of {expected}")
    return value


def shape(op: str, name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)} ({meaning}), got {tuple(value.shape)}")


def same_dtype_and_device(op: str, named: Iterable[tuple]) -> None:
    """`named`: (name, tensor or None) pairs; the first tensor sets the expectation."""
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, value in present[1:]:
        if value.device != first.device:
            raise RuntimeError(f"{op}: {name} is on {value.device} but {first_name} is on {first.device}; expected one device")
        if value.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {value.dtype} but {first_name} has {first.dtype}; expected one dtype")


def rnn_input_weights(op: str, x, w_ih, b_ih, b_hh, rows: int, gates: int) -> None:
    """Checks shared by every RNN op once w_hh fixed `rows` = gates * hidden_size:
    w_ih has those rows and x's feature width, each bias has `rows` entries."""
    if w_ih.shape[0] != rows:
        raise ValueError(f"{op}: w_ih must have {gates}*hidden_size = {rows} rows like w_hh, got shape {tuple(w_ih.shape)}")
    if x.shape[-1] != w_ih.shape[1]:
        raise ValueError(
            f"{op}: input has {x.shape[-1]} features but w_ih expects input_size {w_ih.shape[1]} "
            f"(input shape {tuple(x.shape)}, w_ih shape {tuple(w_ih.shape)})"
        )
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            tensor(op, name, bias, ndim=1)
            shape(op, name, bias, (rows,), f"{gates}*hidden_size")


def well_formed_rnn(gates: int, x, x_ndim: int, hx, w_ih, w_hh, b_ih, b_hh):
    """The common call of an RNN op, checked in a few comparisons instead of the
    named checks (~6 us, a few percent of a batch-1 LSTM layer, a fifth of a
    batch-1 cell step): x (T, B, I) with T >= 1 (x_ndim 3, ops.lstm / gru) or
    (B, I) with B >= 1 (x_ndim 2, the cells), both biases, hx a tuple (LSTM) or
    tensor (GRU) or None, all plain tensors of one floating dtype on one device,
    with the expected shapes. Returns (h0, c0 or None), zeros for hx None, or
    None when anything differs: the op then runs its full checks, which name the
    culprit."""
    if type(x) not in PLAIN_TENSORS or type(w_ih) not in PLAIN_TENSORS or type(w_hh) not in PLAIN_TENSORS:
        return None
    if type(b_ih) not in PLAIN_TENSORS or type(b_hh) not in PLAIN_TENSORS or x.dim() != x_ndim:
        return None
    if hx is None:
        h0 = c0 = None
    elif gates == 4:
        if type(hx) is not tuple or len(hx) != 2:
            return None
        h0, c0 = hx
        if type(c0) not in PLAIN_TENSORS or type(h0) not in PLAIN_TENSORS:
            return None
    else:
        h0, c0 = hx, None
        if type(h0) not in PLAIN_TENSORS:
            return None
    dtype, device = x.dtype, x.device
    if dtype not in FLOAT_DTYPES or x.shape[0] == 0:
        return None
    B, I = x.shape[-2], x.shape[-1]
    rows, H = w_hh.shape if w_hh.dim() == 2 else (0, 0)
    if rows != gates * H or H == 0 or w_ih.shape != (rows, I) or b_ih.shape != (rows,) or b_hh.shape != (rows,):
        return None
    if h0 is not None and (h0.shape != (B, H) or (c0 is not None and c0.shape != (B, H))):
        return None
    for t in (w_ih, w_hh, b_ih, b_hh, h0, c0):
        if t is not None and (t.dtype != dtype or t.device != device):
            return None
    if hx is None:  # one zeros tensor for both states: the kernels do not write their inputs
        h0 = x.new_zeros((B, H))
        c0 = h0 if gates == 4 else None
    return h0, c0


class DropInValueError(ValueError, RuntimeError):
    """A ValueError that a drop-in raises where the torch function it replaces raises
    RuntimeError: a caller's `except RuntimeError:` written for torch still catches it
    (numpy's AxisError is a ValueError and an IndexError for the same reason)."""


class DropInTypeError(TypeError, RuntimeError):
    """A TypeError that a drop-in raises where torch raises RuntimeError (see DropInValueError)."""


class DropInShapeError(RuntimeError, AssertionError):
    """A shape error where torch raises RuntimeError for some configurations and AssertionError
    for others (nn.MultiheadAttention's key/value widths: packed vs separate projection
    weights): an `except` written for either catches it."""


def torch_compatible_errors(function: Callable) -> Callable:
    """Wraps a drop-in's forward (or function): its ValueError and TypeError for bad input
    are also RuntimeErrors, as torch's checks raise for the same input."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError) as error:
            compatible = {ValueError: DropInValueError, TypeError: DropInTypeError}.get(type(error))
            if compatible is None:  # already one, or an exception class of its own
                raise
            raise compatible(*error.args).with_traceback(error.__traceback__) from None

    return wrapper
