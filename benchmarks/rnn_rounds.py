"""attnkit.nn.LSTM / GRU against torch.nn at one shape, in alternating rounds.

On a small shared machine a single median can land in a slow spell for one
side and not the other; here each round times torch then attnkit back to back
(median of `--calls` each) and prints the ratio per round, so such spells show.

    .venv/bin/python benchmarks/rnn_rounds.py --shape 1 256 128 --rounds 6 [--kind GRU] [--calls 51]
"""
from __future__ import annotations

import argparse
from functools import partial

import torch
from rnn import modules, training_step
from timing import median_ms as _median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 256, 128], metavar=("B", "T", "H"))
    parser.add_argument("--kind", choices=["LSTM", "GRU"], default="LSTM")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=51)
    args = parser.parse_args()
    batch, steps, hidden = args.shape
    median_ms = partial(_median_ms, device=torch.device("cpu"), warmup=1, repeats=args.calls)
    ours, theirs = modules(args.kind, hidden, torch.device("cpu"), torch.float32)
    x = torch.randn(steps, batch, hidden, requires_grad=True)
    print(f"{args.kind} (B, T, I=H) = ({batch}, {steps}, {hidden}), {torch.get_num_threads()} threads")
    for _ in range(args.rounds):
        with torch.no_grad():
            fwd_theirs, fwd_ours = median_ms(lambda: theirs(x)), median_ms(lambda: ours(x))
        fb_theirs = median_ms(training_step(theirs, x))
        fb_ours = median_ms(training_step(ours, x))
        print(f"forward torch {fwd_theirs:.3f} attnkit {fwd_ours:.3f} ms {fwd_theirs / fwd_ours:.2f}x | "
              f"fwd+bwd torch {fb_theirs:.3f} attnkit {fb_ours:.3f} ms {fb_theirs / fb_ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
