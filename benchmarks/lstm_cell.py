"""Fused LSTM cell step (attnkit.ops.lstm_cell, automatic backend) vs
torch.lstm_cell, forward and forward+backward, on the same inputs."""
from __future__ import annotations

import torch
from timing import gradient_error, max_error, median_pair_ms

import attnkit

TITLE = "LSTM cell step: attnkit.ops.lstm_cell vs torch.lstm_cell"
QUICK_SHAPES = [(1, 256, 256), (64, 256, 256), (256, 512, 512)]  # (batch, input, hidden)
FULL_SHAPES = QUICK_SHAPES + [(16, 1024, 1024), (512, 1024, 1024)]


def inputs(batch, input_size, hidden, device, dtype):
    """x and the states from randn; the weights and biases as torch.nn.LSTMCell
    initializes them, U(-1/sqrt(hidden), 1/sqrt(hidden)). (randn weights drive
    the gates into saturation, where the gate gradients underflow to denormal
    floats: the weight-gradient GEMMs of both sides then ran 4-5x slower, and
    the table measured that instead of the cell.)"""
    bound = hidden**-0.5

    def make(*shape, weight=False):
        t = torch.empty(*shape, device=device, dtype=dtype)
        t = t.uniform_(-bound, bound) if weight else t.normal_()
        return t.requires_grad_()

    return make(batch, input_size), (make(batch, hidden), make(batch, hidden)), make(
        4 * hidden, input_size, weight=True), make(4 * hidden, hidden, weight=True), make(
        4 * hidden, weight=True), make(4 * hidden, weight=True)


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
            t_ours, t_theirs = median_pair_ms(lambda: attnkit.ops.lstm_cell(*args), lambda: torch.lstm_cell(*args),
                                              device)
        shape = f"B={batch} I={input_size} H={hidden}"
        rows.append(dict(case="forward", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
        leaves = [args[0], *args[1], *args[2:]]
        error = gradient_error(fwd_bwd(attnkit.ops.lstm_cell, args), fwd_bwd(torch.lstm_cell, args), leaves,
                               forward_error=error)
        t_ours, t_theirs = median_pair_ms(fwd_bwd(attnkit.ops.lstm_cell, args), fwd_bwd(torch.lstm_cell, args), device)
        rows.append(dict(case="fwd+bwd", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    return rows
