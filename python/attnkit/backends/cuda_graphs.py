"""CUDA graphs for the per-step cuda LSTM/GRU kernels (opt-in: ATTNKIT_RNN_CUDA_GRAPHS=1).

The per-step backend launches a cuBLAS GEMM and a kernel each time step, from C++;
on an H200 a step took 18-26 us against cuDNN's ~9, most of it the host preparing
and launching work the GPU finishes sooner. A CUDA graph records one call's launches
and replays them with one host call: each call here copies its tensor arguments into
the graph's own input buffers, replays, and returns copies of the graph's outputs
(the next replay overwrites them, and autograd keeps them).

One graph per (entry point, argument shapes/strides/dtypes/devices, flags, loop
switches), the first call of each shape paying the capture; the last `MAX_GRAPHS`
are kept, each holding its own memory pool and copies of its arguments (weights
included: copying them each call is what keeps a replay right after an optimizer
step or a new module). A call that cannot be captured runs as it is, and so do
calls with CPU tensor arguments (`lengths`: the kernels read them on the host while
launching, which a graph would freeze) and calls made while another capture is
under way. Written without a GPU to run it (2026-11-27): opt-in until a GPU run has
checked and timed it (the GPU suite and the rnn benchmark's "CUDA graphs" rows).
"""
from __future__ import annotations

import collections
import threading
import warnings
from typing import Any, Callable, Optional, Sequence, Tuple

import torch

from .. import _dispatch

GRAPHS_ENV = "ATTNKIT_RNN_CUDA_GRAPHS"
MAX_GRAPHS = 8
# Read by the C++ loops at each call: a graph records the loop that was on.
_LOOP_SWITCHES = ("ATTNKIT_RNN_CUDA_GENERIC_LOOP", "ATTNKIT_RNN_CUDA_DIRECT_GEMM")
_DEVICE_TYPE = "cuda"  # the tests record "graphs" of CPU calls with a stand-in _capture
_FAILED = object()  # a key whose capture failed: run it as it is from then on


class _Graph:
    """A captured call: its input buffers (None where the argument is not a tensor), outputs, replay."""

    def __init__(self, inputs, outputs, replay: Callable[[], None]):
        self.inputs, self.outputs, self.replay = inputs, outputs, replay


_graphs: "collections.OrderedDict[Any, Any]" = collections.OrderedDict()
_lock = threading.Lock()


def enabled() -> bool:
    return _dispatch.getenv(GRAPHS_ENV) == "1"


def _key(name: str, args: Sequence[Any]) -> Optional[Tuple]:
    """What a graph is recorded for; None when the call must run as it is."""
    parts = [name, tuple(_dispatch.getenv(switch) for switch in _LOOP_SWITCHES)]
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != _DEVICE_TYPE:
                return None
            parts.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.storage_offset()))
        elif a is None or isinstance(a, (bool, int, float)):
            parts.append(a)
        else:
            return None
    return tuple(parts)


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _capture(fn: Callable, args: Sequence[Any]) -> _Graph:
    """Records fn(*inputs) on fresh input buffers holding args' values (PyTorch's recipe:
    one warm-up call on a side stream, then the capture)."""
    inputs = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device).copy_(a)
              if isinstance(a, torch.Tensor) else None for a in args]
    call_args = [i if i is not None else a for i, a in zip(inputs, args)]
    # On the tensors' device: streams and the capture are the current device's, and on another
    # GPU the kernels (launched on their tensors' device) ran outside an empty graph.
    with torch.cuda.device(next(i.device for i in inputs if i is not None)):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*call_args)  # warm-up: lazy initialization (cuBLAS handles, workspaces) happens outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = tuple(fn(*call_args))
    return _Graph(inputs, outputs, graph.replay)


def call(name: str, fn: Callable, args: Sequence[Any]) -> Tuple:
    """fn(*args) through a graph when enabled and possible (see the module's docstring)."""
    key = _key(name, args) if enabled() else None
    if key is None or _capturing():
        return tuple(fn(*args))
    with _lock:
        graph = _graphs.get(key)
        if graph is None:
            try:
                graph = _capture(fn, args)
            except RuntimeError as exc:  # e.g. an operation the capture refuses
                warnings.warn(f"attnkit: {name} could not be captured in a CUDA graph and runs without one: {exc}")
                graph = _FAILED
            _graphs[key] = graph
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        else:
            _graphs.move_to_end(key)
        if graph is _FAILED:
            return tuple(fn(*args))
        for buffer, a in zip(graph.inputs, args):
            if buffer is not None:
                buffer.copy_(a)
        graph.replay()
        return tuple(o.clone() for o in graph.outputs)


def clear() -> None:
    """Drops every recorded graph (and their memory pools)."""
    with _lock:
        _graphs.clear()
