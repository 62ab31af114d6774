"""Drop-in replacements for torch.nn modules, backed by attnkit ops."""
from .linear import Linear
from .rnn import GRU, LSTM, GRUCell
from .rnn_layernorm import LayerNormGRU, LayerNormLSTM
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes
from .rnn_cell import LSTMCell
from . import hf  # imports transformers only when hf.register() is called
from .attention import MultiheadAttention
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)
from .seq2seq_attention import BahdanauAttention, LuongAttention

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNormGRU", "LayerNormLSTM", "Linear",
           "ALiBi", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEncoding", "alibi_slopes",
           "MultiheadAttention", "Transformer", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerEncoderLayer", "BahdanauAttention", "LuongAttention"]
