"""The CPU LSTM/GRU backward's weight-gradient GEMMs (K = T B): values across K block
boundaries and rounded tails, and the memory they keep; the forward's input projections
across their tile edges. oneDNN's brgemm JIT-compiles a
kernel per (M, N, K, lda, ldb, ldc), which ATen caches per thread and never frees; with K
and A's leading dimension taken from T B, every new length or batch size kept ~0.2 MB
for good (csrc/cpu/rnn.cpp rows_gemm_long_k, rnn_fused.cpp mm)."""
import sys

import pytest
import torch
from helpers import kept_memory_mb

import attnkit


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch,steps", [(2, 129), (3, 100), (1, 257), (8, 33), (6, 47), (5, 1), (8, 129), (5, 410)],
                         ids=lambda v: str(v))
def test_weight_gradients_across_k_blocks(kind, batch, steps):
    """T B around and past the K blocks (batch <= 4: rows_gemm_long_k's 256 rows; batch > 4:
    mm's 1024, 8 x 129 = 1032 and 5 x 410 = 2050 past one and two of them), and tails off the
    rounding (16 and 64 rows); batch <= 4 and > 4 run different backward loops."""
    torch.manual_seed(batch * 1000 + steps)
    ours = getattr(attnkit.nn, kind)(24, 40)
    theirs = getattr(torch.nn, kind)(24, 40).double()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(steps, batch, 24)
    for module, inp in ((ours, x), (theirs, x.double())):
        module(inp)[0].pow(2).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-4, msg=name)


_STEP = """
    batch = int(sys.argv[1])
    module = attnkit.nn.GRU(32, 64) if batch % 2 else attnkit.nn.LSTM(32, 64)
    def step(t):
        module(torch.randn(t, batch, 32, requires_grad=True))[0].sum().backward()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
@pytest.mark.parametrize("batch", [2, 3, 8, 9], ids=["lstm-small-batch", "gru-small-batch", "lstm", "gru"])
def test_new_sequence_lengths_keep_no_memory(batch):
    """200 new T B values, each trained once. oneDNN's primitive caches (torch's, up to 1024
    entries by default) are off here: what is left is attnkit's own. Before: 18-46 MB."""
    growth = kept_memory_mb(_STEP, [260] + list(range(5, 25)), range(25, 225), str(batch))
    assert growth < 8, f"{growth:.1f} MB kept over 200 sequence lengths"


@pytest.mark.parametrize("kind,hidden", [("LSTM", 150), ("GRU", 200)])
@pytest.mark.parametrize("batch", [1, 3])
def test_input_gradient_across_k_blocks_at_small_batch(kind, hidden, batch):
    """Batch 1..4: dx = grad_pre W_ih (rnn.cpp rows_gemm) runs K = G H in blocks of 256 past 512:
    4 x 150 = 3 x 200 = 600 as 256, 256 and 88. Against torch.nn in float64, every gradient."""
    torch.manual_seed(hidden + batch)
    ours = getattr(attnkit.nn, kind)(24, hidden)
    theirs = getattr(torch.nn, kind)(24, hidden).double()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(7, batch, 24)
    grads = []
    for module, inp in ((ours, x), (theirs, x.double())):
        inp = inp.clone().requires_grad_()
        module(inp)[0].pow(2).sum().backward()
        grads.append(inp.grad)
    torch.testing.assert_close(grads[0], grads[1].float(), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch,steps,input_size,hidden,bias", [
    (1, 63, 33, 20, True),  # 63 rows: below the brgemm tiles (Kernels::linear)
    (1, 64, 33, 20, True),  # one whole 64-row tile; G H = 80 / 60 columns: a 64 + 16 panel / one 60-wide
    (3, 22, 33, 20, False),  # 66 rows: a whole tile and a zero-padded one
    (2, 129, 70, 48, True),  # 258 rows: past the first block of 4 tiles; K = 70
    (4, 300, 16, 40, True),  # 1200 rows: five blocks
    (6, 5, 70, 20, True),  # batch 5+: the fused loop's packed weights, K = 64 + 6, units 16 + 4
    (9, 3, 130, 36, False),
], ids=lambda v: str(v))
def test_input_projections_match_float64(kind, batch, steps, input_size, hidden, bias):
    """The forward's input projections x W_ih^T (+ b, which the batch 1..4 loops add to the
    recurrent products): batch 1..4 on brgemm tiles of 64 rows by
    64 columns (rnn_fused.cpp linear_tiles) from T B = 64 rows, batch 5+ in the fused loop on
    weights packed by chunk of 16 units (pack_gate_columns). Against torch.nn in float64."""
    torch.manual_seed(batch * 100 + steps)
    ours = getattr(attnkit.nn, kind)(input_size, hidden, bias=bias)
    theirs = getattr(torch.nn, kind)(input_size, hidden, bias=bias).double()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(steps, batch, input_size)
    with torch.no_grad():
        out, state = ours(x)
        ref_out, ref_state = theirs(x.double())
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=2e-6)
    for got, want in zip(state if kind == "LSTM" else (state,), ref_state if kind == "LSTM" else (ref_state,)):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=2e-6)
