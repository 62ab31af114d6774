"""attnkit.nn.LayerNormLSTM / LayerNormGRU: torch.nn's call signature and returns,
the layer math against the reference, PackedSequence / bidirectional / multi-layer
against running each sequence alone, zoneout in training and eval."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import attnkit
from attnkit.nn import LayerNormGRU, LayerNormLSTM
from attnkit.reference import rnn_layernorm as ref

CLASSES = {"lstm": LayerNormLSTM, "gru": LayerNormGRU}


def build(cell, backend="cpp", seed=0, **kw):
    torch.manual_seed(seed)
    m = CLASSES[cell](5, 7, dtype=torch.float64, **kw)
    with torch.no_grad():  # LN parameters away from their identity init, so each one matters
        for name, p in m.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.2)
    return m


def layer_reference(m, cell, x, state, zoneout=None, suffix="_l0"):
    get = lambda n: getattr(m, n + suffix)  # noqa: E731
    common = (get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"),
              (get("ln_ih_weight"), get("ln_ih_bias")), (get("ln_hh_weight"), get("ln_hh_bias")))
    if cell == "lstm":
        out, h, c = ref.layer_norm_lstm(x, state[0], state[1], *common, (get("ln_c_weight"), get("ln_c_bias")),
                                        None, zoneout)[:3]
        return out, (h, c)
    out, h = ref.layer_norm_gru(x, state[0], *common, None, zoneout)[:2]
    return out, (h,)


def zero_state(cell, layers, B, H=7):
    n = 2 if cell == "lstm" else 1
    return [torch.zeros(layers, B, H, dtype=torch.float64) for _ in range(n)]


def as_hx(cell, states):
    return tuple(states) if cell == "lstm" else states[0]


def finals(cell, hidden):
    return list(hidden) if cell == "lstm" else [hidden]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("zoneout", [0.0, 0.3])
def test_one_layer_eval_matches_reference(cell, backend, zoneout):
    m = build(cell, zoneout=zoneout).eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    states = [torch.randn(1, 3, 7, dtype=torch.float64) for _ in zero_state(cell, 1, 3)]
    with attnkit.use_backend(backend):
        out, hidden = m(x, as_hx(cell, states))
    mask = torch.full((4, 3, 7), zoneout, dtype=torch.float64) if zoneout else None
    want_out, want_states = layer_reference(m, cell, x, [s[0] for s in states], mask)
    torch.testing.assert_close(out, want_out)
    for got, want in zip(finals(cell, hidden), want_states):
        torch.testing.assert_close(got[0], want)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_zoneout_uses_a_bernoulli_mask_per_forward(cell):
    m = build(cell, zoneout=0.4).train()
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    torch.manual_seed(123)
    out, _ = m(x)
    torch.manual_seed(123)
    mask = torch.bernoulli(torch.full((6, 2, 7), 0.4, dtype=torch.float64))
    want, _ = layer_reference(m, cell, x, [s[0] for s in zero_state(cell, 1, 2)], mask)
    torch.testing.assert_close(out, want)
    assert 0 < mask.mean() < 1
    out2, _ = m(x)
    assert not torch.equal(out, out2)  # a new mask each forward
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])  # eval: deterministic


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_one_keeps_the_initial_state_in_training(cell):
    m = build(cell, zoneout=1.0).train()
    states = [torch.randn(1, 3, 7, dtype=torch.float64) for _ in zero_state(cell, 1, 3)]
    out, hidden = m(torch.randn(4, 3, 5, dtype=torch.float64), as_hx(cell, states))
    torch.testing.assert_close(out, states[0].expand(4, 3, 7))
    torch.testing.assert_close(finals(cell, hidden)[0], states[0])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_packed_bidirectional_multilayer_matches_each_sequence_alone(cell, backend):
    m = build(cell, num_layers=2, bidirectional=True, batch_first=True, zoneout=0.2).eval()
    lengths = [2, 5, 3]  # unsorted: pack sorts and unsorts
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    states = [torch.randn(4, 3, 7, dtype=torch.float64) for _ in zero_state(cell, 4, 3)]
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with attnkit.use_backend(backend):
        out, hidden = m(packed, as_hx(cell, states))
        padded, out_lengths = pad_packed_sequence(out, batch_first=True)
        assert out_lengths.tolist() == lengths and padded.shape == (3, 5, 14)
        for b, n in enumerate(lengths):
            alone, h_alone = m(x[b:b + 1, :n], as_hx(cell, [s[:, b:b + 1] for s in states]))
            torch.testing.assert_close(padded[b:b + 1, :n], alone)
            assert padded[b, n:].abs().max() == 0 if n < 5 else True
            for got, want in zip(finals(cell, hidden), finals(cell, h_alone)):
                torch.testing.assert_close(got[:, b:b + 1], want)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_shapes_unbatched_and_batch_first_like_torch_nn(cell):
    m = build(cell, num_layers=2, bidirectional=True)
    t = getattr(torch.nn, cell.upper())(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    for x in (torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)):
        out, hidden = m(x)
        out_t, hidden_t = t(x)
        assert out.shape == out_t.shape
        assert [h.shape for h in finals(cell, hidden)] == [h.shape for h in finals(cell, hidden_t)]
    mb = build(cell, batch_first=True).eval()
    mt = build(cell).eval()
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(mb(x)[0], mt(x.transpose(0, 1))[0].transpose(0, 1))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_parameters_state_dict_and_init(cell):
    m = CLASSES[cell](5, 7, bidirectional=True)
    keys = set(m.state_dict())
    parts = ("ih", "hh", "c") if cell == "lstm" else ("ih", "hh")
    gates = 4 if cell == "lstm" else 3
    for suffix in ("_l0", "_l0_reverse"):
        assert {f"weight_ih{suffix}", f"weight_hh{suffix}", f"bias_ih{suffix}", f"bias_hh{suffix}"} <= keys
        for part in parts:
            weight, bias = getattr(m, f"ln_{part}_weight{suffix}"), getattr(m, f"ln_{part}_bias{suffix}")
            assert weight.shape == ((1 if part == "c" else gates) * 7,)
            assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(bias, torch.zeros_like(bias))
    m2 = CLASSES[cell](5, 7, bidirectional=True)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 5)
    torch.testing.assert_close(m(x)[0], m2(x)[0])
    m.reset_parameters()
    assert torch.equal(m.ln_ih_weight_l0, torch.ones(gates * 7))
    assert "zoneout=0.5" in repr(CLASSES[cell](5, 7, zoneout=0.5))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bad_arguments(cell):
    cls = CLASSES[cell]
    for bad in (-0.1, 1.5, "0.2", True):
        with pytest.raises(ValueError, match="zoneout must be a number in \\[0, 1\\]"):
            cls(5, 7, zoneout=bad)
    with pytest.raises(NotImplementedError, match="torch.nn has no layer-normalized RNN"):
        cls.from_torch(getattr(torch.nn, cell.upper())(5, 7))
    m = cls(5, 7)
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        m(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(3, 2, 4))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_zoneout_takes_any_real_number(cell):
    """torch.nn.LSTM takes dropout=np.float32(0.1); zoneout did not."""
    import numpy as np

    cls = getattr(attnkit.nn, "LayerNorm" + cell.upper())
    assert cls(5, 7, zoneout=np.float32(0.25)).zoneout == 0.25


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_every_parameter_gets_its_own_gradient_tensor(cell):
    """The kernels' bias gradient serves b_ih, b_hh and the LayerNorm shifts alike; each must
    get a tensor of its own (one tensor returned four times let a hook scaling one gradient in
    place scale the others)."""
    m = build(cell)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    params = list(m.parameters())
    with attnkit.use_backend("cpp"):
        grads = torch.autograd.grad(m(x)[0].sum(), params)
    assert len({id(g) for g in grads}) == len(grads)
    expected = torch.autograd.grad(m(x)[0].sum(), params)
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_after_an_autocast_linear_runs_in_float32(cell):
    """The usual model under CPU autocast: a Linear's bfloat16 output fed to a float32
    LayerNormLSTM/GRU raised a dtype mismatch; it runs in float32 as layer_norm does,
    zoneout (drawn in the input's dtype) and a two-layer stack included."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(4, 5)
    m = CLASSES[cell](5, 7, num_layers=2, zoneout=0.25).eval()
    x = torch.randn(6, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = proj(x)
        assert y.dtype == torch.bfloat16
        out, state = m(y)
    expected, expected_state = m(y.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
