"""Reference layer-normalized LSTM / GRU with zoneout, plain PyTorch, one layer
and one direction over a time-major sequence (the ground truth of the
attnkit.ops.layer_norm_lstm / layer_norm_gru tests).

LayerNormLSTM (Haste's formulation, gate order i, f, g, o as torch.nn):
    pre = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh
    c'  = f * c + i * g
    h'  = o * tanh(LN_c(c'))
LayerNormGRU (torch.nn.GRU's math on normalized projections):
    gi = LN_ih(W_ih x) + b_ih,  gh = LN_hh(W_hh h) + b_hh
    r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * gh_n)
    h' = (1 - z) * n + z * h
Each LN normalizes over the whole gate vector (4H or 3H; H for LN_c) with its
own gamma/beta and eps = 1e-5, like torch.nn.LayerNorm.

Zoneout on h only (c is never zoned out): with a mask m (T, B, H) of values
in [0, 1], h_t = m * h_{t-1} + (1 - m) * h'. Training passes a Bernoulli(p)
mask, eval the constant p (the expectation). The output at step t is h_t.
With `lengths`, rows past their length keep their state and output zeros.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EPS = 1e-5

LayerNormParams = Tuple[Tensor, Tensor]  # (gamma, beta)


def _normalized(v: Tensor) -> Tuple[Tensor, Tensor]:
    """(v - mean) / sqrt(var + eps) over the last dim, and 1 / sqrt(var + eps). The statistics in
    float32 at least (a float16 variance overflowed from a spread of ~256, zeroing the row), by
    Welford (var_mean: a constant row normalizes to exactly 0, where mean() rounded off by one
    ulp, times 1 / sqrt(eps))."""
    wide = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    var, mean = torch.var_mean(wide, -1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + EPS)
    return ((wide - mean) * rstd).to(v.dtype), rstd.squeeze(-1).to(v.dtype)


def _step_state(run, zone, new, prev):
    """The state after one step: zoneout mix, then rows that stopped keep prev."""
    mixed = new if zone is None else zone * prev + (1 - zone) * new
    return mixed if run is None else torch.where(run, mixed, prev)


def _running(lengths: Optional[Tensor], t: int, like: Tensor) -> Optional[Tensor]:
    return None if lengths is None else (lengths.to(like.device) > t).unsqueeze(1)


def layer_norm_lstm(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_ih: LayerNormParams, ln_hh: LayerNormParams, ln_c: LayerNormParams,
    lengths: Optional[Tensor] = None, zoneout: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """x (T, B, I), h0/c0 (B, H), w_ih (4H, I), w_hh (4H, H), biases (4H,) or None,
    ln_* (gamma, beta) pairs of (4H,), (4H,), (H,).
    Returns (output (T, B, H), h_n, c_n, xhat, hhat, gates, cs, chat, rstd): after the
    first three, what the kernels save for the backward (normalized projections
    (T, B, 4H), activated gates i, f, g, o (T, B, 4H), cell states and normalized cell
    states (T, B, H), the three LNs' 1/std (T, B, 3))."""
    xhat, rstd_x = _normalized(x @ w_ih.t())  # all steps at once
    gx = ln_ih[0] * xhat + ln_ih[1]
    for b in (b_ih, b_hh):
        gx = gx if b is None else gx + b
    h, c = h0, c0
    outputs, hhats, all_gates, cells, chats, rstds = [], [], [], [], [], []
    for t in range(x.shape[0]):
        hhat, rstd_h = _normalized(h @ w_hh.t())
        pre = gx[t] + ln_hh[0] * hhat + ln_hh[1]
        i, f, g, o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        chat, rstd_c = _normalized(c_new)
        h_new = o * torch.tanh(ln_c[0] * chat + ln_c[1])
        run = _running(lengths, t, x)
        h = _step_state(run, None if zoneout is None else zoneout[t], h_new, h)
        c = c_new if run is None else torch.where(run, c_new, c)
        outputs.append(h if run is None else torch.where(run, h, 0.0))
        hhats.append(hhat)
        all_gates.append(torch.cat([i, f, g, o], dim=1))
        cells.append(c)
        chats.append(chat)
        rstds.append(torch.stack([rstd_x[t], rstd_h, rstd_c], dim=1))
    saved = [torch.stack(v) for v in (hhats, all_gates, cells, chats, rstds)]
    return (torch.stack(outputs), h, c, xhat, *saved)


def layer_norm_gru(
    x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
    ln_ih: LayerNormParams, ln_hh: LayerNormParams,
    lengths: Optional[Tensor] = None, zoneout: Optional[Tensor] = None,
) -> Tuple[Tensor, ...]:
    """x (T, B, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), biases (3H,) or None,
    ln_* (gamma, beta) pairs of (3H,). Returns (output (T, B, H), h_n, xhat, hhat,
    gates, rstd): normalized projections (T, B, 3H), gates r, z, n, hn (T, B, 4H) with
    hn = LN_hh(W_hn h) + b_hn, the two LNs' 1/std (T, B, 2), as the kernels save them."""
    xhat, rstd_x = _normalized(x @ w_ih.t())
    gi_all = ln_ih[0] * xhat + ln_ih[1]
    if b_ih is not None:
        gi_all = gi_all + b_ih
    h = h0
    outputs, hhats, all_gates, rstds = [], [], [], []
    for t in range(x.shape[0]):
        hhat, rstd_h = _normalized(h @ w_hh.t())
        gh = ln_hh[0] * hhat + ln_hh[1]
        if b_hh is not None:
            gh = gh + b_hh
        i_r, i_z, i_n = gi_all[t].chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h_new = (1 - z) * n + z * h
        run = _running(lengths, t, x)
        h = _step_state(run, None if zoneout is None else zoneout[t], h_new, h)
        outputs.append(h if run is None else torch.where(run, h, 0.0))
        hhats.append(hhat)
        all_gates.append(torch.cat([r, z, n, h_n], dim=1))
        rstds.append(torch.stack([rstd_x[t], rstd_h], dim=1))
    return torch.stack(outputs), h, xhat, torch.stack(hhats), torch.stack(all_gates), torch.stack(rstds)
