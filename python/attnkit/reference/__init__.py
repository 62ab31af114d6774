"""Plain PyTorch versions of every op: readable, slow, the ground truth of the tests."""
from . import attention
from .additive_attention import additive_attention
from .rnn import gru, gru_cell, lstm, lstm_cell, lstm_cell_backward
from .rnn_layernorm import layer_norm_gru, layer_norm_lstm
from . import rotary  # the module, like attention: rotary.rotary(...)

__all__ = ["additive_attention", "attention", "gru", "gru_cell", "layer_norm_gru", "layer_norm_lstm", "lstm", "lstm_cell", "lstm_cell_backward", "rotary"]
