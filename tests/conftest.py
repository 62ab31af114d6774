import os

import pytest
import torch

from attnkit import _dispatch

# On a GPU the flash attention kernels launch with one fixed block config
# instead of autotuning: the suite's many feature combinations would each
# compile every kernel seven times. test_attention_gpu.py runs every config.
if torch.cuda.is_available():
    os.environ.setdefault("ATTNKIT_TRITON_CONFIG", "0")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip where torch sees no CUDA GPU (gpu-check's dry run, `make test-gpu`
    on a CPU machine): they would fail at their first .cuda(). `slow` tests (minutes on a
    2-core CPU) run only when asked for: `-m slow` (or any -m naming them) or ATTNKIT_SLOW=1;
    `make test` skips them."""
    if not torch.cuda.is_available():
        no_gpu = pytest.mark.skip(reason="gpu: torch sees no CUDA GPU")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(no_gpu)
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("ATTNKIT_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `-m slow` or ATTNKIT_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
