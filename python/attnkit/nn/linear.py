"""`attnkit.nn.Linear`: torch.nn.Linear (same arguments, parameters and state_dict;
an instance of it) whose forward is attnkit.ops.linear, so that the few-row
products of a decoding step run the bandwidth-bound CPU kernel."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .. import _validate
from ..ops import linear


class Linear(nn.Linear):
    @_validate.torch_compatible_errors
    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)
