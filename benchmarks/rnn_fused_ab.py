"""Two builds of attnkit._C on the CPU's batch 5+ RNN loops (csrc/cpu/rnn_fused.cpp),
A/B: each build runs in a process of its own (ATTNKIT_EXTENSION_DIR picks the .so),
the two alternate round by round so that load changes on a shared machine hit both
alike. A call's clock is the process's CPU time (one thread by default: the least
disturbed by other processes); a case's figure is the median over its calls, and
the report the median over rounds.

    .venv/bin/python benchmarks/rnn_fused_ab.py --old DIR_WITH_OLD_SO [--new python/attnkit] [--rounds 3] [--only LSTM]

Cases (batch, time, input = hidden): GRU forward (inference) and forward+backward
at (8, 256, 256), (32, 128, 256), (64, 100, 512); LSTM forward and fwd+bwd at (32, 128, 256); GRU forward
at (2, 256, 256) (the small-batch loop, which shares rnn_rows.h's GRU rows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = [("GRU", "forward", 8, 256, 256), ("GRU", "fwd+bwd", 8, 256, 256), ("GRU", "forward", 32, 128, 256),
         ("GRU", "fwd+bwd", 32, 128, 256), ("GRU", "forward", 64, 100, 512), ("GRU", "fwd+bwd", 64, 100, 512),
         ("LSTM", "forward", 32, 128, 256), ("LSTM", "fwd+bwd", 32, 128, 256), ("GRU", "forward", 2, 256, 256)]


def worker(calls: int, threads: int, only: str) -> dict:
    """Times every case in this process (attnkit._C as ATTNKIT_EXTENSION_DIR says); ms per call."""
    import torch

    import attnkit
    from attnkit.ops import gru, lstm

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for kind, mode, B, T, H in CASES:
        name = f"{kind} {mode} B={B} T={T} H={H}"
        if only not in name:
            continue
        gates = 3 if kind == "GRU" else 4
        x, h0, c0 = (torch.randn(*s, generator=gen) for s in ((T, B, H), (B, H), (B, H)))
        weights = [torch.randn(*s, generator=gen) * H**-0.5 for s in ((gates * H, H), (gates * H, H))]
        weights += [torch.randn(gates * H, generator=gen) * 0.1 for _ in range(2)]
        leaves = [x, h0, *weights]
        if mode == "fwd+bwd":
            leaves = [t.requires_grad_(True) for t in leaves]

        def call():
            with attnkit.use_backend("cpp"), torch.set_grad_enabled(mode == "fwd+bwd"):
                if kind == "GRU":
                    out, h = gru(*leaves)
                else:
                    out, (h, _) = lstm(leaves[0], (leaves[1], c0), *leaves[2:])
                if mode == "fwd+bwd":
                    torch.autograd.grad(out.sum() + h.sum(), leaves)

        call()  # warm-up: packs, workspaces, oneDNN kernels
        times = []
        for _ in range(calls):
            t0 = time.process_time()
            call()
            times.append((time.process_time() - t0) * 1e3)
        results[name] = statistics.median(times)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="folder holding the old _C*.so")
    parser.add_argument("--new", default=os.path.join(os.path.dirname(__file__), "..", "python", "attnkit"),
                        help="folder holding the new _C*.so (default: the in-place build)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=15, help="timed calls per case and round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="the cases whose name holds this text, e.g. 'LSTM'")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.calls, args.threads, args.only)))
        return 0
    if not args.old:
        parser.error("--old is required")
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            env = dict(os.environ, ATTNKIT_EXTENSION_DIR=os.path.abspath(getattr(args, name)))
            cmd = [sys.executable, __file__, "--worker", "--calls", str(args.calls), "--threads", str(args.threads),
                   "--only", args.only]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"ms per call, CPU time, {args.threads} thread(s), median of {args.calls} calls, median of {args.rounds} "
          "rounds (each round's values in brackets)")
    print(f"{'case':40s} {'old':>24s} {'new':>24s} {'new/old':>8s}")
    for case in runs["old"][0]:
        old, new = ([r[case] for r in runs[name]] for name in ("old", "new"))
        cell = lambda v: f"{statistics.median(v):7.2f} [{' '.join(f'{t:.1f}' for t in v)}]"  # noqa: E731
        print(f"{case:40s} {cell(old):>24s} {cell(new):>24s} {statistics.median(new) / statistics.median(old):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
