"""Plain PyTorch versions of every op: readable, slow, the ground truth of the tests."""
from .rnn import lstm_cell, lstm_cell_backward

__all__ = ["lstm_cell", "lstm_cell_backward"]
