"""Drop-in replacements for torch.nn modules, backed by attnkit ops."""
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes
from .rnn_cell import LSTMCell

__all__ = ["ALiBi", "LSTMCell", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEncoding",
           "alibi_slopes"]
