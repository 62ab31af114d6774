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


def _running(lengths: Optional[Tensor], t: int, like: Tensor) -> Optional[Tensor]:
    """(B, 1) bool: which rows still run at step t (None: all of them)."""
    if lengths is None:
        return None
    return (lengths.to(like.device) > t).unsqueeze(1)


def lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer over x (T, B, I), one direction, a loop over time.

    With `w_hr` (proj_size, H) the hidden state is projected, h = W_hr (o * tanh c).
    With `lengths` (B,), row b stops after lengths[b] steps: its state is kept
    and its output is 0 (PackedSequence semantics).
    Returns (output (T,B,P), h_n, c_n, gates, cs, hc): the last three are what
    the kernels save for the backward (activated gates (T,B,4H), cell states
    (T,B,H), o * tanh(c) before the projection (T,B,H), empty without w_hr).
    """
    h, c = h0, c0
    outputs, all_gates, cells, hcs = [], [], [], []
    for t in range(x.shape[0]):
        hc, c_new, gates = lstm_cell(x[t], h, c, w_ih, w_hh, b_ih, b_hh)
        h_new = hc if w_hr is None else hc @ w_hr.t()
        run = _running(lengths, t, x)
        if run is None:
            h, c, out = h_new, c_new, h_new
        else:
            h, c = torch.where(run, h_new, h), torch.where(run, c_new, c)
            out, hc = torch.where(run, h_new, 0.0), torch.where(run, hc, 0.0)
        outputs.append(out)
        all_gates.append(gates)
        cells.append(c)
        hcs.append(hc)
    empty = x.new_empty((0,))
    hc_all = torch.stack(hcs) if w_hr is not None else empty
    return torch.stack(outputs), h, c, torch.stack(all_gates), torch.stack(cells), hc_all


def gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """One GRU step as torch.nn.GRUCell computes it (r, z, n order; b_hn inside
    the reset product). Returns (h_new, gates) with gates (B, 4H) = r, z, n, hn."""
    gi = x @ w_ih.t()
    gh = h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, torch.cat([r, z, n, h_n], dim=1)


def gru(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One GRU layer over x (T, B, I), one direction. Returns (output, h_n,
    gates) with gates (T, B, 4H) = r, z, n, hn as the kernels save them."""
    h = h0
    outputs, all_gates = [], []
    for t in range(x.shape[0]):
        h_new, gates = gru_cell(x[t], h, w_ih, w_hh, b_ih, b_hh)
        run = _running(lengths, t, x)
        if run is None:
            h, out = h_new, h_new
        else:
            h, out = torch.where(run, h_new, h), torch.where(run, h_new, 0.0)
        outputs.append(out)
        all_gates.append(gates)
    return torch.stack(outputs), h, torch.stack(all_gates)
