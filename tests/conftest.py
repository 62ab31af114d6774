import pytest
import torch

from attnkit import _dispatch


@pytest.fixture(autouse=True)
def _automatic_dispatch(monkeypatch):
    """Every test starts with automatic backend choice and no env forcing."""
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    _dispatch._forced_globally.clear()
    yield
    _dispatch._forced_globally.clear()


@pytest.fixture
def cell_args():
    """A small valid attnkit.ops.lstm_cell call: (input, (h, c), w_ih, w_hh, b_ih, b_hh)."""
    gen = torch.Generator().manual_seed(0)
    x, h, c = (torch.randn(2, n, generator=gen) for n in (3, 4, 4))
    w_ih, w_hh = torch.randn(16, 3, generator=gen), torch.randn(16, 4, generator=gen)
    return x, (h, c), w_ih, w_hh, torch.randn(16, generator=gen), torch.randn(16, generator=gen)
