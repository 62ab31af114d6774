"""Implementations of the whole-sequence LSTM and GRU (one layer, one
direction, time-major). Every backend honours one contract:

lstm forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)
    -> (output, h_n, c_n, gates, cs, hc)
lstm backward(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
              output, gates, cs, hc)
    -> (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr)
gru forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save) -> (output, h_n, gates)
gru backward(grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates)
    -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)

with the saved tensors as documented in csrc/include/attnkit/rnn.h and
attnkit.reference.rnn (empty when not produced), `lengths` an int64 CPU tensor
or None, so a forward of one backend and a backward of another agree. The
kernels' backward needs no biases (the saved gates hold them); the reference
takes them to differentiate its forward again.
"""
from __future__ import annotations

import torch

from .. import _extensions, reference
from .._dispatch import Implementation, Op


def _empty(like):
    return like.new_empty((0,))


class _Extension(Implementation):
    extension = ""
    dtypes = ()

    def not_supported_reasons(self, call):
        if call["dtype"] not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return [f"the {self.backend} rnn kernels take {names}, got {str(call['dtype']).replace('torch.', '')}"]
        return []

    def _ext(self):
        return _extensions.load(self.extension)[0]


class _LstmExtension(_Extension):
    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        return tuple(self._ext().lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save))

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
        return tuple(
            self._ext().lstm_backward(
                grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths, output, gates, cs, hc
            )
        )


class _GruExtension(_Extension):
    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        return tuple(self._ext().gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save))

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
        return tuple(self._ext().gru_backward(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates))


_CPP_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CppLstm(_LstmExtension):
    backend, extension, dtypes = "cpp", "_C", _CPP_DTYPES


class CudaLstm(_LstmExtension):
    backend, extension, dtypes = "cuda", "_C_cuda", _CUDA_DTYPES


class CppGru(_GruExtension):
    backend, extension, dtypes = "cpp", "_C", _CPP_DTYPES


class CudaGru(_GruExtension):
    backend, extension, dtypes = "cuda", "_C_cuda", _CUDA_DTYPES


def _vjp(fn, inputs, grad_outputs):
    """Gradients of the reference forward `fn(*inputs)` (None inputs passed
    through as None). torch.func.vjp, not torch.autograd: the custom op runs
    below the autograd dispatch key, where autograd records nothing."""
    present = [i for i, t in enumerate(inputs) if t is not None]

    def on_present(*values):
        full = list(inputs)
        for i, v in zip(present, values):
            full[i] = v
        return fn(*full)

    _, pullback = torch.func.vjp(on_present, *[inputs[i] for i in present])
    grads = iter(pullback(tuple(grad_outputs)))
    return [None if t is None else next(grads) for t in inputs]


class ReferenceLstm(Implementation):
    """The plain-PyTorch loop; its backward differentiates that loop again."""

    backend = "reference"

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        output, h_n, c_n, gates, cs, hc = reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        if not save:
            gates, cs, hc = _empty(x), _empty(x), _empty(x)
        return output, h_n, c_n, gates, cs, hc

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
        # Both biases enter as their sum: the gradient of that sum is each bias's.
        bias = x.new_zeros(w_ih.shape[0])
        for b in (b_ih, b_hh):
            bias = bias if b is None else bias + b

        def fn(x, h0, c0, w_ih, w_hh, bias, w_hr):
            return reference.lstm(x, h0, c0, w_ih, w_hh, bias, None, w_hr, lengths)[:3]

        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _vjp(
            fn, [x, h0, c0, w_ih, w_hh, bias, w_hr], [grad_output, grad_hn, grad_cn]
        )
        return dx, dh0, dc0, dw_ih, dw_hh, db, _empty(x) if dw_hr is None else dw_hr


class ReferenceGru(Implementation):
    backend = "reference"

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        output, h_n, gates = reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
        return output, h_n, gates if save else _empty(x)

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
        b_ih = x.new_zeros(w_ih.shape[0]) if b_ih is None else b_ih  # an absent bias is a zero one
        b_hh = x.new_zeros(w_hh.shape[0]) if b_hh is None else b_hh

        def fn(x, h0, w_ih, w_hh, b_ih, b_hh):
            return reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)[:2]

        return tuple(_vjp(fn, [x, h0, w_ih, w_hh, b_ih, b_hh], [grad_output, grad_hn]))


LSTM = Op("lstm", [CudaLstm(), CppLstm(), ReferenceLstm()])
GRU = Op("gru", [CudaGru(), CppGru(), ReferenceGru()])
