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


_RUNS = {
    "lstm": (lambda: torch.nn.LSTM(4, 5), lambda m, x: m(x)[0], (3, 2, 4), "weight_hh_l0"),
    "gru": (lambda: torch.nn.GRU(4, 5), lambda m, x: m(x)[0], (3, 2, 4), "weight_hh_l0"),
    "lstm_cell": (lambda: torch.nn.LSTMCell(4, 5), lambda m, x: m(x)[0], (2, 4), "weight_hh"),
    "gru_cell": (lambda: torch.nn.GRUCell(4, 5), lambda m, x: m(x), (2, 4), "weight_hh"),
    "mha": (lambda: torch.nn.MultiheadAttention(4, 2), lambda m, x: m(x, x, x)[0], (3, 2, 4), "in_proj_weight"),
    "layer": (lambda: torch.nn.TransformerEncoderLayer(4, 2, 8, 0.0), lambda m, x: m(x), (3, 2, 4), None),
}


@pytest.mark.parametrize("kind", list(_RUNS))
def test_patch_shares_hooks_and_unpatch_carries_changes_back(kind):
    """A hook registered before patch and removed while patched kept running (the replacement
    held a copy of the hook dict); what changed while patched (weight_norm, a replaced
    Parameter) was dropped by unpatch, which gave back the original's stale weights."""
    make, run, shape, weight = _RUNS[kind]
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"m": make()})
    original = model["m"]
    x = torch.randn(shape)
    calls = []
    before = original.register_forward_hook(lambda *_: calls.append("before"))
    attnkit.patch(model)
    patched = model["m"]
    assert patched is not original
    during = patched.register_forward_hook(lambda *_: calls.append("during"))
    before.remove()
    with torch.no_grad():
        run(patched, x)
    assert calls == ["during"]
    if weight is not None:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(patched, weight)
    name, param = next(iter(patched.named_parameters(recurse=False))) if kind != "layer" else \
        ("linear1.weight", None)
    if param is not None:  # a new Parameter object, as load_state_dict(assign=True) gives
        setattr(patched, name, torch.nn.Parameter(param.detach() * 0.5))
    with torch.no_grad():
        want = run(patched, x)
    calls.clear()
    assert attnkit.unpatch(model) == ["m"] and model["m"] is original
    with torch.no_grad():
        torch.testing.assert_close(run(original, x), want)
    assert calls == ["during"]
    during.remove()
    with torch.no_grad():
        run(original, x)
    assert calls == ["during"]


def test_patch_keeps_each_submodules_training_flag():
    """patch and unpatch called the recursive train(flag): a user layer or dropout left in
    eval inside a replaced encoder was switched to training."""
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
    model = torch.nn.Sequential(encoder).train()
    encoder.layers[1].eval()
    encoder.layers[0].dropout.eval()
    flags = {name: m.training for name, m in model.named_modules()}
    attnkit.patch(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    model[0].layers[0].self_attn.eval()
    flags.update({"0.layers.0.self_attn": False, "0.layers.0.self_attn.out_proj": False})
    attnkit.unpatch(model)
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_patch_keeps_a_tied_module_tied():
    """An attention also reachable outside its encoder became two attnkit modules (the
    encoder's from_torch built its own), so a hook on one missed the encoder's calls."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0), 1,
                                                     enable_nested_tensor=False)
            self.attn = self.first.layers[0].self_attn
            self.second = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, 0.0), 1,
                                                      enable_nested_tensor=False)
            self.second.layers[0] = self.first.layers[0]

    model = Model()
    attnkit.patch(model)
    assert type(model.attn) is attnkit.nn.MultiheadAttention
    assert model.attn is model.first.layers[0].self_attn
    assert model.second.layers[0] is model.first.layers[0]
    attnkit.unpatch(model)
    assert type(model.attn) is torch.nn.MultiheadAttention and model.attn is model.first.layers[0].self_attn



@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell", "GRUCell", "MultiheadAttention", "TransformerEncoderLayer",
                                  "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder", "Transformer"])
def test_every_from_torch_exists_and_checks_its_argument(name):
    """PatchReport sends a root cell to LSTMCell.from_torch, which did not exist; the
    Transformer ones took any module and returned a broken object."""
    with pytest.raises(TypeError, match=rf"{name}.from_torch: expected a torch.nn.{name}, got Linear"):
        getattr(attnkit.nn, name).from_torch(torch.nn.Linear(4, 4))
