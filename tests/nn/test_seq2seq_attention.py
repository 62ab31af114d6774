"""attnkit.nn.BahdanauAttention and LuongAttention ("dot", "general", "concat") against
the formulas written out in plain PyTorch here: values and gradients (float64), masks
(weights exactly 0 on padding, fully masked rows 0 and never NaN), one-step and
multi-step queries, state_dict, bad input."""
import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.nn import BahdanauAttention, LuongAttention

B, TQ, TK, DQ, DK, DV, A = 3, 4, 6, 5, 7, 3, 9


def formula(module, q, k, v, mask):
    """Scores as the papers write them, softmax over real keys by F.softmax."""
    if isinstance(module, BahdanauAttention) or module.score == "concat":
        w_q, w_k, v_a = module.query_proj.weight, module.key_proj.weight, module.v
        scores = torch.tanh((q @ w_q.T)[:, :, None, :] + (k @ w_k.T)[:, None, :, :]) @ v_a
    elif module.score == "dot":
        scores = torch.einsum("bqd,bkd->bqk", q, k)
    else:  # general: q^T W k
        scores = torch.einsum("bqd,de,bke->bqk", q, module.proj.weight, k)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    weights = F.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # fully masked rows: 0, the modules' convention
    return weights @ v, weights


def modules(dtype=torch.float64, key_size=DK):
    torch.manual_seed(0)
    return {
        "bahdanau": BahdanauAttention(DQ, key_size, A, dtype=dtype),
        "dot": LuongAttention(DQ, DQ, "dot", dtype=dtype),
        "general": LuongAttention(DQ, key_size, "general", dtype=dtype),
        "concat": LuongAttention(DQ, key_size, "concat", attention_size=A, dtype=dtype),
    }


def inputs(key_size, n_q=TQ, dtype=torch.float64, masking="padded"):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, n_q, DQ, generator=gen, dtype=dtype)
    k = torch.randn(B, TK, key_size, generator=gen, dtype=dtype)
    v = torch.randn(B, TK, DV, generator=gen, dtype=dtype)
    lengths = torch.tensor([TK, 2, 0 if masking == "empty_row" else 1])
    mask = None if masking is None else torch.arange(TK)[None, :] < lengths[:, None]
    return q, k, v, mask


