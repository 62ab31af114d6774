"""Reference recurrent cells in plain PyTorch (gate order as torch.nn: i, f, g, o)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM step. Returns (h_new, c_new, gates) with gates the activated
    (i, f, g, o) concatenated as (B, 4H), the layout the kernels save."""
    pre = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        pre = pre + b_ih
    if b_hh is not None:
        pre = pre + b_hh
    pre_i, pre_f, pre_g, pre_o = pre.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(pre_i), torch.sigmoid(pre_f), torch.tanh(pre_g), torch.sigmoid(pre_o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, c_new, torch.cat([i, f, g, o], dim=1)


def lstm_cell_backward(
    grad_h: Tensor, grad_c: Tensor, x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, gates: Tensor, c_new: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one LSTM step from its saved activations.
    Returns (dx, dh, dc, dw_ih, dw_hh, db); db is each bias's gradient."""
    i, f, g, o = gates.chunk(4, dim=1)
    tanh_c = torch.tanh(c_new)
    grad_c_total = grad_c + grad_h * o * (1 - tanh_c * tanh_c)
    grad_pre = torch.cat(
        [
            grad_c_total * g * i * (1 - i),
            grad_c_total * c * f * (1 - f),
            grad_c_total * i * (1 - g * g),
            grad_h * tanh_c * o * (1 - o),
        ],
        dim=1,
    )
    return grad_pre @ w_ih, grad_pre @ w_hh, grad_c_total * f, grad_pre.t() @ x, grad_pre.t() @ h, grad_pre.sum(0)
