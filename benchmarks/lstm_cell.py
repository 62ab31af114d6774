"""Fused LSTM cell step (attnkit.ops.lstm_cell, automatic backend) vs
torch.lstm_cell, forward and forward+backward, on the same inputs."""
from __future__ import annotations

import torch
from timing import max_error, median_ms

import attnkit

TITLE = "LSTM cell step: attnkit.ops.lstm_cell vs torch.lstm_cell"
QUICK_SHAPES = [(1, 256, 256), (64, 256, 256), (256, 512, 512)]  # (batch, input, hidden)
FULL_SHAPES = QUICK_SHAPES + [(16, 1024, 1024), (512, 1024, 1024)]


def inputs(batch, input_size, hidden, device, dtype):
    make = lambda *s: torch.randn(*s, device=device, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(batch, input_size), (make(batch, hidden), make(batch, hidden)), make(4 * hidden, input_size), make(
        4 * hidden, hidden
    ), make(4 * hidden), make(4 * hidden)


def fwd_bwd(cell, args):
    def step():
        h, c = cell(*args)
        (h.sum() + c.sum()).backward()

    return step


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    for batch, input_size, hidden in QUICK_SHAPES if quick else FULL_SHAPES:
        args = inputs(batch, input_size, hidden, device, dtype)
        ours, theirs = attnkit.ops.lstm_cell(*args), torch.lstm_cell(*args)
        backend = attnkit.last_dispatch("lstm_cell").backend
        error = max_error(ours, theirs)
        with torch.no_grad():
            t_ours = median_ms(lambda: attnkit.ops.lstm_cell(*args), device)
            t_theirs = median_ms(lambda: torch.lstm_cell(*args), device)
        shape = f"B={batch} I={input_size} H={hidden}"
        rows.append(dict(case="forward", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
        t_ours = median_ms(fwd_bwd(attnkit.ops.lstm_cell, args), device)
        t_theirs = median_ms(fwd_bwd(torch.lstm_cell, args), device)
        rows.append(dict(case="fwd+bwd", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    return rows