NAMES = ["bahdanau", "dot", "general", "concat"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("masking", [None, "padded", "empty_row"])
@pytest.mark.parametrize("n_q", [1, TQ])
def test_values_and_gradients_match_formula(name, masking, n_q):
    module = modules()[name]
    q, k, v, mask = inputs(module.key_size, n_q, masking=masking)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + list(module.parameters())
    context, weights = module(*leaves[:3], mask=mask)
    context_ref, weights_ref = formula(module, *leaves[:3], mask)
    torch.testing.assert_close(context, context_ref)
    torch.testing.assert_close(weights, weights_ref)
    grad_c, grad_w = torch.randn_like(context), torch.randn_like(weights)
    grads = torch.autograd.grad((context, weights), leaves, (grad_c, grad_w), allow_unused=True)
    grads_ref = torch.autograd.grad((context_ref, weights_ref), leaves, (grad_c, grad_w), allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("name", NAMES)
def test_one_step_query_is_the_multi_step_row(name):
    module = modules()[name]
    q, k, v, mask = inputs(module.key_size)
    context, weights = module(q, k, v, mask)
    context_1, weights_1 = module(q[:, 2], k, v, mask)
    assert context_1.shape == (B, DV) and weights_1.shape == (B, TK)
    torch.testing.assert_close(context_1, context[:, 2])
    torch.testing.assert_close(weights_1, weights[:, 2])


@pytest.mark.parametrize("name", NAMES)
def test_values_default_to_keys(name):
    module = modules()[name]
    q, k, _, mask = inputs(module.key_size)
    context, _ = module(q, k, mask=mask)
    torch.testing.assert_close(context, formula(module, q, k, k, mask)[0])


@pytest.mark.parametrize("name", NAMES)
def test_mask_weights_exactly_zero_and_padding_has_no_effect(name):
    module = modules()[name]
    q, k, v, mask = inputs(module.key_size, masking="empty_row")
    context, weights = module(q, k, v, mask)
    assert (weights.masked_select(~mask[:, None, :].expand_as(weights)) == 0).all()
    assert (weights[2] == 0).all() and (context[2] == 0).all()  # no real key: 0, not NaN
    torch.testing.assert_close(weights[:2].sum(-1), torch.ones(2, TQ, dtype=weights.dtype))
    # Changing what sits on padded positions changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[~mask], v2[~mask] = 1e3, -1e3
    context2, weights2 = module(q, k2, v2, mask)
    assert torch.equal(weights2, weights) and torch.equal(context2, context)


def test_float32_matches_float64():
    wides = modules()
    for name, module in modules(torch.float32).items():
        q, k, v, mask = inputs(module.key_size, dtype=torch.float32)
        wide = wides[name]
        wide.load_state_dict(module.state_dict())  # the same (float32) numbers in float64
        context, weights = module(q, k, v, mask)
        context64, weights64 = wide(q.double(), k.double(), v.double(), mask)
        torch.testing.assert_close(context, context64.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights, weights64.float(), atol=1e-5, rtol=1e-5)


def test_bahdanau_runs_the_additive_op(monkeypatch):
    """The additive scores come from attnkit.ops.additive_attention, not a copy of the formula."""
    import attnkit.nn.seq2seq_attention as mod

    calls = []
    real = mod.additive_attention
    monkeypatch.setattr(mod, "additive_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    for name in ("bahdanau", "concat"):
        module = modules()[name]
        q, k, v, mask = inputs(module.key_size)
        module(q, k, v, mask)
    assert calls == [{"return_weights": True, "projected_keys": None}] * 2


def test_parameters_and_state_dict_round_trip():
    mods = modules()
    assert sorted(dict(mods["bahdanau"].named_parameters())) == ["key_proj.weight", "query_proj.weight", "v"]
    assert sorted(dict(mods["concat"].named_parameters())) == ["key_proj.weight", "query_proj.weight", "v"]
    assert sorted(dict(mods["general"].named_parameters())) == ["proj.weight"]
    assert list(mods["dot"].parameters()) == []
    assert mods["general"].proj.weight.shape == (DQ, DK)
    for name, module in mods.items():
        torch.manual_seed(5)
        other = type(module)(**({"query_size": DQ, "key_size": module.key_size} |
                                ({} if name == "bahdanau" else {"score": module.score}) |
                                ({"attention_size": A} if name in ("bahdanau", "concat") else {})),
                             dtype=torch.float64)
        other.load_state_dict(module.state_dict())
        q, k, v, mask = inputs(module.key_size)
        assert torch.equal(other(q, k, v, mask)[0], module(q, k, v, mask)[0])


def test_bad_input_errors():
    bahdanau, general = modules()["bahdanau"], modules()["general"]
    q, k, v, mask = inputs(DK)
    with pytest.raises(ValueError, match="query has 4 features.*query_size=5"):
        bahdanau(q[..., :4], k, v, mask)
    with pytest.raises(ValueError, match="keys have 6 features.*key_size=7"):
        general(q, k[..., :6], v, mask)
    with pytest.raises(ValueError, match="mask must have shape \\(3, 6\\)"):
        bahdanau(q, k, v, mask[:, :5])
    with pytest.raises(ValueError, match="mask must have shape"):
        general(q, k, v, mask[None])
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        bahdanau(q, k, v, mask.float())
    with pytest.raises(ValueError, match="values must be"):
        bahdanau(q, k, v[:, :5], mask)
    with pytest.raises(ValueError, match="query has batch 2 but keys have batch 3"):
        general(q[:2], k, v, mask)
    with pytest.raises(ValueError, match="query must be"):
        general(q[0, 0], k, v, mask)
    with pytest.raises(ValueError, match="keys must be 3-D"):
        general(q, k[0], v, mask)
    with pytest.raises(TypeError, match="keys has dtype torch.float32 but query has torch.float64"):
        general(q, k.float(), v, mask)
    with pytest.raises(TypeError, match="proj.weight has dtype torch.float64 but query has torch.float32"):
        general(q.float(), k.float(), v.float(), mask)
    for module in (bahdanau, general, modules()["dot"]):
        with pytest.raises(ValueError, match=r"keys must hold at least one key \(Tk >= 1\)"):
            module(q[..., :module.query_size], k[:, :0, :module.key_size])
    with pytest.raises(ValueError, match="score='dot' needs query_size == key_size"):
        LuongAttention(5, 7, "dot")
    with pytest.raises(ValueError, match="score must be one of"):
        LuongAttention(5, 7, "bilinear")
    with pytest.raises(ValueError, match="attention_size is only used by score='concat'"):
        LuongAttention(5, 7, "general", attention_size=4)
    with pytest.raises(ValueError, match="attention_size must be a positive int"):
        BahdanauAttention(5, 7, 0)


def test_exported():
    assert attnkit.nn.BahdanauAttention is BahdanauAttention and attnkit.nn.LuongAttention is LuongAttention


@pytest.mark.parametrize("name", ["bahdanau", "dot", "general", "concat"])
def test_projected_keys_match_projecting_every_call(name):
    """Every score takes project_keys' output (LuongAttention's "dot"/"general" had no
    project_keys: AttributeError), with the same values and gradients as without it."""
    module = modules()[name]
    q, k, v, mask = inputs(DQ if name == "dot" else DK)
    k.requires_grad_(True)
    direct = module(q, k, v, mask)
    direct_grads = torch.autograd.grad(sum(t.sum() for t in direct), [k, *module.parameters()])
    cached = module(q, k, v, mask, projected_keys=module.project_keys(k))
    cached_grads = torch.autograd.grad(sum(t.sum() for t in cached), [k, *module.parameters()])
    torch.testing.assert_close(direct, cached, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(direct_grads, cached_grads, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["dot", "general"])
def test_projected_keys_of_the_wrong_shape_or_dtype(name):
    module = modules()[name]
    q, k, v, mask = inputs(DK if name == "general" else DQ)
    projected = module.project_keys(k)
    with pytest.raises(ValueError, match=r"projected_keys must have shape \(3, 6, 5\)"):
        module(q, k, v, mask, projected_keys=projected[:, :-1])
    with pytest.raises((TypeError, RuntimeError), match="projected_keys"):
        module(q, k, v, mask, projected_keys=projected.float())


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("cached_keys", [False, True])
def test_autocast_forward_and_backward_inside_it(backend, cached_keys):
    """Under CPU autocast: keys projected once (project_keys, in bfloat16) were refused for
    not matching the float32 keys; the cpp backward inside the autocast block read autocast's
    bfloat16 bmm as float32 ("expected scalar type Float"); the reference returned bfloat16."""
    torch.manual_seed(0)
    module = BahdanauAttention(DQ, DK, A)
    q, k, v = torch.randn(B, TQ, DQ), torch.randn(B, TK, DK, requires_grad=True), torch.randn(B, TK, DV)
    want, _ = module(q, k, v)
    with attnkit.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        projected = module.project_keys(k) if cached_keys else None
        context, weights = module(q, k, v, projected_keys=projected)
        (grad,) = torch.autograd.grad(context.sum(), k)
    assert context.dtype == weights.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(context, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("make", [lambda: attnkit.nn.BahdanauAttention(6, 5, 4),
                                  lambda: attnkit.nn.LuongAttention(6, 5, "concat", 4),
                                  lambda: attnkit.nn.LuongAttention(6, 5, "general")], ids=["bahdanau", "concat", "general"])
def test_reset_parameters_after_meta_construction_initializes_every_parameter(make):
    """to_empty() then reset_parameters() (the meta-device init flow): v had no reset and kept
    whatever memory to_empty gave it."""
    torch.manual_seed(0)
    built = make()
    with torch.device("meta"):
        module = make()
    module.to_empty(device="cpu")
    for parameter in module.parameters():
        parameter.data.fill_(float("nan"))
    torch.manual_seed(0)
    module.reset_parameters()
    for (name, got), want in zip(module.named_parameters(), built.parameters()):
        assert torch.isfinite(got).all(), name
        bound = 1.0 / got.shape[-1] ** 0.5
        assert got.abs().max() <= bound and got.std() > bound / 4, name
        assert got.shape == want.shape
