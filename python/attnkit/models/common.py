"""Pieces BERT and GPT-2 share: activations by their Hugging Face names, input checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU (a named function: a lambda would make models unpicklable)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "gelu": F.gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_ids(name: str, ids: Tensor, limit: int, what: str) -> None:
    """Token / type ids must index their embedding table: a clear error instead of an index error."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32):
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if name == "input_ids" and (ids.dim() != 2 or ids.shape[1] == 0):
        raise ValueError(f"input_ids must be (batch, length) with length >= 1, got shape {tuple(ids.shape)}")
    # Reading the values syncs with a GPU (once: both bounds in one transfer) and is
    # data-dependent: skipped when traced (torch.compile).
    if ids.numel() and not torch.compiler.is_compiling():
        low, high = torch.stack(torch.aminmax(ids)).tolist()
        if low < 0 or high >= limit:
            raise ValueError(f"{name} must be in [0, {limit}) ({what}), got values in [{low}, {high}]")


def check_length(length: int, limit: int, config_field: str, what: str = "sequence length") -> None:
    if length > limit:
        raise ValueError(f"{what} {length} exceeds the position table ({config_field} = {limit})")

