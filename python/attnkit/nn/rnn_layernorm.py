"""`attnkit.nn.LayerNormLSTM` / `LayerNormGRU`: layer-normalized recurrent
layers with zoneout (Haste's LayerNormLSTM idea; math in
attnkit.reference.rnn_layernorm), called like torch.nn.LSTM / GRU.

They subclass attnkit.nn.LSTM / GRU, so the call signature, returns,
PackedSequence, unbatched input, h0/c0, multi-layer, bidirectional and
inter-layer dropout all come from there (its `_stack`); only the layer op
differs. Parameters: torch.nn's (weight_ih_l{k}{suffix}, weight_hh_..., bias_ih_...,
bias_hh_...) plus, per layer and direction,
    ln_ih_weight_l{k}{suffix}, ln_ih_bias_l{k}{suffix}   LN of W_ih x  (gates*hidden_size)
    ln_hh_weight_l{k}{suffix}, ln_hh_bias_l{k}{suffix}   LN of W_hh h  (gates*hidden_size)
    ln_c_weight_l{k}{suffix},  ln_c_bias_l{k}{suffix}    LN of c, LSTM only (hidden_size)
with LN weights initialised to 1 and LN biases to 0. No proj_size.

Zoneout (on h only, per unit and step): in training each forward draws a
Bernoulli(zoneout) mask (T, B, hidden_size) per layer and direction, and
h_t = m * h_{t-1} + (1 - m) * h_new; in eval h_t = p * h_{t-1} + (1 - p) * h_new.
"""
from __future__ import annotations

import numbers
from typing import List

import torch
from torch import Tensor

from .. import ops
from .rnn import GRU, LSTM


def _check_zoneout(name: str, zoneout) -> float:
    if isinstance(zoneout, bool) or not isinstance(zoneout, numbers.Real) or not 0 <= zoneout <= 1:
        raise ValueError(f"{name}: zoneout must be a number in [0, 1], got {zoneout!r}")
    return float(zoneout)


class _LayerNormMixin:
    _ln_parts: tuple = ()  # (name, size multiple of hidden_size)

    def _add_layer_norms(self, factory_kwargs) -> None:
        self._ln_names: List[List[str]] = []
        directions = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                names = []
                for part, multiple in self._ln_parts:
                    for kind, fill in (("weight", 1.0), ("bias", 0.0)):
                        name = f"ln_{part}_{kind}{suffix}"
                        value = torch.full((multiple * self.hidden_size,), fill, **factory_kwargs)
                        self.register_parameter(name, torch.nn.Parameter(value))
                        names.append(name)
                self._ln_names.append(names)

    def reset_parameters(self) -> None:
        super().reset_parameters()  # uniform, like torch.nn; then the LNs back to identity
        for names in getattr(self, "_ln_names", []):
            for name in names:
                torch.nn.init.ones_(getattr(self, name)) if "_weight" in name else torch.nn.init.zeros_(getattr(self, name))

    @property
    def all_weights(self) -> List[List[Tensor]]:
        """torch.nn's per-layer weights, each list followed by that layer's LN parameters."""
        base = super().all_weights
        return [list(ws) + [getattr(self, n) for n in names] for ws, names in zip(base, self._ln_names)]

    def _layer_weights(self) -> List[List[Tensor]]:  # what _stack runs: all_weights, read once a forward
        return [ws + [getattr(self, n) for n in names] for ws, names in zip(super()._layer_weights(), self._ln_names)]

    def _zoneout_mask(self, x: Tensor):
        if self.zoneout == 0:
            return None
        shape = (x.shape[0], x.shape[1], self.hidden_size)
        if self.training:
            return torch.bernoulli(torch.full(shape, self.zoneout, dtype=x.dtype, device=x.device))
        return torch.full(shape, self.zoneout, dtype=x.dtype, device=x.device)

    @classmethod
    def from_torch(cls, module):
        raise NotImplementedError(f"{cls.__name__}.from_torch: torch.nn has no layer-normalized RNN to convert from")

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", zoneout={self.zoneout}" if self.zoneout else "")


class LayerNormLSTM(_LayerNormMixin, LSTM):
    """Layer-normalized LSTM with zoneout; torch.nn.LSTM's arguments (no proj_size)
    plus `zoneout`. pre = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh,
    c' = f*c + i*g, h' = o * tanh(LN_c(c')), then zoneout on h."""

    _ln_parts = (("ih", 4), ("hh", 4), ("c", 1))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, zoneout: float = 0.0,
                 device=None, dtype=None):
        self.zoneout = _check_zoneout("LayerNormLSTM", zoneout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self._add_layer_norms({"device": device, "dtype": dtype})

    def _run_layer(self, x, state, weights, lengths):
        w_ih, w_hh, *rest = weights
        b_ih, b_hh = (rest[0], rest[1]) if self.bias else (None, None)
        g_ih, be_ih, g_hh, be_hh, g_c, be_c = rest[-6:]
        out, (h, c) = ops.layer_norm_lstm(
            x, (state[0], state[1]), w_ih, w_hh, b_ih, b_hh, ln_ih=(g_ih, be_ih), ln_hh=(g_hh, be_hh),
            ln_c=(g_c, be_c), lengths=lengths, zoneout=self._zoneout_mask(x),
        )
        return out, (h, c)


class LayerNormGRU(_LayerNormMixin, GRU):
    """Layer-normalized GRU with zoneout; torch.nn.GRU's arguments plus `zoneout`.
    torch.nn.GRU's math on gi = LN_ih(W_ih x) + b_ih and gh = LN_hh(W_hh h) + b_hh."""

    _ln_parts = (("ih", 3), ("hh", 3))

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, zoneout: float = 0.0,
                 device=None, dtype=None):
        self.zoneout = _check_zoneout("LayerNormGRU", zoneout)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device=device, dtype=dtype)
        self._add_layer_norms({"device": device, "dtype": dtype})

    def _run_layer(self, x, state, weights, lengths):
        w_ih, w_hh, *rest = weights
        b_ih, b_hh = (rest[0], rest[1]) if self.bias else (None, None)
        g_ih, be_ih, g_hh, be_hh = rest[-4:]
        out, h = ops.layer_norm_gru(x, state[0], w_ih, w_hh, b_ih, b_hh, ln_ih=(g_ih, be_ih), ln_hh=(g_hh, be_hh),
                                    lengths=lengths, zoneout=self._zoneout_mask(x))
        return out, (h,)
