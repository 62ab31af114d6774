"""Drop-in replacements for torch.nn modules, backed by attnkit ops."""
from .rnn import GRU, LSTM, GRUCell
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes
from .rnn_cell import LSTMCell
from .attention import MultiheadAttention

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell",
           "ALiBi", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEncoding", "alibi_slopes",
           "MultiheadAttention"]
