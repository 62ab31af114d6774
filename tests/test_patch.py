"""attnkit.patch / unpatch / patched on a model mixing supported and unsupported modules."""
import pytest
import torch

import attnkit
from attnkit import nn as ak

D, H = 16, 4


class MyAttention(torch.nn.MultiheadAttention):
    """A user subclass: may change forward, so patch must leave it alone."""


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, D)
        self.encoder = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(D, H, 32, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)
        self.attn = torch.nn.MultiheadAttention(D, H, batch_first=True)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(MyAttention(D, H)), torch.nn.GELU()])
        self.lstm = torch.nn.LSTM(D, D, batch_first=True)
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x, pad):
        h = self.encoder(self.embed(x), src_key_padding_mask=pad)
        h = h + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        h, _ = self.lstm(h)
        return self.head(h)


def inputs():
    gen = torch.Generator().manual_seed(0)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    return torch.randn(2, 5, 8, generator=gen), pad


def test_patch_replaces_supported_and_reports_skipped():
    torch.manual_seed(0)
    model = Model().eval()
    params = {name: p for name, p in model.named_parameters()}
    x, pad = inputs()
    with torch.no_grad():
        expected = model(x, pad)
    report = attnkit.patch(model)
    replaced = {name for name, _, _ in report.replaced}
    assert {"encoder", "attn"} <= replaced
    assert ("lstm" in replaced) == hasattr(ak, "LSTM")
    assert type(model.encoder) is ak.TransformerEncoder
    assert type(model.encoder.layers[1].self_attn) is ak.MultiheadAttention
    assert type(model.attn) is ak.MultiheadAttention
    assert type(model.blocks[0][0]) is MyAttention  # subclass: skipped, with the reason
    assert any(name == "blocks.0.0" and "subclasses" in reason for name, reason in report.skipped)
    assert "replaced" in str(report)
    # Same Parameter objects (optimizers keep working), same training flag, same outputs.
    assert all(p is params[name] for name, p in model.named_parameters())
    assert not model.encoder.training and not model.attn.training
    with torch.no_grad():
        out = model(x, pad)
    real = ~pad
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)

    restored = attnkit.unpatch(model)
    assert set(restored) == replaced
    assert type(model.encoder) is torch.nn.TransformerEncoder and type(model.attn) is torch.nn.MultiheadAttention
    assert type(model.encoder.layers[0].self_attn) is torch.nn.MultiheadAttention


def test_patched_context_keeps_gradients_flowing_to_the_same_parameters():
    torch.manual_seed(0)
    model = Model().train()
    x, pad = inputs()
    model(x, pad)[~pad].sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with attnkit.patched(model, modules=["MultiheadAttention", torch.nn.TransformerEncoder]) as report:
        assert type(model.attn) is ak.MultiheadAttention and model.attn.training
        assert all(name != "lstm" for name, _, _ in report.replaced)
        model(x, pad)[~pad].sum().backward()
    assert type(model.attn) is torch.nn.MultiheadAttention
    for name, p in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_patch_keeps_dtype_and_device_and_shared_modules():
    attn = torch.nn.MultiheadAttention(D, H).double()
    model = torch.nn.ModuleDict({"a": attn, "b": attn})  # one module under two names
    report = attnkit.patch(model)
    assert len(report.replaced) == 2 and model["a"] is model["b"]
    assert model["a"].in_proj_weight.dtype == torch.float64
    x = torch.randn(3, 2, D, dtype=torch.float64)
    torch.testing.assert_close(model["a"](x, x, x)[0], attn(x, x, x)[0])


def test_patch_errors_and_root():
    with pytest.raises(ValueError, match="supported"):
        attnkit.patch(torch.nn.Linear(2, 2), modules=["Linear"])
    with pytest.raises(TypeError):
        attnkit.patch(object())
    report = attnkit.patch(torch.nn.MultiheadAttention(D, H))
    assert report.replaced == [] and "from_torch" in report.skipped[0][1]
    # A compiled module calls the one it was built on: replacing its _orig_mod would change nothing.
    compiled = torch.compile(torch.nn.MultiheadAttention(D, H))
    original = compiled._orig_mod
    report = attnkit.patch(compiled)
    assert report.replaced == [] and report.skipped[0][0] == "_orig_mod" and "from_torch" in report.skipped[0][1]
    assert compiled._orig_mod is original
    inside = torch.compile(torch.nn.Sequential(torch.nn.MultiheadAttention(D, H)))
    assert [name for name, *_ in attnkit.patch(inside).replaced] == ["_orig_mod.0"]


def test_patch_copies_hook_containers_of_recurrent_modules():
    """The recurrent replacements shared the original's hook dicts: a hook registered
    on the patched module fired on the original too, weight_norm on it broke the
    original, and after unpatch the original kept the patched module's hooks."""
    torch.manual_seed(0)
    originals = {"lstm": torch.nn.LSTM(4, 5), "gru": torch.nn.GRU(4, 5), "lstm_cell": torch.nn.LSTMCell(4, 5),
                 "gru_cell": torch.nn.GRUCell(4, 5)}
    model = torch.nn.ModuleDict(originals)
    calls = []
    for name, module in originals.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(("before", name)))  # carried over
    x = {"lstm": torch.randn(3, 2, 4), "gru": torch.randn(3, 2, 4), "lstm_cell": torch.randn(2, 4),
         "gru_cell": torch.randn(2, 4)}
    with torch.no_grad():
        expected = {name: module(x[name]) for name, module in originals.items()}
    calls.clear()
    attnkit.patch(model)
    for name, module in originals.items():
        patched = model[name]
        assert patched is not module and type(patched).__module__.startswith("attnkit.")
        patched.register_forward_hook(lambda *_, name=name: calls.append(("patched", name)))
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(patched, "weight_hh_l0" if "cell" not in name else "weight_hh")
        with torch.no_grad():
            patched(x[name])
        assert calls == [("before", name), ("patched", name)]
        calls.clear()
        with torch.no_grad():  # the original is untouched: its own parameters and hooks only
            torch.testing.assert_close(module(x[name]), expected[name])
        assert calls == [("before", name)]
        calls.clear()
    assert sorted(attnkit.unpatch(model)) == sorted(originals)
    for name, module in originals.items():
        assert model[name] is module
        with torch.no_grad():
            torch.testing.assert_close(model[name](x[name]), expected[name])
        assert calls == [("before", name)]
        calls.clear()


def test_patch_copies_hook_containers_of_attention_modules():
    """As the recurrent ones (nn._share): MultiheadAttention and the Transformer layers
    copied only their parameter, buffer and module dicts and shared every hook dict."""
    torch.manual_seed(0)
    originals = {"mha": torch.nn.MultiheadAttention(8, 2), "layer": torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0)}
    model = torch.nn.ModuleDict(originals)
    x = torch.randn(3, 2, 8)
    run = {"mha": lambda m: m(x, x, x)[0], "layer": lambda m: m(x)}
    with torch.no_grad():
        expected = {name: run[name](module) for name, module in originals.items()}
    attnkit.patch(model)
    for name, module in originals.items():
        calls = []
        patched = model[name]
        assert patched is not module
        patched.register_forward_hook(lambda *_: calls.append("patched"))
        if name == "mha":  # replaces a Parameter of the module itself (the layer's are in shared submodules)
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(patched, "in_proj_weight")
        with torch.no_grad():
            run[name](patched)
            assert calls == ["patched"]
            torch.testing.assert_close(run[name](module), expected[name])  # its own parameters, no hook
        assert calls == ["patched"]
