"""Implementations of the layer-normalized LSTM / GRU with zoneout (one layer,
one direction, time-major). Contract (every tensor argument as the op gives it;
`lengths` an int64 CPU tensor or None, `zoneout` a (T, B, H) tensor or None):

ln_lstm forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, save)
    -> (output, h_n, c_n, xhat, hhat, gates, cs, chat, rstd)
ln_lstm backward(grad_output, grad_hn, grad_cn, <the forward's inputs but save>, output, <saved>)
    -> (dx, dh0, dc0, dw_ih, dw_hh, db, dg_ih, dg_hh, dg_c, dbe_c)
ln_gru forward(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save)
    -> (output, h_n, xhat, hhat, gates, rstd)
ln_gru backward(grad_output, grad_hn, <the forward's inputs but save>, output, <saved>)
    -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh, dg_ih, dg_hh)

The saved tensors are the same on both backends (csrc/include/attnkit/rnn_layernorm.h,
attnkit.reference.rnn_layernorm), so a forward of one and a backward of the other
agree; the reference backward differentiates its forward again and ignores them. In the LSTM all of
b_ih, b_hh, be_ih and be_hh enter the pre-activations as one sum: `db` is the
gradient of each. In the GRU db_ih is also be_ih's gradient and db_hh be_hh's.

On GPU tensors the cuda kernels (csrc/cuda/rnn_layernorm.cu, the CPU's time loops with a
thread block per batch row) run where ATTNKIT_RNN_LN_CUDA=1 or the cuda backend is forced,
in float32 and float64; otherwise the reference. They were written without a GPU to run
them (2026-11-27): opt-in until a GPU run has checked them against the CPU kernels.
"""
from __future__ import annotations

import torch

from .. import _dispatch, _extensions
from .._dispatch import Implementation, Op
from ..reference import rnn_layernorm as ref
from .rnn import _vjp


def _empty(like):
    return like.new_empty((0,))


class _Cpp(Implementation):
    backend = "cpp"

    def not_supported_reasons(self, call):
        if call["dtype"] not in (torch.float32, torch.float64):
            return [f"the cpp layer-norm rnn kernels take float32, float64, got {str(call['dtype']).replace('torch.', '')}"]
        return []

    def _ext(self):
        return _extensions.load("_C")[0]


class CppLayerNormLstm(_Cpp):
    def forward(self, *args):
        return tuple(self._ext().ln_lstm_forward(*args))

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh,
                 g_c, be_c, lengths, zoneout, output, *saved):
        return tuple(self._ext().ln_lstm_backward(
            grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c, be_c, lengths, zoneout, output, *saved
        ))


class CppLayerNormGru(_Cpp):
    def forward(self, *args):
        return tuple(self._ext().ln_gru_forward(*args))

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout,
                 output, *saved):
        return tuple(self._ext().ln_gru_backward(
            grad_output, grad_hn, x, h0, w_ih, w_hh, g_ih, g_hh, lengths, zoneout, output, *saved
        ))


LN_CUDA_ENV = "ATTNKIT_RNN_LN_CUDA"
_dispatch.choice_depends_on_env(LN_CUDA_ENV)


class _Cuda:
    """The cpp classes' calls on attnkit._C_cuda, whose entry points take the same arguments."""

    backend = "cuda"
    op = ""

    def not_supported_reasons(self, call):
        if call["dtype"] not in (torch.float32, torch.float64):
            return [f"the cuda layer-norm rnn kernels take float32, float64, got {str(call['dtype']).replace('torch.', '')}"]
        if _dispatch.getenv(LN_CUDA_ENV) != "1" and not _dispatch.forced_to(self.op, self.backend):
            return [f"the cuda layer-norm rnn kernels are opt-in until a GPU run has checked them: set {LN_CUDA_ENV}=1 "
                    f"(or force the cuda backend)"]
        if not hasattr(self._ext(), "ln_lstm_forward"):
            return ["attnkit._C_cuda was built without the layer-norm rnn kernels: rebuild it (make build)"]
        return []

    def _ext(self):
        return _extensions.load("_C_cuda")[0]


class CudaLayerNormLstm(_Cuda, CppLayerNormLstm):
    op = "layer_norm_lstm"


class CudaLayerNormGru(_Cuda, CppLayerNormGru):
    op = "layer_norm_gru"


class ReferenceLayerNormLstm(Implementation):
    backend = "reference"

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout, save):
        out = ref.layer_norm_lstm(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, (g_ih, be_ih), (g_hh, be_hh), (g_c, be_c), lengths, zoneout
        )
        return out if save else out[:3] + tuple(_empty(x) for _ in range(6))

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh,
                 g_c, be_c, lengths, zoneout, output, *saved):
        # b_ih, b_hh, be_ih and be_hh enter as one sum: its gradient is each one's.
        bias = be_ih + be_hh
        for b in (b_ih, b_hh):
            bias = bias if b is None else bias + b
        zero = torch.zeros_like(be_ih)

        def fn(x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, be_c):
            return ref.layer_norm_lstm(x, h0, c0, w_ih, w_hh, bias, None, (g_ih, zero), (g_hh, zero), (g_c, be_c),
                                       lengths, zoneout)[:3]

        return tuple(_vjp(fn, [x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, be_c], [grad_output, grad_hn, grad_cn]))


class ReferenceLayerNormGru(Implementation):
    backend = "reference"

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout, save):
        out = ref.layer_norm_gru(x, h0, w_ih, w_hh, b_ih, b_hh, (g_ih, be_ih), (g_hh, be_hh), lengths, zoneout)
        return out if save else out[:2] + tuple(_empty(x) for _ in range(4))

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout,
                 output, *saved):
        bias_i = be_ih if b_ih is None else be_ih + b_ih  # each side's biases enter as one sum
        bias_h = be_hh if b_hh is None else be_hh + b_hh
        zero = torch.zeros_like(be_ih)

        def fn(x, h0, w_ih, w_hh, bias_i, bias_h, g_ih, g_hh):
            return ref.layer_norm_gru(x, h0, w_ih, w_hh, bias_i, bias_h, (g_ih, zero), (g_hh, zero), lengths, zoneout)[:2]

        return tuple(_vjp(fn, [x, h0, w_ih, w_hh, bias_i, bias_h, g_ih, g_hh], [grad_output, grad_hn]))


LAYER_NORM_LSTM = Op("layer_norm_lstm", [CppLayerNormLstm(), CudaLayerNormLstm(), ReferenceLayerNormLstm()])
LAYER_NORM_GRU = Op("layer_norm_gru", [CppLayerNormGru(), CudaLayerNormGru(), ReferenceLayerNormGru()])
