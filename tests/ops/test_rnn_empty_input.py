"""LSTM/GRU layers and cells with input_size 0 (torch.nn.GRUCell(0, H) trains): the bf16 fused
loops took I = 0 into a brgemm of K = 0, which threw inside the OpenMP team (std::terminate,
the whole process), and the float32 small-batch backward's brgemm raised bad_alloc."""
import pytest
import torch

import attnkit


@pytest.mark.parametrize("name", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [1, 3, 5, 9, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("route", ["onednn", "aten"])
def test_input_size_zero_matches_the_reference(name, batch, dtype, route, monkeypatch):
    """Both GEMM routes (the CPU's vendor picks one): oneDNN has no primitive for K = 0 and
    raised from 16 rows (T * B here) where the AMD default sent the projections to it."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", route)
    torch.manual_seed(batch)
    T, H, gates = 3, 6, 4 if name == "lstm" else 3
    x = torch.randn(T, batch, 0, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, H, dtype=dtype, requires_grad=True)
    c0 = torch.randn(batch, H, dtype=dtype, requires_grad=True)
    w_ih = torch.randn(gates * H, 0, dtype=dtype, requires_grad=True)
    w_hh, b_ih, b_hh = (torch.randn(*shape, dtype=dtype, requires_grad=True)
                        for shape in ((gates * H, H), (gates * H,), (gates * H,)))
    leaves = (x, h0, w_ih, w_hh, b_ih, b_hh) + ((c0,) if name == "lstm" else ())
    op = getattr(attnkit.ops, name)

    def run(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        hx = (h0, c0) if name == "lstm" else h0
        out, state = op(x, hx, w_ih, w_hh, b_ih, b_hh)
        final = state[0] if name == "lstm" else state
        leaves = (x, h0, w_ih, w_hh, b_ih, b_hh) + ((c0,) if name == "lstm" else ())
        return [out, final, *torch.autograd.grad(out.double().square().sum() + final.double().sum(), leaves)]

    got = run(*leaves[:2], c0, *leaves[2:6])
    with attnkit.use_backend("reference", op=name):  # in float64, from the same values
        expected = run(*(t.detach().double().requires_grad_() for t in (*leaves[:2], c0, *leaves[2:6])))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for g, e in zip(got, expected):
        assert g.shape == e.shape and ((g.double() - e).abs() <= tol * max([1.0, *e.abs().flatten().tolist()])).all()


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_infinite_states_give_nan_as_torch(name):
    """The vectorized exp saturated at 1.6e38: sigmoid(-inf) was 6e-39, not 0, so 0 * inf
    came out finite where torch.nn's is NaN (hidden sizes of 8 and up take the vector code)."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name.upper())(4, 16)
    ours = getattr(attnkit.nn, name.upper())(4, 16)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():
        for module in (ours, theirs):
            module.bias_hh_l0[:16] = float("-inf")  # a gate that is exactly 0 (or 1)
    x, h0 = torch.randn(3, 2, 4), torch.randn(1, 2, 16)
    h0[0, 0, 3] = float("inf")
    state = (h0, torch.zeros_like(h0)) if name == "lstm" else h0
    with torch.no_grad():
        got, expected = ours(x, state)[0], theirs(x, state)[0]
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got[~got.isnan()], expected[~expected.isnan()])
