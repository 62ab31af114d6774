"""Drop-in `torch.nn.LSTM`, `torch.nn.GRU` and `torch.nn.GRUCell` running the
fused attnkit ops (attnkit.ops.lstm / gru: one layer, one direction each).

Subclasses, so parameters, flat weights, state_dict keys, initialisation,
argument checks and error messages stay exactly torch.nn's. The forward
follows torch.nn's step by step and replaces only the `_VF.lstm` / `_VF.gru`
call by `_stack`, which composes layers and directions:
- PackedSequence input is unpacked to a padded, time-major batch in the
  packed (sorted) order; each sequence's length goes to the kernels, which
  stop that row there (no padding steps are computed into the state), and
  the output is packed again;
- the reverse direction runs on each sequence reversed within its length;
- dropout (training only) goes between layers, as torch.nn does.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import _validate, ops
from ._share import check_from_torch, shared
from .._autocast import cast_floating as _autocast
from .._validate import PLAIN_TENSORS


def _reverse(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """x (T, B, N) with each sequence reversed within its length (steps past
    a length stay where they are); its own inverse."""
    if lengths is None:
        return x.flip(0)
    steps = torch.arange(x.shape[0], device=lengths.device).unsqueeze(1)  # not torch's default device
    index = torch.where(steps < lengths, lengths - 1 - steps, steps).to(x.device)
    return x.gather(0, index.unsqueeze(2).expand_as(x))


def _unpack(data: Tensor, batch_sizes: Tensor):
    """Packed data -> (padded (T, B, N) in packed order, lengths (B,) int64 CPU)."""
    padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes, None, None))
    return padded, lengths


def _stack(module, run_layer, input: Tensor, batch_sizes: Optional[Tensor], states: List[Tensor]):
    """Runs every layer and direction. `run_layer(x, states_at_index, weights,
    lengths)` -> (output, final states); `states` are (L*D, B, N) tensors.
    Returns (output in the input's layout, list of final (L*D, B, N) states)."""
    if batch_sizes is not None:
        x, lengths = _unpack(input, batch_sizes)
    else:
        x, lengths = (input.transpose(0, 1) if module.batch_first else input), None
    directions = 2 if module.bidirectional else 1
    weights = module._layer_weights()
    finals: List[List[Tensor]] = [[] for _ in states]
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            seq = layer_input if direction == 0 else _reverse(layer_input, lengths)
            out, final = run_layer(seq.contiguous(), [s[index] for s in states], weights[index], lengths)
            outputs.append(out if direction == 0 else _reverse(out, lengths))
            for kept, state in zip(finals, final):
                kept.append(state)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = _dropout(layer_input, module.dropout, batch_sizes, lengths)
    output = layer_input
    if batch_sizes is not None:
        output = pack_padded_sequence(output, lengths).data
    elif module.batch_first:
        output = output.transpose(0, 1)
    # One layer and direction: a view, not torch.stack's copy (a few us of a batch-1 step).
    return output, [kept[0].unsqueeze(0) if len(kept) == 1 else torch.stack(kept) for kept in finals]


def _layer_weights(module) -> List[List[Tensor]]:
    """Each layer and direction's weights, taken from _flat_weights, which forward has just
    refreshed: a parametrized weight (spectral_norm, orthogonal) is computed there once a
    forward, as in torch.nn; all_weights computes every weight again at each access, and
    spectral_norm's power iteration advanced with each."""
    flat = iter(module._flat_weights)
    return [[next(flat) for _ in names] for names in module._all_weights]


def _weights_have_changed(module) -> bool:
    """torch.nn.RNNBase._weights_have_changed (whether functional_call or the like swapped a
    weight since _flat_weights was built), reading each weight from _parameters where that is
    what getattr gives: for attnkit's own classes (no parametrization, whose subclass makes the
    weights properties) and names neither set on the instance (WeightDrop-style code deletes
    the parameter and sets a tensor) nor moved elsewhere. torch's hasattr + getattr pairs go
    through nn.Module.__getattr__: 4.2 against 0.6 us a forward (LSTM, one layer)."""
    if type(module) not in _OWN_CLASSES:
        return torch.nn.RNNBase._weights_have_changed(module)
    params, attributes = module._parameters, module.__dict__
    for ref, name in zip(module._flat_weight_refs, module._flat_weights_names):
        if name in attributes or name not in params:
            return torch.nn.RNNBase._weights_have_changed(module)
        weight = params[name]
        if weight is not None and ref is not None and ref() is not weight:
            return True
    return False


def _editable(output: Tensor) -> Tensor:
    """A GRU layer's output as the caller may edit it in place (F.relu(out, inplace=True),
    out += skip), as torch.nn.GRU allows: the fused op saved `output` itself for its backward,
    so the caller gets a copy when autograd recorded the call. (torch.nn.LSTM's output is
    saved by torch's oneDNN path, which raises: see `_lstm_editable`.) Under
    torch.jit.trace always, as the ops' `save`: a traced graph must not depend on grad mode."""
    return output.clone() if output.requires_grad or torch.jit.is_tracing() else output


def _lstm_editable(module: torch.nn.LSTM, output: Tensor) -> Tensor:
    """An LSTM's output, editable in place where torch.nn.LSTM's is: its CPU path saves no
    output except under oneDNN (float32 and bfloat16 without projections), which raises as
    ours does; cuDNN raises too. Elsewhere a copy, as `_editable`."""
    oneDNN = output.dtype in (torch.float32, torch.bfloat16) and module.proj_size == 0
    return output if output.device.type != "cpu" or oneDNN else _editable(output)


def _dropout(x: Tensor, p: float, batch_sizes: Optional[Tensor], lengths: Optional[Tensor]) -> Tensor:
    """Dropout between layers drawn as torch.nn's RNNs draw it: over the packed rows for a
    PackedSequence (so the same seed gives the same mask and leaves the generator where torch does)."""
    if batch_sizes is None:
        return F.dropout(x, p, training=True)
    dropped = F.dropout(pack_padded_sequence(x, lengths).data, p, training=True)
    return _unpack(dropped, batch_sizes)[0]


def _one_layer_call(module, input: Tensor, states) -> bool:
    """A one-layer, one-direction module (no proj_size) called on a plain 3-D
    tensor with each state given 3-D: it skips _stack's bookkeeping and
    torch.nn's (L*D, B, H) zero states, a quarter of the Python around a
    short sequence (LSTM (1, 2, 128): 40 -> 33 us a forward)."""
    return (
        type(input) in PLAIN_TENSORS
        and input.dim() == 3
        and module.num_layers == 1
        and not module.bidirectional
        and module.proj_size == 0
        and all(type(s) in PLAIN_TENSORS and s.dim() == 3 for s in states)
    )


def _check_types(name: str, input, states) -> None:
    """TypeErrors naming the argument, where torch.nn's forward fails on an attribute of it."""
    if not isinstance(input, (Tensor, PackedSequence)):
        raise TypeError(f"{name}: input must be a torch.Tensor or a PackedSequence, got {type(input).__name__}")
    for state_name, state in states:
        if not isinstance(state, Tensor):
            raise TypeError(f"{name}: {state_name} must be a torch.Tensor, got {type(state).__name__}")


def _one_layer_states(module, input: Tensor, hx, count: int):
    """The one-layer call's initial states, (B, H) each, after torch.nn's checks:
    zeros (one tensor: the ops do not write their inputs) or hx's only layer."""
    if hx is None:
        module.check_input(input, None)
        zeros = input.new_zeros((input.shape[0 if module.batch_first else 1], module.hidden_size))
        return [zeros] * count
    module.check_forward_args(input, hx, None)
    return [s[0] for s in hx] if count > 1 else [hx[0]]


def _autocast_dtype(x: Tensor, state: Optional[Tensor], lower_on_cpu: bool) -> Optional[torch.dtype]:
    """The dtype torch.nn's module computes in under autocast, or None (autocast off
    for x's device, or float64, which autocast leaves alone). torch.nn runs in the
    autocast dtype where its op is on the device's lower-precision list: LSTM's on
    the CPU (mkldnn_rnn_layer) and every recurrent op on CUDA (_cudnn_rnn, lstm_cell,
    gru_cell). GRU and the cells on the CPU are composite: their matmuls run in the
    autocast dtype, but the state update promotes, so they return the state's dtype
    (the input's when no state is given; torch 2.14 measured): computed in it here."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64:
        return None
    if lower_on_cpu or device != "cpu":
        return torch.get_autocast_dtype(device)
    dtype = x.dtype if state is None else state.dtype
    return None if dtype == torch.float64 else dtype


def _call_cell(name: str, call, input: Tensor, states, named):
    """call(), a cell's op call; where it fails, the error _cell_error gives in terms
    of what the user passed (`named()`: as _cell_error's `named`), if any."""
    try:
        return call()
    except (TypeError, ValueError, RuntimeError):
        error = _cell_error(name, input, states, named())
        if error is None:
            raise
        raise error from None


def _cell_error(name: str, input: Tensor, states, named) -> Optional[Exception]:
    """Why a cell's op call failed, in terms of what the user passed, or None: the op
    saw unbatched input and states as a batch of one (GRUCell's also as one step) and
    named those shapes, and itself. Checked after a failure only, so a step pays
    nothing for it. `states`: (name, tensor) pairs as passed; `named`: (name, tensor
    or None) pairs as the op got them (unsqueezed, autocast), input first, then
    the states, weight_ih, weight_hh and the biases."""
    w_ih, w_hh = named[-4][1], named[-3][1]
    if input.shape[-1] != w_ih.shape[-1]:
        return ValueError(f"{name}: input has {input.shape[-1]} features but weight_ih expects input_size "
                          f"{w_ih.shape[-1]} (input shape {tuple(input.shape)})")
    batched, hidden = input.dim() == 2, w_hh.shape[-1]
    expected, meaning = ((input.shape[0], hidden), "batch, hidden_size") if batched else ((hidden,), "hidden_size")
    for state_name, state in states:
        if state.shape != expected:
            kind = "batched 2-D" if batched else "unbatched 1-D"
            return ValueError(f"{name}: {state_name} must have shape {expected} ({meaning}) for {kind} input of "
                              f"shape {tuple(input.shape)}, got {tuple(state.shape)}")
    try:
        _validate.same_dtype_and_device(name, named)
    except (TypeError, RuntimeError) as error:
        return error
    return None


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM with the fused attnkit kernels; same arguments and semantics."""

    @classmethod
    def from_torch(cls, module: torch.nn.LSTM) -> "LSTM":
        """An attnkit.nn.LSTM sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, torch.nn.LSTM)
        return _adopt(cls, module)

    _layer_weights = _layer_weights
    _weights_have_changed = _weights_have_changed

    def _run_layer(self, x, state, weights, lengths):
        if torch._C._is_any_autocast_enabled():  # as torch.nn.RNNBase checks it: ~0.2 us
            # torch runs a packed LSTM composite (not oneDNN's op on the lower-precision list): as GRU
            dtype = _autocast_dtype(x, state[1], lower_on_cpu=lengths is None)
            x, *state = _autocast(dtype, [x, *state])
            weights = _autocast(dtype, weights)
        w_ih, w_hh, *rest = weights
        b_ih, b_hh = (rest[0], rest[1]) if self.bias else (None, None)
        w_hr = rest[-1] if self.proj_size > 0 else None
        out, (h, c) = ops.lstm(x, (state[0], state[1]), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths)
        return out, (h, c)

    @_validate.torch_compatible_errors
    def forward(self, input, hx=None):  # follows torch.nn.LSTM.forward
        self._update_flat_weights()  # as torch's: functional_call swaps the weights (its dtype check reads them)
        if (hx is None or (type(hx) is tuple and len(hx) == 2)) and _one_layer_call(self, input, hx or ()):
            x = input.transpose(0, 1) if self.batch_first else input
            states = _one_layer_states(self, input, hx, 2)
            out, (h, c) = self._run_layer(x.contiguous(), states, self._layer_weights()[0], None)
            out = _lstm_editable(self, out)
            return (out.transpose(0, 1) if self.batch_first else out), (h.unsqueeze(0), c.unsqueeze(0))
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            got = f"{len(hx)} states" if isinstance(hx, (tuple, list)) else type(hx).__name__
            raise RuntimeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {got}")
        _check_types("LSTM", input, () if hx is None else zip(("h_0", "c_0"), hx))
        orig_input = input
        batch_sizes = None
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = self._zeros(input, max_batch_size, real_hidden_size), self._zeros(input, max_batch_size, self.hidden_size)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(input, hx, batch_sizes)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
            if hx is None:
                hx = self._zeros(input, max_batch_size, real_hidden_size), self._zeros(input, max_batch_size, self.hidden_size)
            else:
                if is_batched and (hx[0].dim() != 3 or hx[1].dim() != 3):
                    raise RuntimeError(
                        "For batched 3-D input, hx and cx should "
                        f"also be 3-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                    )
                if not is_batched:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError(
                            "For unbatched 2-D input, hx and cx should "
                            f"also be 2-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                        )
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(input, hx, batch_sizes)

        output, (h_n, c_n) = _stack(self, self._run_layer, input, batch_sizes, list(hx))
        output = _lstm_editable(self, output)
        hidden = (h_n, c_n)
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = (h_n.squeeze(1), c_n.squeeze(1))
        return output, self.permute_hidden(hidden, unsorted_indices)

    def _zeros(self, input, batch, size):
        directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * directions, batch, size, dtype=input.dtype, device=input.device)


class GRU(torch.nn.GRU):
    """torch.nn.GRU with the fused attnkit kernels; same arguments and semantics."""

    @classmethod
    def from_torch(cls, module: torch.nn.GRU) -> "GRU":
        """An attnkit.nn.GRU sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, torch.nn.GRU)
        return _adopt(cls, module)

    _layer_weights = _layer_weights
    _weights_have_changed = _weights_have_changed

    def _run_layer(self, x, state, weights, lengths):
        if torch._C._is_any_autocast_enabled():
            dtype = _autocast_dtype(x, state[0], lower_on_cpu=False)
            x, *state = _autocast(dtype, [x, *state])
            weights = _autocast(dtype, weights)
        w_ih, w_hh, *rest = weights
        b_ih, b_hh = (rest[0], rest[1]) if self.bias else (None, None)
        out, h = ops.gru(x, state[0], w_ih, w_hh, b_ih, b_hh, lengths=lengths)
        return out, (h,)

    @_validate.torch_compatible_errors
    def forward(self, input, hx=None):  # follows torch.nn.GRU.forward
        self._update_flat_weights()  # as torch's: functional_call swaps the weights (its dtype check reads them)
        if _one_layer_call(self, input, () if hx is None else (hx,)):
            x = input.transpose(0, 1) if self.batch_first else input
            out, (h,) = self._run_layer(x.contiguous(), _one_layer_states(self, input, hx, 1), self._layer_weights()[0], None)
            out = _editable(out)
            return (out.transpose(0, 1) if self.batch_first else out), h.unsqueeze(0)
        _check_types("GRU", input, () if hx is None else (("hx", hx),))
        orig_input = input
        directions = 2 if self.bidirectional else 1
        if isinstance(orig_input, PackedSequence):
            input, batch_sizes, sorted_indices, unsorted_indices = input
            max_batch_size = int(batch_sizes[0])
            if hx is None:
                hx = torch.zeros(self.num_layers * directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
            else:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            batch_sizes = None
            if input.dim() not in (2, 3):
                raise ValueError(f"GRU: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            max_batch_size = input.size(0) if self.batch_first else input.size(1)
            sorted_indices = unsorted_indices = None
            if hx is None:
                hx = torch.zeros(self.num_layers * directions, max_batch_size, self.hidden_size,
                                 dtype=input.dtype, device=input.device)
        self.check_forward_args(input, hx, batch_sizes)

        output, (hidden,) = _stack(self, self._run_layer, input, batch_sizes, [hx])
        if directions == 1 and batch_sizes is None:  # the last layer's output itself (or its transpose)
            output = _editable(output)
        if isinstance(orig_input, PackedSequence):
            return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.permute_hidden(
                hidden, unsorted_indices
            )
        if not is_batched:
            output = output.squeeze(batch_dim)
            hidden = hidden.squeeze(1)
        return output, self.permute_hidden(hidden, unsorted_indices)


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell as one step of the fused GRU op; same arguments and state_dict."""

    @classmethod
    def from_torch(cls, module: torch.nn.GRUCell) -> "GRUCell":
        """An attnkit.nn.GRUCell sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, torch.nn.GRUCell)
        return shared(cls, module)

    @_validate.torch_compatible_errors
    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"GRUCell: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and not isinstance(hx, Tensor):
            raise TypeError(f"GRUCell: hx must be a torch.Tensor, got {type(hx).__name__}")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        if self.hidden_size == 0:  # torch's empty state: nothing for a kernel (ops.gru takes H >= 1)
            return super().forward(input, hx)
        states = () if hx is None else (("hx", hx),)
        batched = input.dim() == 2
        x, h0 = (input, hx) if batched else (input.unsqueeze(0), None if hx is None else hx.unsqueeze(0))
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if torch._C._is_any_autocast_enabled():
            dtype = _autocast_dtype(x, h0, lower_on_cpu=False)
            x, h0, *weights = _autocast(dtype, [x, h0, *weights])
        names = ("input", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
        _, h = _call_cell("GRUCell", lambda: ops.gru(x.unsqueeze(0), h0, *weights), input, states,
                          lambda: list(zip(names, (x, h0, *weights))))
        return h if batched else h.squeeze(0)


_OWN_CLASSES = (LSTM, GRU)


def _adopt(cls, module):
    """A `cls` instance sharing `module`'s Parameter objects (nn._share), its flat weights rebuilt."""
    new = shared(cls, module)
    new._init_flat_weights()
    return new
