"""Shared measurement: warm-up, then the median of several timed repeats;
CUDA work is synchronized around each repeat."""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable

import torch

# Interceptors installed by the runner (progress, peak memory) and by the
# pytest-benchmark suite (which times one chosen call itself); innermost last.
_interceptors: list = []
_checks_skipped = False


@contextlib.contextmanager
def checks_skipped():
    """Inside, gradient_error and rss_rise_mb_in_subprocess return NaN without running
    anything: for the reruns of a family that only its timed calls matter to (those of
    the pytest-benchmark suite, one for each call it times), where these checks took
    most of each rerun (attention_cpu: 16 of 19 s on 2 cores)."""
    global _checks_skipped
    outer, _checks_skipped = _checks_skipped, True
    try:
        yield
    finally:
        _checks_skipped = outer


@contextlib.contextmanager
def intercept(hook):
    """While active, median_ms(fn, device, warmup, repeats) returns
    hook(fn, device, warmup, repeats, measure) instead, where measure() does
    the normal timing. Families need no change to be observed this way."""
    _interceptors.append(hook)
    try:
        yield hook
    finally:
        _interceptors.remove(hook)


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 15) -> float:
    if _interceptors:
        hook = _interceptors[-1]
        return hook(fn, device, warmup, repeats, lambda: _median_ms(fn, device, warmup, repeats))
    return _median_ms(fn, device, warmup, repeats)


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    return _alternating([fn], device, warmup, repeats)[0]


def median_pair_ms(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device, warmup: int = 3,
                   repeats: int = 15) -> tuple[float, float]:
    """median_ms of ours and of theirs, their repeats alternating: median_group_ms of the two."""
    t_ours, t_theirs = median_group_ms([ours, theirs], device, warmup, repeats)
    return t_ours, t_theirs


def median_group_ms(fns: list, device: torch.device, warmup: int = 3, repeats: int = 15) -> list:
    """median_ms of each of fns, their repeats alternating (fns[0], fns[1], ...,
    fns[0], ...): on a machine whose speed drifts (a shared 2-core VM here: the
    same call reads 30-40% apart from one second to the next), timing one side
    after the other puts each in a different spell, and the ratio follows the
    spells. Interceptors see one call per function, as with median_ms, measuring
    through the first one's measure()."""
    measured: list = []

    def measure(i):
        if not measured:
            measured.extend(_alternating(fns, device, warmup, repeats))
        return measured[i]

    if not _interceptors:
        return [measure(i) for i in range(len(fns))]
    hook = _interceptors[-1]
    return [hook(fn, device, warmup, repeats, lambda i=i: measure(i)) for i, fn in enumerate(fns)]


def _alternating(fns, device, warmup, repeats) -> list:
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list = [[] for _ in fns]
    for _ in range(repeats):
        for fn, into in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            into.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def out_of_time() -> bool:
    """True once the wall clock passes ATTNKIT_BENCH_DEADLINE (seconds since the
    epoch), which `make gpu-check` sets so that a long family stops between
    shapes and keeps the rows it has, rather than being killed with none."""
    deadline = os.environ.get("ATTNKIT_BENCH_DEADLINE")
    return deadline is not None and time.time() >= float(deadline)


def within_budget(cases, rows: list, describe: Callable[[object], str]):
    """Yields cases until out_of_time(); then appends one untimed row saying
    which case and those after it were not measured, and stops."""
    for case in cases:
        if out_of_time():
            rows.append(dict(case="not measured: the time budget ran out", shape=f"{describe(case)} and later",
                             backend="-", ours_ms=float("nan"), baseline_ms=float("nan"), max_err=float("nan")))
            return
        yield case


def max_error(ours, theirs) -> float:
    """The largest difference over the pairs of tensors; inf where one side is NaN or infinite and
    the other is not there (a NaN compared as NaN would hide a broken kernel behind a number)."""
    if isinstance(ours, torch.Tensor):
        ours, theirs = [ours], [theirs]
    return max([_pair_error(a, b) for a, b in zip(ours, theirs) if a.numel()] or [0.0])


def _pair_error(a, b) -> float:
    a, b = a.double(), b.double()
    agree = (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
    diff = (a - b).abs().masked_fill(agree, 0.0)
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def gradient_error(ours_step: Callable[[], object], theirs_step: Callable[[], object], ours_leaves, theirs_leaves=None,
                   forward_error: float = 0.0) -> float:
    """The fwd+bwd rows' max err: the largest of `forward_error` and the differences of the
    gradients that one call of each side's forward+backward step leaves in its leaves' .grad
    (the same leaves for both unless theirs_leaves is given; a gradient that never arrives
    counts as zeros), each relative to the baseline gradient's largest magnitude where that
    exceeds 1 (a weight gradient summed over a batch reaches hundreds). Without it a backward
    that computed nothing, or garbage, timed as a speedup with the forward's error beside it."""
    if _checks_skipped:
        return float("nan")
    theirs_leaves = ours_leaves if theirs_leaves is None else theirs_leaves
    found = []
    for step, leaves in ((ours_step, list(ours_leaves)), (theirs_step, list(theirs_leaves))):
        for leaf in leaves:
            leaf.grad = None
        step()
        found.append([torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.clone() for leaf in leaves])
        for leaf in leaves:
            leaf.grad = None
    scaled = [max_error(a, b) / max(1.0, _finite_max(b)) for a, b in zip(*found) if a.numel()]
    return max([forward_error, *scaled])


def _finite_max(t) -> float:
    finite = t[torch.isfinite(t)]
    return finite.abs().max().item() if finite.numel() else 0.0


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated during one call of fn, above what was allocated
    before it, in MiB; None where the device keeps no allocator statistics (CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def rss_rise_mb(step: Callable[[], object]) -> float:
    """Rise of this process's peak resident set (MiB) over one call of step:
    the CPU allocator keeps no statistics, so VmHWM is reset through
    /proc/self/clear_refs and read back. Linux only."""

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = status("VmRSS:")
    step()
    return (status("VmHWM:") - before) / 1024


def rss_rise_mb_in_subprocess(script: str, spec: dict) -> float:
    """rss_rise_mb in a fresh process, so that earlier cases do not hide the
    peak: runs `python script --peak <spec as JSON>`, whose main prints the
    figure as its last line."""
    import json
    import subprocess
    import sys

    if _checks_skipped:
        return float("nan")
    done = subprocess.run([sys.executable, os.path.abspath(script), "--peak", json.dumps(spec)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])
