"""Property tests: attnkit.nn.LSTM / GRU (multi-layer, bidirectional, projection, batch-first,
PackedSequence with sorted and unsorted lengths) against torch.nn with copied weights;
ops.lstm / ops.gru with per-row lengths (incl. 0) against the reference loop; ops.lstm_cell
against torch.nn.LSTMCell. Values and gradients of inputs, states and every weight."""
import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES
from hypothesis import given
from hypothesis import strategies as st
from prop_common import examples, seeds
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import attnkit
from attnkit import reference
from attnkit.ops import gru, lstm, lstm_cell

BACKENDS = st.sampled_from(["cpp", "reference"])
DTYPES = st.sampled_from([torch.float32, torch.float64])


def weighted_sum(tensors):
    """A loss giving every output element a different gradient."""
    return sum((t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in tensors)


def assert_all_close(got, expected, dtype, factor=1):
    atol, rtol = TOLERANCES[dtype]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=atol * factor, rtol=rtol * factor)


def flatten(result):
    output, hidden = result
    out = [output.data if isinstance(output, PackedSequence) else output]
    return out + (list(hidden) if isinstance(hidden, tuple) else [hidden])


@st.composite
def module_problems(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU"]))
    T, B = draw(st.integers(1, 10)), draw(st.integers(1, 4))
    hidden = draw(st.integers(1, 9))
    packed = draw(st.sampled_from(["", "sorted", "unsorted"]))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))  # PackedSequence: lengths >= 1
    if packed == "sorted":
        lengths = sorted(lengths, reverse=True)
    return dict(kind=kind, T=T, B=B, input_size=draw(st.integers(1, 7)), hidden=hidden,
                layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()),
                bias=draw(st.booleans()),
                proj=draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0,
                packed=packed, lengths=lengths, h0=draw(st.booleans()), seed=draw(seeds))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@examples(15)
@given(p=module_problems(), backend=BACKENDS, dtype=DTYPES)
def test_modules_match_torch_nn(p, backend, dtype):
    kwargs = dict(num_layers=p["layers"], bidirectional=p["bidirectional"], batch_first=p["batch_first"],
                  bias=p["bias"], dtype=dtype)
    if p["kind"] == "LSTM":
        kwargs["proj_size"] = p["proj"]
    torch.manual_seed(p["seed"])
    ours = getattr(attnkit.nn, p["kind"])(p["input_size"], p["hidden"], **kwargs)
    theirs = getattr(torch.nn, p["kind"])(p["input_size"], p["hidden"], **kwargs)
    theirs.load_state_dict(ours.state_dict())
    gen = torch.Generator().manual_seed(p["seed"])
    T, B = p["T"], p["B"]
    x = torch.randn(*((B, T) if p["batch_first"] else (T, B)), p["input_size"], generator=gen, dtype=dtype)
    leaves = [x.requires_grad_(True)]
    hx = None
    if p["h0"]:
        states = p["layers"] * (2 if p["bidirectional"] else 1)
        h0 = torch.randn(states, B, p["proj"] or p["hidden"], generator=gen, dtype=dtype, requires_grad=True)
        c0 = torch.randn(states, B, p["hidden"], generator=gen, dtype=dtype, requires_grad=True)
        hx = (h0, c0) if p["kind"] == "LSTM" else h0
        leaves += [h0, c0] if p["kind"] == "LSTM" else [h0]
    inp = x
    if p["packed"]:
        inp = pack_padded_sequence(x, p["lengths"], batch_first=p["batch_first"], enforce_sorted=p["packed"] == "sorted")
    with attnkit.use_backend(backend, op=p["kind"].lower()):
        got = flatten(ours(inp, hx))
        # retain_graph: the packing of x is shared with the torch.nn run below.
        grads = torch.autograd.grad(weighted_sum(got), leaves + list(ours.parameters()), retain_graph=True)
    expected = flatten(theirs(inp, hx))
    grads_ref = torch.autograd.grad(weighted_sum(expected), leaves + list(theirs.parameters()))
    assert_all_close(got, expected, dtype)
    assert_all_close(grads, grads_ref, dtype, RNN_GRAD_FACTOR)


@st.composite
def layer_problems(draw):
    T, B = draw(st.integers(1, 12)), draw(st.integers(1, 5))
    hidden = draw(st.integers(1, 20))
    return dict(kind=draw(st.sampled_from(["lstm", "gru"])), T=T, B=B, input_size=draw(st.integers(1, 9)),
                hidden=hidden, proj=draw(st.integers(0, hidden - 1)), bias=draw(st.booleans()),
                lengths=draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B))),
                seed=draw(seeds))


@examples(30)
@given(p=layer_problems(), dtype=DTYPES)
def test_cpp_layer_matches_reference_loop(p, dtype):
    """ops.lstm / ops.gru (one layer, lengths incl. 0 = a row that never runs) on cpp vs the
    reference loop differentiated by autograd, in the same dtype."""
    gen = torch.Generator().manual_seed(p["seed"])
    T, B, I, H = p["T"], p["B"], p["input_size"], p["hidden"]
    gates = 4 if p["kind"] == "lstm" else 3
    P = (p["proj"] or H) if p["kind"] == "lstm" else H
    scale = H**-0.5

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype).requires_grad_(True)

    x, h0 = rand(T, B, I), rand(B, P)
    w_ih, w_hh = rand(gates * H, I, s=scale), rand(gates * H, P, s=scale)
    b_ih, b_hh = (rand(gates * H), rand(gates * H)) if p["bias"] else (None, None)
    lengths = None if p["lengths"] is None else torch.tensor(p["lengths"])
    if p["kind"] == "lstm":
        c0 = rand(B, H)
        w_hr = rand(P, H, s=scale) if P != H else None
        leaves = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
        with attnkit.use_backend("cpp", op="lstm"):
            out, (h_n, c_n) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths)
        got = [out, h_n, c_n]
        expected = list(reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)[:3])
    else:
        leaves = [x, h0, w_ih, w_hh, b_ih, b_hh]
        with attnkit.use_backend("cpp", op="gru"):
            out, h_n = gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths)
        got = [out, h_n]
        expected = list(reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)[:2])
    present = [t for t in leaves if t is not None]
    assert_all_close(got, expected, dtype)
    grads = torch.autograd.grad(weighted_sum(got), present)
    assert_all_close(grads, torch.autograd.grad(weighted_sum(expected), present), dtype, RNN_GRAD_FACTOR)


@examples(25)
@given(B=st.integers(1, 6), I=st.integers(1, 20), H=st.integers(1, 20), bias=st.booleans(), state=st.booleans(),
       backend=BACKENDS, dtype=DTYPES, seed=seeds)
def test_lstm_cell_matches_torch_nn(B, I, H, bias, state, backend, dtype, seed):
    torch.manual_seed(seed)
    cell = torch.nn.LSTMCell(I, H, bias=bias, dtype=dtype)
    x = torch.randn(B, I, dtype=dtype, requires_grad=True)
    h, c = (torch.randn(B, H, dtype=dtype, requires_grad=True) for _ in range(2))
    params = list(cell.parameters())
    with attnkit.use_backend(backend, op="lstm_cell"):
        got = lstm_cell(x, (h, c) if state else None, *params)
    got = list(got)
    expected = list(cell(x, (h, c) if state else None))
    leaves = [x] + ([h, c] if state else []) + params
    assert_all_close(got, expected, dtype)
    grads = torch.autograd.grad(weighted_sum(got), leaves)
    assert_all_close(grads, torch.autograd.grad(weighted_sum(expected), leaves), dtype, RNN_GRAD_FACTOR)
