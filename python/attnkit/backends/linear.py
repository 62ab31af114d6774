"""Implementations of the few-row linear layer. Contract:

forward(x, weight, bias) -> y  with x (M, K) contiguous, weight (N, K), bias (N,) or None.
"""
from __future__ import annotations

from typing import Any, List, Mapping

import torch
import torch.nn.functional as F

from .. import _dispatch, _extensions
from .._dispatch import Implementation, Op

# Up to here the kernel led at::linear at GPT-2's shapes (one thread: 11 vs 7 GB/s at 16
# rows, 28 vs 18 at 1); past it the product turns compute-bound, a GEMM's job.
MAX_ROWS = 16


class Cpp(Implementation):
    """csrc/cpu/linear.cpp (attnkit._C): each thread streams its slice of W once for all rows of x."""

    backend = "cpp"

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        reasons = []
        if call["dtype"] != torch.float32:
            reasons.append(f"dtype {call['dtype']}: the cpp kernel is float32 only")
        if call["rows"] > MAX_ROWS and not _dispatch.forced_to("linear", self.backend):  # speed only: forcing runs it
            reasons.append(f"{call['rows']} rows > {MAX_ROWS}: a GEMM, which at::linear does faster")
        return reasons

    def forward(self, x, weight, bias):
        ext, _ = _extensions.load("_C")
        return ext.linear_few_rows(x, weight, bias)


class Reference(Implementation):
    backend = "reference"

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)


LINEAR = Op("linear", [Cpp(), Reference()])
