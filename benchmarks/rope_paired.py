"""Paired timing of fused RoPE attention against "apply_rotary then flash_attention"
(issue 5): the two forms alternate call by call on the same inputs, so that load
changes on a shared machine hit both alike; reports the median of each and the
median of the per-pair ratios (unfused / fused, > 1: fused faster). The clock
is the process's CPU time by default (with one thread, the least disturbed by
other processes on a shared machine); --clock wall for wall time.

    .venv/bin/python benchmarks/rope_paired.py [--threads 1] [--pairs 41] [--sizes 512 1024 2048] [--clock cpu]

B=2 H=8 D=64 causal, Llama-style tables (rotary_dim = D), fp32 and bf16.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnkit.ops import apply_rotary, flash_attention

HEADS, DIM, BATCH = 8, 64, 2


def tables(n):
    angles = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, DIM, 2, dtype=torch.float64) / DIM)
    return angles.cos().float(), angles.sin().float()


def forms(n, dtype):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(BATCH, HEADS, n, DIM, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    cos, sin = tables(n)

    def fused():
        return flash_attention(q, k, v, causal=True, rotary_cos=cos, rotary_sin=sin)

    def unfused():
        return flash_attention(apply_rotary(q, cos, sin, layout="bhnd"), apply_rotary(k, cos, sin, layout="bhnd"), v,
                               causal=True)

    return fused, unfused, (q, k, v)


def paired(a, b, pairs, clock, warmup=2):
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for i in range(pairs):
        for fn, times in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            start = clock()
            fn()
            times.append((clock() - start) * 1e3)
    ratios = [y / x for x, y in zip(ta, tb)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=41)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"threads={torch.get_num_threads()} pairs={args.pairs} clock={args.clock} B={BATCH} H={HEADS} D={DIM} causal")
    print("| dtype | N | pass | fused ms | unfused ms | median ratio unfused/fused |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        for n in args.sizes:
            fused, unfused, leaves = forms(n, dtype)
            with torch.no_grad():
                torch.testing.assert_close(fused(), unfused(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                                           rtol=2e-2 if dtype != torch.float32 else 1e-5)
            pairs = max(9, args.pairs * 512 // n)
            with torch.no_grad():
                f, u, r = paired(fused, unfused, pairs, clock)
            print(f"| {name} | {n} | forward | {f:.2f} | {u:.2f} | {r:.3f}x |", flush=True)

            def step(fn):
                def run():
                    fn().sum().backward()
                    for t in leaves:
                        t.grad = None
                return run

            f, u, r = paired(step(fused), step(unfused), pairs, clock)
            print(f"| {name} | {n} | fwd+bwd | {f:.2f} | {u:.2f} | {r:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
