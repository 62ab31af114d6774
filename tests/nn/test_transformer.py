"""attnkit.nn Transformer modules against torch.nn's with the same weights (dropout 0)."""
import warnings

import pytest
import torch

import attnkit
from attnkit import nn as ak

D, H, FF, B, N = 16, 4, 32, 3, 6
ATOL = 5e-5


def build(name, *args, **kw):
    """(torch module, attnkit module) built under the same seed."""
    torch.manual_seed(0)
    theirs = getattr(torch.nn, name)(*args, **kw)
    torch.manual_seed(0)
    ours = getattr(ak, name)(*args, **kw)
    return theirs, ours


def layer_args(**kw):
    return dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, **kw)


def run(module, inputs, call, weight=None):
    """Output, and gradients of (weight * out^2).sum() w.r.t. the inputs and parameters."""
    out = module(*inputs, **call)
    loss = (out.square() * (1 if weight is None else weight)).sum()
    grads = torch.autograd.grad(loss, list(inputs) + list(module.parameters()))
    return out, grads


def assert_same(theirs, ours, inputs, call, weight=None, out_mask=None):
    out_t, grads_t = run(theirs, inputs, call, weight)
    out_o, grads_o = run(ours, inputs, call, weight)
    if out_mask is not None:
        out_t, out_o = out_t[out_mask], out_o[out_mask]
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=ATOL)
    for g_o, g_t in zip(grads_o, grads_t):
        torch.testing.assert_close(g_o, g_t, atol=ATOL, rtol=ATOL)


def seq(n=N, batch_first=False):
    return torch.randn((B, n, D) if batch_first else (n, B, D), generator=torch.Generator().manual_seed(n),
                       requires_grad=True)


def padding(n=N, float_mask=False):
    pad = torch.zeros(B, n, dtype=torch.bool)
    pad[1, -2:] = True
    pad[2, 1:] = True
    return torch.zeros(B, n).masked_fill(pad, float("-inf")) if float_mask else pad


@pytest.mark.parametrize("name, args", [
    ("TransformerEncoderLayer", (D, H, FF)), ("TransformerDecoderLayer", (D, H, FF)),
    ("Transformer", (D, H, 2, 2, FF)),
])
def test_state_dict_is_torchs(name, args):
    theirs, ours = build(name, *args)
    assert isinstance(ours, getattr(torch.nn, name))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    theirs.load_state_dict(ours.state_dict())
    for attn in [m for m in ours.modules() if isinstance(m, torch.nn.MultiheadAttention)]:
        assert type(attn) is ak.MultiheadAttention


MASKS = {
    "none": lambda: {},
    "causal_bool": lambda: dict(src_mask=torch.ones(N, N, dtype=torch.bool).triu(1), is_causal=True),
    "float": lambda: dict(src_mask=torch.randn(N, N)),
    "pad_bool": lambda: dict(src_key_padding_mask=padding()),
    "pad_float_and_bool_mask": lambda: dict(src_key_padding_mask=padding(float_mask=True),
                                            src_mask=torch.ones(N, N, dtype=torch.bool).triu(1)),
}


