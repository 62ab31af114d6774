"""Public functional ops: autograd-aware, torch.compile-traceable, backend-dispatched."""
from .additive_attention import additive_attention
from .attention import flash_attention, flash_attention_varlen
from .decode import attention_decode
from .linear import linear
from .lstm_cell import lstm_cell
from .rnn import gru, lstm
from .rnn_layernorm import layer_norm_gru, layer_norm_lstm
from .rotary import apply_rotary

__all__ = ["additive_attention", "apply_rotary", "attention_decode", "flash_attention", "flash_attention_varlen", "gru", "linear", "layer_norm_gru", "layer_norm_lstm", "lstm", "lstm_cell"]
