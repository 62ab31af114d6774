"""Drop-in replacements for torch.nn modules, backed by attnkit ops."""
from .rnn_cell import LSTMCell

__all__ = ["LSTMCell"]
