"""GRU cell step: attnkit.nn.GRUCell (attnkit.ops.gru over one step, automatic
backend) vs torch.nn.GRUCell with the same weights, forward and forward+backward."""
from __future__ import annotations

import torch
from timing import gradient_error, max_error, median_pair_ms

import attnkit

TITLE = "GRU cell step: attnkit.nn.GRUCell vs torch.nn.GRUCell"
QUICK_SHAPES = [(1, 256, 256), (64, 256, 256), (256, 512, 512)]  # (batch, input, hidden)
FULL_SHAPES = QUICK_SHAPES + [(16, 1024, 1024), (512, 1024, 1024)]


def fwd_bwd(cell, x, h):
    def step():
        cell(x, h).sum().backward()

    return step


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    for batch, input_size, hidden in QUICK_SHAPES if quick else FULL_SHAPES:
        ours = attnkit.nn.GRUCell(input_size, hidden, device=device, dtype=dtype)
        theirs = torch.nn.GRUCell(input_size, hidden, device=device, dtype=dtype)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(batch, input_size, device=device, dtype=dtype, requires_grad=True)
        h = torch.randn(batch, hidden, device=device, dtype=dtype, requires_grad=True)
        error = max_error(ours(x, h), theirs(x, h))
        backend = attnkit.last_dispatch("gru").backend
        with torch.no_grad():
            t_ours, t_theirs = median_pair_ms(lambda: ours(x, h), lambda: theirs(x, h), device)
        shape = f"B={batch} I={input_size} H={hidden}"
        rows.append(dict(case="forward", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
        error = gradient_error(fwd_bwd(ours, x, h), fwd_bwd(theirs, x, h), [x, h, *ours.parameters()],
                               [x, h, *theirs.parameters()], forward_error=error)
        t_ours, t_theirs = median_pair_ms(fwd_bwd(ours, x, h), fwd_bwd(theirs, x, h), device)
        rows.append(dict(case="fwd+bwd", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    return rows
