"""TransformerEncoder on a padded batch (30% padding on average): attnkit.nn.TransformerEncoder
(packed tokens, flash_attention_varlen) vs torch.nn.TransformerEncoder with the same weights.
"train step" = forward, loss on the real tokens, backward, SGD step (dropout 0 so outputs
compare; its max err covers every parameter's gradient too); "inference" = eval + no_grad, where torch
takes its nested-tensor fast path."""
from __future__ import annotations

import copy
import warnings

import torch
from timing import gradient_error, max_error, median_ms, within_budget

import attnkit

# torch's own note on its nested-tensor fast path (the baseline's inference), printed once into
# make bench's progress line: the docstring says which path torch takes.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

TITLE = "TransformerEncoder (padded batch, 30% padding): attnkit.nn vs torch.nn"
QUICK = [dict(d_model=256, nhead=4, layers=2, batch=8, length=128)]
FULL = QUICK + [dict(d_model=512, nhead=8, layers=6, batch=8, length=256)]


def models(d_model, nhead, layers, device, dtype):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0, batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, layers, torch.nn.LayerNorm(d_model)).to(device, dtype)
    ours = attnkit.nn.TransformerEncoder.from_torch(copy.deepcopy(theirs))
    return theirs, ours


def padded_batch(batch, length, d_model, device, dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.linspace(0.4 * length, length, batch).round().long()  # evenly 40%..100%: 30% padding
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    x = torch.randn(batch, length, d_model, generator=gen).to(device, dtype)
    return x, pad.to(device)


def train_step(model, x, pad):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(x, src_key_padding_mask=pad)
        out[~pad].square().mean().backward()
        optimizer.step()

    return step


def loss_step(model, x, pad):
    """train_step's forward and backward, without the optimizer (for comparing gradients)."""

    def step():
        model(x, src_key_padding_mask=pad)[~pad].square().mean().backward()

    return step


def paired_ms(ours, theirs, device, rounds, repeats):
    """The fastest of alternating rounds' medians: on a shared machine the load drifts within
    seconds, so timing one side entirely before the other would compare different machines,
    and the fastest round is the one least slowed by other jobs."""
    times = {"ours": [], "theirs": []}
    for _ in range(rounds):
        times["ours"].append(median_ms(ours, device, warmup=1, repeats=repeats))
        times["theirs"].append(median_ms(theirs, device, warmup=1, repeats=repeats))
    return min(times["ours"]), min(times["theirs"])


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    rows = []
    describe = lambda case: f"d={case['d_model']} L={case['layers']} N={case['length']}"  # noqa: E731
    for case in within_budget(QUICK if quick else FULL, rows, describe):
        theirs, ours = models(case["d_model"], case["nhead"], case["layers"], device, dtype)
        x, pad = padded_batch(case["batch"], case["length"], case["d_model"], device, dtype)
        real = ~pad
        with torch.no_grad():
            error = max_error(ours(x, src_key_padding_mask=pad)[real], theirs(x, src_key_padding_mask=pad)[real])
        backend = attnkit.last_dispatch("flash_attention").backend
        shape = (f"d={case['d_model']} h={case['nhead']} L={case['layers']} B={case['batch']} N={case['length']} "
                 f"pad={pad.float().mean().item():.0%}")
        rounds, repeats = (4, 2) if quick else (3, 2)
        train_error = gradient_error(loss_step(ours, x, pad), loss_step(theirs, x, pad), list(ours.parameters()),
                                     list(theirs.parameters()), error)
        t_ours, t_theirs = paired_ms(train_step(ours, x, pad), train_step(theirs, x, pad), device, rounds, repeats)
        rows.append(dict(case="train step", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                         max_err=train_error))
        ours.eval(), theirs.eval()
        with torch.no_grad():
            t_ours, t_theirs = paired_ms(lambda: ours(x, src_key_padding_mask=pad),
                                         lambda: theirs(x, src_key_padding_mask=pad), device, rounds, repeats)
        rows.append(dict(case="inference", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                         max_err=error))
    return rows