@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True, activation="gelu", batch_first=True),
                                dict(bias=False, layer_norm_eps=1e-3)], ids=["default", "norm_first", "no_bias"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_encoder_layer(kw, mask):
    theirs, ours = build("TransformerEncoderLayer", **layer_args(**kw))
    call = MASKS[mask]()
    with pytest.warns() if mask == "pad_float_and_bool_mask" else _quiet():
        assert_same(theirs, ours, [seq(batch_first=kw.get("batch_first", False))], call)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_encoder_layer_never_takes_torchs_fast_path(monkeypatch):
    _, ours = build("TransformerEncoderLayer", **layer_args(batch_first=True))
    encoder = ak.TransformerEncoder(ours, 2)
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", None)  # calling it would raise
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", None)
    with torch.no_grad():
        encoder.eval()(torch.randn(B, N, D), src_key_padding_mask=padding())
        ours.eval()(torch.randn(B, N, D), src_key_padding_mask=padding())


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_dense(batch_first, norm_first):
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(
        **layer_args(batch_first=batch_first, norm_first=norm_first)), 2, torch.nn.LayerNorm(D),
        enable_nested_tensor=False)
    assert all(type(layer) is ak.TransformerEncoderLayer for layer in ours.layers)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(N)
    assert_same(theirs, ours, [seq(batch_first=batch_first)], dict(mask=causal))  # is_causal detected
    assert_same(theirs, ours, [seq(batch_first=batch_first)], dict(src_key_padding_mask=padding(float_mask=True)))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_packs_padded_batches(batch_first, causal, monkeypatch):
    calls = []
    varlen = attnkit.nn.attention.flash_attention_varlen
    monkeypatch.setattr(attnkit.nn.attention, "flash_attention_varlen", lambda *a, **k: calls.append(a) or varlen(*a, **k))
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(
        **layer_args(batch_first=batch_first)), 2, torch.nn.LayerNorm(D), enable_nested_tensor=False)
    pad = padding()
    call = dict(src_key_padding_mask=pad)
    if causal:
        call.update(mask=torch.nn.Transformer.generate_square_subsequent_mask(N), is_causal=True)
    real = ~pad if batch_first else (~pad).T
    x = seq(batch_first=batch_first)
    # Padded positions differ by design (torch's slow path computes garbage there, the packed
    # route leaves 0 before the final norm), so the loss only reads the real tokens.
    assert_same(theirs, ours, [x], call, weight=real[..., None].float(), out_mask=real)
    assert len(calls) == 2 and calls[0][0].shape[0] == int(real.sum())  # one per layer, real tokens only
    out = ours(x, **call)
    torch.testing.assert_close(out[~real], ours.norm(torch.zeros(D)).expand(int((~real).sum()), D))


def test_encoder_packed_equals_torch_nested_fast_path():
    """torch's own inference path (nested tensors) zeroes padded positions as the packed route does."""
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(**layer_args(batch_first=True)), 2)
    theirs.eval(), ours.eval()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -2:] = True
    pad[2, 3:] = True
    with torch.no_grad():
        x = torch.randn(B, N, D)
        torch.testing.assert_close(ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad),
                                   atol=ATOL, rtol=ATOL)


def test_encoder_bad_padding_mask_raises():
    _, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(**layer_args()), 1)
    with pytest.raises(AssertionError):
        ours(torch.randn(N, B, D), src_key_padding_mask=torch.zeros(1, N, dtype=torch.bool).index_fill(1, torch.tensor([0]), True))
    with pytest.raises(AssertionError):
        ours(torch.randn(N, B, D), src_key_padding_mask=torch.zeros(B, N, dtype=torch.int64))


def test_encoder_wrong_width_raises_like_torch_when_packing():
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(**layer_args()), 2,
                         enable_nested_tensor=False)
    x = torch.randn(N, B, D + 2)
    for module in (theirs, ours):  # ours packs: the check comes before the projections' matmul
        with pytest.raises(AssertionError, match=f"was expecting embedding dimension of {D}, but got {D + 2}"):
            module(x, src_key_padding_mask=padding())


def test_encoder_wrong_mask_size_raises_like_torch_when_packing():
    """With is_causal=True the packed path never reads the mask; it took one of the wrong size."""
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(**layer_args()), 2,
                         enable_nested_tensor=False)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(N + 1)
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match="The shape of the 2D attn_mask is"):
            module(torch.randn(N, B, D), mask=mask, src_key_padding_mask=padding(), is_causal=True)


