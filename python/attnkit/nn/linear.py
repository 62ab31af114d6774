"""`attnkit.nn.Linear`: torch.nn.Linear (same arguments, parameters and state_dict;
an instance of it) whose forward is attnkit.ops.linear, so that the few-row
products of a decoding step run the bandwidth-bound CPU kernel."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import _validate
from ..ops import linear
from ._share import check_from_torch, shared


class Linear(nn.Linear):
    @classmethod
    def from_torch(cls, module: nn.Linear) -> "Linear":
        """An attnkit.nn.Linear sharing `module`'s configuration and Parameter objects."""
        check_from_torch(cls, module, nn.Linear)
        return shared(cls, module)

    @_validate.torch_compatible_errors
    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)
