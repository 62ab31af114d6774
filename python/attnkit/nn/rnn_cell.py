"""Drop-in `torch.nn.LSTMCell` running the fused attnkit op.

A subclass, so the parameters, state_dict keys, initialisation and
`isinstance(m, torch.nn.LSTMCell)` stay exactly those of torch.nn.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validate, ops
from ._share import check_from_torch, shared
from .rnn import _autocast, _autocast_dtype, _call_cell


class LSTMCell(torch.nn.LSTMCell):
    @classmethod
    def from_torch(cls, module: torch.nn.LSTMCell) -> "LSTMCell":
        """An attnkit.nn.LSTMCell sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, torch.nn.LSTMCell)
        return shared(cls, module)

    @_validate.torch_compatible_errors
    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if not isinstance(input, Tensor):
            raise TypeError(f"LSTMCell: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"LSTMCell: hx must be a tuple (h, c) of two tensors, got {type(hx).__name__}")
        states = () if hx is None else (("hx[0]", hx[0]), ("hx[1]", hx[1]))
        for state_name, state in states:
            if not isinstance(state, Tensor):
                raise TypeError(f"LSTMCell: {state_name} must be a torch.Tensor, got {type(state).__name__}")
            if state.dim() not in (1, 2):
                raise ValueError(f"LSTMCell: Expected {state_name} to be 1D or 2D, got {state.dim()}D instead")
        batched = input.dim() == 2
        x, state = input, hx
        if not batched:
            x = input.unsqueeze(0)
            if hx is not None:
                state = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if torch._C._is_any_autocast_enabled():
            dtype = _autocast_dtype(x, None if hx is None else state[1], lower_on_cpu=False)  # c sets torch's dtype
            x, *weights = _autocast(dtype, [x, *weights])
            state = None if hx is None else tuple(_autocast(dtype, state))
        names = ("input", "hx[0]", "hx[1]", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
        h, c = _call_cell("LSTMCell", lambda: ops.lstm_cell(x, state, *weights), input, states,
                          lambda: list(zip(names, (x, *(state or (None, None)), *weights))))
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c
