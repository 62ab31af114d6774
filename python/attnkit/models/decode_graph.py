"""A generation's decode step replayed from a CUDA graph (`generate(..., cuda_graph=True)`).

One token of a small model is host-bound on a GPU: GPT-2 small at batch 1 launches ~170
kernels a token from Python, each done in a few microseconds (the H200 ran transformers'
generate at 181 tokens/s and attnkit's at 134, 5.5 and 7.5 ms a token, BENCHMARKS.md). A
CUDA graph records one step's launches once and replays them with one host call.

The step reads only tensors that stay put for the whole generation (the token buffer, the
preallocated KV cache and its lengths, the weights) and no value on the host, so one graph
serves every step: the first step runs eagerly on a side stream, keeping lazy set-up (Triton
compiles, cuBLAS workspaces) out of the capture as PyTorch's recipe asks; the capture follows
(it executes nothing); each later step copies its token into the buffer and replays. A step
that cannot be captured runs eagerly from then on, with a warning.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

_DEVICE_TYPE = "cuda"  # the tests stand in for the capture with CPU tensors


def _run_first(step: Callable[[Tensor], Tensor], token: Tensor) -> Tensor:
    side = torch.cuda.Stream(token.device)
    current = torch.cuda.current_stream(token.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        logits = step(token)
    current.wait_stream(side)
    logits.record_stream(current)  # allocated on the side stream, read on this one
    return logits


def _capture(fn: Callable[[], None]) -> Callable[[], None]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class GraphedStep:
    """step(token) -> logits, the same function replayed from a CUDA graph after its first call.

    step must read no host value that changes between calls, and the logits returned are
    overwritten by the next call: consume them first (generate samples from them at once)."""

    def __init__(self, step: Callable[[Tensor], Tensor]):
        self._step = step
        self._token: Optional[Tensor] = None
        self._logits: Optional[Tensor] = None
        self._replay: Optional[Callable[[], None]] = None
        self._eager = False

    def __call__(self, token: Tensor) -> Tensor:
        if self._eager:
            return self._step(token)
        if self._replay is not None:
            self._token.copy_(token)
            self._replay()
            return self._logits
        # The capture records the current device's stream: the model's GPU must be current.
        on_device = torch.cuda.device(token.device) if token.device.type == "cuda" else contextlib.nullcontext()
        with on_device:
            logits = _run_first(self._step, token)
            self._token, self._logits = token.clone(), torch.empty_like(logits)
            try:
                self._replay = _capture(lambda: self._logits.copy_(self._step(self._token)))
            except RuntimeError as exc:  # an operation the capture refuses (e.g. a host sync)
                warnings.warn(f"attnkit: the decode step could not be captured in a CUDA graph and runs without "
                              f"one: {exc}")
                self._eager = True
        return logits
