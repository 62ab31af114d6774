"""Shared measurement: warm-up, then the median of several timed repeats;
CUDA work is synchronized around each repeat."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_error(ours, theirs) -> float:
    if isinstance(ours, torch.Tensor):
        ours, theirs = [ours], [theirs]
    return max((a.double() - b.double()).abs().max().item() for a, b in zip(ours, theirs))
