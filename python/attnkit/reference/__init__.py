"""Plain PyTorch versions of every op: readable, slow, the ground truth of the tests."""
from . import attention
from .rnn import lstm_cell, lstm_cell_backward

__all__ = ["attention", "lstm_cell", "lstm_cell_backward"]
