"""Implementations of the LSTM cell step. Every backend honours one contract:

forward(x, h, c, w_ih, w_hh, b_ih, b_hh) -> (h_new, c_new, gates)
backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new) -> (dx, dh, dc, dw_ih, dw_hh, db)

with `gates` the activated (i, f, g, o) as (B, 4H), so a forward of one backend
and a backward of another agree.
"""
from __future__ import annotations

from .. import _extensions, reference
from .._dispatch import Implementation, Op


class _Extension(Implementation):
    """Kernels in a compiled extension that exposes lstm_cell_forward/backward."""

    extension = ""

    def forward(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        ext, _ = _extensions.load(self.extension)
        return tuple(ext.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh))

    def backward(self, grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new):
        ext, _ = _extensions.load(self.extension)
        return tuple(ext.lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new))


class Cpp(_Extension):
    backend = "cpp"
    extension = "_C"


class Cuda(_Extension):
    backend = "cuda"
    extension = "_C_cuda"


class Reference(Implementation):
    backend = "reference"

    def forward(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        return reference.lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)

    def backward(self, grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new):
        return reference.lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new)

LSTM_CELL = Op("lstm_cell", [Cuda(), Cpp(), Reference()])