def _warnings_and_error(module, *args, **call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            module(*args, **call)
            error = None
        except AssertionError as exc:
            error = str(exc)
    return [str(w.message) for w in caught], error


@pytest.mark.parametrize("name, mask_key", [("TransformerEncoderLayer", "src_mask"), ("TransformerEncoder", "mask")])
@pytest.mark.parametrize("case", ["int_padding", "int_mask", "bool_padding_float_mask", "float_padding_bool_mask"])
def test_encoder_mask_errors_and_warnings_are_torchs(name, mask_key, case):
    """Mask checks as torch's forward: same names (src_key_padding_mask, src_mask / mask), one warning."""
    if name == "TransformerEncoderLayer":
        theirs, ours = build(name, **layer_args())
    else:
        theirs, ours = build(name, torch.nn.TransformerEncoderLayer(**layer_args()), 2, enable_nested_tensor=False)
    pad, mask = padding(), torch.ones(N, N, dtype=torch.bool).triu(1)
    call = {
        "int_padding": dict(src_key_padding_mask=pad.long()),
        "int_mask": {mask_key: mask.long()},
        "bool_padding_float_mask": {"src_key_padding_mask": pad, mask_key: torch.zeros(N, N).masked_fill(mask, -1e4)},
        "float_padding_bool_mask": {"src_key_padding_mask": torch.zeros(B, N).masked_fill(pad, float("-inf")),
                                    mask_key: mask},
    }[case]
    x = seq()
    expected = _warnings_and_error(theirs, x, **call)
    assert expected[0] or expected[1]
    assert _warnings_and_error(ours, x, **call) == expected
    if expected[1] is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real = (~pad).T[..., None]
            torch.testing.assert_close(ours(x, **call) * real, theirs(x, **call) * real, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_and_decoder(norm_first):
    theirs, ours = build("TransformerDecoderLayer", **layer_args(norm_first=norm_first))
    tgt, memory = seq(N), seq(N + 2)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(N)
    call = dict(tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=padding(N),
                memory_key_padding_mask=padding(N + 2))
    assert_same(theirs, ours, [tgt, memory], call)
    theirs, ours = build("TransformerDecoder", torch.nn.TransformerDecoderLayer(**layer_args()), 2,
                         torch.nn.LayerNorm(D))
    assert_same(theirs, ours, [tgt, memory], dict(tgt_mask=causal, memory_mask=torch.zeros(N, N + 2, dtype=torch.bool)))


def test_transformer():
    theirs, ours = build("Transformer", D, H, 2, 2, FF, dropout=0.0, batch_first=True)
    src, tgt = seq(N + 1, batch_first=True), seq(N, batch_first=True)
    call = dict(tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(N), tgt_is_causal=True,
                src_key_padding_mask=padding(N + 1), memory_key_padding_mask=padding(N + 1))
    assert_same(theirs, ours, [src, tgt], call)


@pytest.mark.parametrize("memory_padding", ["none", "same", "equal", "less"])
def test_transformer_packs_the_source_only_where_the_decoder_skips_the_padding(memory_padding, monkeypatch):
    """src_key_padding_mask alone (the common call): the packed encoder's 0 at padded positions
    reached the decoder, which attends to every memory position then (outputs off by ~0.8 from
    torch's). It packs only where memory_key_padding_mask hides those positions too."""
    calls = []
    varlen = attnkit.nn.attention.flash_attention_varlen
    monkeypatch.setattr(attnkit.nn.attention, "flash_attention_varlen", lambda *a, **k: calls.append(a) or varlen(*a, **k))
    theirs, ours = build("Transformer", D, H, 2, 2, FF, dropout=0.0, batch_first=True)
    src, tgt = seq(N + 1, batch_first=True), seq(N, batch_first=True)
    pad = padding(N + 1)
    memory = {"none": None, "same": pad, "equal": pad.clone(), "less": pad & (torch.arange(N + 1) < N)}[memory_padding]
    call = dict(src_key_padding_mask=pad, memory_key_padding_mask=memory)
    assert_same(theirs, ours, [src, tgt], call)
    assert bool(calls) == (memory_padding in ("same", "equal"))


def test_encoder_pack_padding_false_keeps_torchs_values_at_padded_positions():
    theirs, ours = build("TransformerEncoder", torch.nn.TransformerEncoderLayer(**layer_args()), 2,
                         enable_nested_tensor=False)
    x, pad = seq(), padding()
    expected = theirs(x, src_key_padding_mask=pad)
    torch.testing.assert_close(ours(x, src_key_padding_mask=pad, pack_padding=False), expected, atol=ATOL, rtol=ATOL)
    packed = ours(x, src_key_padding_mask=pad)  # the default: padded positions 0
    assert not torch.allclose(packed, expected, atol=1e-2) and packed[pad.T].abs().max() == 0


def test_from_torch_shares_parameters():
    theirs = torch.nn.Transformer(D, H, 1, 1, FF, dropout=0.0)
    ours = ak.Transformer.from_torch(theirs)
    assert type(ours.encoder.layers[0].self_attn) is ak.MultiheadAttention
    assert type(theirs.encoder.layers[0].self_attn) is torch.nn.MultiheadAttention
    assert ours.encoder.layers[0].linear1.weight is theirs.encoder.layers[0].linear1.weight
    src, tgt = seq(N + 1), seq(N)
    assert_same(theirs, ours, [src, tgt], {})


@pytest.mark.parametrize("where", ["layer", "self_attn", "global"])
def test_encoder_with_hooks_runs_them_on_padded_batches(where):
    """The packed path (bool padding) called the layers without Module.__call__: their hooks never
    ran, so a hook that edits the attention output changed torch's result and not attnkit's."""
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
    ours = ak.TransformerEncoder.from_torch(theirs)
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    calls = []

    def halve(module, args, output):
        calls.append(type(module).__name__)
        return (output[0] * 0.5, *output[1:]) if isinstance(output, tuple) else output * 0.5

    outputs = []
    for model in (theirs, ours):
        calls.clear()
        handles = []
        if where == "global":
            handles.append(torch.nn.modules.module.register_module_forward_hook(
                lambda m, a, o: halve(m, a, o) if isinstance(m, torch.nn.MultiheadAttention) else None))
        else:
            for layer in model.layers:
                handles.append((layer if where == "layer" else layer.self_attn).register_forward_hook(halve))
        try:
            outputs.append((model(x, src_key_padding_mask=pad), len(calls)))
        finally:
            for handle in handles:
                handle.remove()
    (expected, expected_calls), (out, out_calls) = outputs
    assert out_calls == expected_calls == 2
    keep = ~pad
    torch.testing.assert_close(out[keep], expected[keep])


def test_encoder_hands_a_users_layer_float_masks_as_torch():
    """torch.nn.TransformerEncoder passes its layers float (0 / -inf) masks; the attnkit
    encoder passed a user's layer the bool mask as given, which it added to its scores."""
    seen = []

    class AddsMask(torch.nn.TransformerEncoderLayer):
        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            seen.append(src_key_padding_mask.dtype)
            scores = src @ src.transpose(1, 2) + src_key_padding_mask[:, None, :]
            return src + torch.softmax(scores, -1) @ src

    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoder(AddsMask(8, 2, 16, 0.0, batch_first=True), 2, enable_nested_tensor=False)
    ours = ak.TransformerEncoder.from_torch(theirs)
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    torch.testing.assert_close(ours(x, src_key_padding_mask=pad), theirs(x, src_key_padding_mask=pad))
    assert seen == [torch.float32] * 4


def test_encoder_under_vmap_with_a_per_sample_padding_mask_matches_torch():
    """vmap over samples with a bool src_key_padding_mask: the packed path's bool(pad.any())
    raised under the transform; the dense path runs there, as torch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 1, 8)  # two samples of (S, N, E) = (5, 1, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    results = []
    for nn, extra in ((torch.nn, {"enable_nested_tensor": False}), (attnkit.nn, {})):
        torch.manual_seed(1)
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, 0.0), 2, **extra).eval()
        results.append(torch.func.vmap(lambda xi, pi: encoder(xi, src_key_padding_mask=pi[None]))(x, pad))
    torch.testing.assert_close(results[1], results[0])


def test_layers_show_torch_signatures_in_help():
    import inspect

    for ours, theirs in ((attnkit.nn.TransformerEncoderLayer, torch.nn.TransformerEncoderLayer),
                         (attnkit.nn.TransformerDecoderLayer, torch.nn.TransformerDecoderLayer)):
        assert inspect.signature(ours) == inspect.signature(theirs)  # not (*args, **kwargs)
        assert ours.__doc__.startswith(f"torch.nn.{theirs.__name__} (same arguments")
