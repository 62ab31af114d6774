"""Public functional ops: autograd-aware, torch.compile-traceable, backend-dispatched."""
from .lstm_cell import lstm_cell

__all__ = ["lstm_cell"]
