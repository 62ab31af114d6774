"""attnkit.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""
import pickle
import io

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.nn import MultiheadAttention

E, H, B, L, S = 16, 4, 2, 5, 7
ATOL = 2e-5


def pair(**kw):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, **kw)
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, **kw)
    return theirs, ours


def inputs(batch_first=False, kdim=E, vdim=E, batched=True, grad=True):
    gen = torch.Generator().manual_seed(1)

    def make(n, d):
        shape = ((B, n, d) if batch_first else (n, B, d)) if batched else (n, d)
        return torch.randn(shape, generator=gen).requires_grad_(grad)

    return make(L, E), make(S, kdim), make(S, vdim)


def check_same(theirs, ours, q, k, v, **call):
    """Forward outputs, weights and gradients (inputs and parameters) of both modules."""
    out_t, w_t = theirs(q, k, v, **call)
    grads_t = torch.autograd.grad(out_t.square().sum(), [q, k, v] + list(theirs.parameters()), allow_unused=True)
    out_o, w_o = ours(q, k, v, **call)
    grads_o = torch.autograd.grad(out_o.square().sum(), [q, k, v] + list(ours.parameters()), allow_unused=True)
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=ATOL)
    if w_t is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_t, atol=ATOL, rtol=ATOL)
    for g_o, g_t in zip(grads_o, grads_t):
        if g_t is None:
            assert g_o is None or not g_o.any()
        else:
            torch.testing.assert_close(g_o, g_t, atol=ATOL, rtol=ATOL)


CONFIGS = [dict(), dict(batch_first=True), dict(bias=False), dict(add_bias_kv=True), dict(add_zero_attn=True),
           dict(kdim=6, vdim=5), dict(kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True, batch_first=True)]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
def test_state_dict_and_parameters_are_torchs(kw):
    theirs, ours = pair(**kw)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key  # same initialisation under the same seed
    back = torch.nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(ours.state_dict())
    assert ours._qkv_same_embed_dim == theirs._qkv_same_embed_dim


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(kw) or "default")
@pytest.mark.parametrize("need_weights", [True, False])
def test_outputs_and_gradients(kw, need_weights):
    theirs, ours = pair(**kw)
    q, k, v = inputs(kw.get("batch_first", False), kw.get("kdim", E), kw.get("vdim", E))
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    check_same(theirs, ours, q, k, v, key_padding_mask=pad, need_weights=need_weights)


def test_self_attention_unbatched_and_per_head_weights():
    theirs, ours = pair()
    x = torch.randn(L, E, requires_grad=True)
    check_same(theirs, ours, x, x, x, average_attn_weights=False)
    x = torch.randn(L, B, E, requires_grad=True)
    check_same(theirs, ours, x, x, x)
    q, k, _ = inputs()
    check_same(theirs, ours, q, k, k, need_weights=False)  # key is value: the packed k/v projection


def _masks(kind, dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    shape = (L, S) if kind == "2d" else (B * H, L, S)
    blocked = torch.rand(shape, generator=gen) < 0.3
    blocked[..., 0] = False  # every row keeps a key: torch gives NaN for empty rows, attnkit 0
    return blocked, torch.randn(shape, generator=gen).masked_fill(blocked, float("-inf")).to(dtype)


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("mask_type", ["bool", "float"])
@pytest.mark.parametrize("pad_type", [None, "bool", "float"])
def test_masks(kind, mask_type, pad_type):
    theirs, ours = pair(batch_first=True)
    q, k, v = inputs(batch_first=True)
    blocked, additive = _masks(kind)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 3:] = True
    if pad_type == "float":
        pad = torch.zeros(B, S).masked_fill(pad, float("-inf"))
    mask = blocked if mask_type == "bool" else additive
    with pytest.warns() if pad_type and pad_type != mask_type else _no_warning():
        check_same(theirs, ours, q, k, v, attn_mask=mask, key_padding_mask=None if pad_type is None else pad)


@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("padded", [False, True])
def test_learned_float_mask_gets_torchs_gradient(kind, padded):
    """A float attn_mask that requires grad (a learned bias) through the kernel path."""
    theirs, ours = pair(batch_first=True)
    q, k, v = inputs(batch_first=True)
    bias = _masks(kind)[1].clamp(min=-3.0)  # finite: a bias, not a pattern
    pad = None
    if padded:  # float, as the mask (mixed types only warn)
        pad = torch.zeros(B, S)
        pad[1, 4:] = float("-inf")
    grads = []
    for module in (theirs, ours):
        leaf = bias.clone().requires_grad_(True)
        out, _ = module(q, k, v, attn_mask=leaf, key_padding_mask=pad, need_weights=False)
        grads.append(torch.autograd.grad(out.square().sum(), leaf)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=ATOL)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_top_left(need_weights):
    theirs, ours = pair()
    q, k, v = inputs()
    causal = torch.triu(torch.full((L, S), float("-inf")), diagonal=1)
    check_same(theirs, ours, q, k, v, attn_mask=causal, is_causal=True, need_weights=need_weights)
    out, _ = ours(q, k, v, is_causal=True, need_weights=False)  # no mask needed here (torch requires one)
    torch.testing.assert_close(out, ours(q, k, v, attn_mask=causal, need_weights=False)[0], atol=ATOL, rtol=ATOL)



@pytest.mark.parametrize("kw", [dict(add_bias_kv=True), dict(add_zero_attn=True),
                                dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=5)],
                         ids=lambda kw: ",".join(kw))
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("mask_type", ["bool", "float"])
def test_is_causal_with_extra_keys(kw, need_weights, padded, mask_type):
    """torch reads attn_mask, padded so that every query sees the extra key(s), when it needs weights or
    has a key_padding_mask; otherwise (its SDPA path) the causal flag spans all keys, hiding them."""
    theirs, ours = pair(**kw)
    q, k, v = inputs(kdim=kw.get("kdim", E), vdim=kw.get("vdim", E))
    blocked = torch.ones(L, S, dtype=torch.bool).triu(1)
    mask = blocked if mask_type == "bool" else torch.zeros(L, S).masked_fill(blocked, float("-inf"))
    pad = None
    if padded:
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 3:] = True
        if mask_type == "float":
            pad = torch.zeros(B, S).masked_fill(pad, float("-inf"))
    call = dict(attn_mask=mask, key_padding_mask=pad, need_weights=need_weights, average_attn_weights=False)
    check_same(theirs, ours, q, k, v, is_causal=True, **call)
    # Without attn_mask (torch requires one), as with the causal mask it stands for.
    out, weights = ours(q, k, v, is_causal=True, **dict(call, attn_mask=None))
    expected, expected_weights = ours(q, k, v, is_causal=True, **call)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(weights, expected_weights, atol=ATOL, rtol=ATOL)


def test_is_causal_with_extra_keys_float64():
    theirs, ours = pair(add_bias_kv=True, add_zero_attn=True)
    theirs.double(), ours.double()
    q, k, v = (x.detach().double().requires_grad_() for x in inputs())
    mask = torch.ones(L, S, dtype=torch.bool).triu(1)
    check_same(theirs, ours, q, k, v, attn_mask=mask, is_causal=True)


def test_fully_masked_row_is_zero_not_nan():
    _, ours = pair()
    q, k, v = inputs()
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[2] = True
    out, weights = ours(q, k, v, attn_mask=mask, average_attn_weights=False)
    assert not out.isnan().any() and not weights.isnan().any()
    assert (weights[:, :, 2] == 0).all()
    out.sum().backward()
    assert not q.grad.isnan().any()


@pytest.mark.parametrize("call, error", [
    (dict(attn_mask=torch.zeros(L, S + 1, dtype=torch.bool)), RuntimeError),
    (dict(attn_mask=torch.zeros(B, L, S, dtype=torch.bool)), RuntimeError),     # (B, L, S) is not (B * H, L, S)
    (dict(attn_mask=torch.zeros(1, 1, L, S)), AssertionError),
    (dict(attn_mask=torch.zeros(L, S, dtype=torch.int64)), AssertionError),
    (dict(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool)), AssertionError),
    (dict(key_padding_mask=torch.zeros(1, S, dtype=torch.bool)), AssertionError),  # no broadcast over the batch
    (dict(key_padding_mask=torch.zeros(B, S, dtype=torch.int32)), AssertionError),
])
def test_bad_masks_raise_like_torch(call, error):
    theirs, ours = pair()
    q, k, v = inputs(grad=False)
    with pytest.raises(error):
        theirs(q, k, v, **call)
    with pytest.raises(error):
        ours(q, k, v, **call)


def test_bad_shapes_raise_like_torch():
    theirs, ours = pair()
    q, k, v = inputs(grad=False)
    for args in [(q, k[:, :1], v), (q[..., :8], k, v), (q, k[0], v[0]), (q[None], k, v)]:
        with pytest.raises(AssertionError):
            theirs(*args)
        with pytest.raises(AssertionError):
            ours(*args)



@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=5)], ids=["packed", "kdim_vdim"])
def test_key_and_value_widths_are_checked_up_front(kw):
    """A clear error naming the argument, not the projection's matmul shape error."""
    _, ours = pair(**kw)
    kdim, vdim = kw.get("kdim", E), kw.get("vdim", E)
    q, k, v = inputs(kdim=kdim, vdim=vdim, grad=False)
    with pytest.raises(RuntimeError, match=f"key with last dimension kdim={kdim}, but got {kdim - 1}"):
        ours(q, k[..., 1:], v if kw else v[..., 1:])  # packed: key and value of one shape
    if kw:
        with pytest.raises(RuntimeError, match=f"value with last dimension vdim={vdim}, but got {vdim - 1}"):
            ours(q, k, v[..., 1:])
        # torch raises AssertionError with separate projection weights: caught as such too
        with pytest.raises(AssertionError, match="value with last dimension"):
            ours(q, k, v[..., 1:])
    with pytest.raises(AssertionError, match=f"embedding dimension of {E}, but got {E - 1}"):  # as torch
        ours(q[..., 1:], k, v)


def test_dropout_in_training_weights_match_output():
    _, ours = pair(dropout=0.5)
    q, k, v = inputs(grad=False)
    torch.manual_seed(3)
    out, weights = ours(q, k, v, average_attn_weights=False)
    assert (weights == 0).any()
    ours.eval()
    assert (ours(q, k, v)[1] > 0).all()
    out_nw, none = ours.train()(q, k, v, need_weights=False)
    assert none is None and out_nw.shape == out.shape


def _expanded_torch(ours, groups):
    """torch.nn.MultiheadAttention computing `ours` (GQA) with K/V weights repeated per head."""
    theirs = torch.nn.MultiheadAttention(E, H, kdim=E + 1, vdim=E + 1, batch_first=True)  # separate q/k/v weights
    theirs.kdim = theirs.vdim = E
    rep = lambda w: w.view(ours.num_kv_heads, -1, *w.shape[1:]).repeat_interleave(groups, 0).reshape(E, *w.shape[1:])  # noqa: E731
    b_q, b_k, b_v = ours.in_proj_bias.split([E, E // groups, E // groups])
    with torch.no_grad():
        theirs.q_proj_weight = torch.nn.Parameter(ours.q_proj_weight.clone())
        theirs.k_proj_weight = torch.nn.Parameter(rep(ours.k_proj_weight))
        theirs.v_proj_weight = torch.nn.Parameter(rep(ours.v_proj_weight))
        theirs.in_proj_bias.copy_(torch.cat([b_q, rep(b_k), rep(b_v)]))
        theirs.out_proj.load_state_dict(ours.out_proj.state_dict())
    return theirs


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_repeated_heads(num_kv_heads):
    ours = MultiheadAttention(E, H, num_kv_heads=num_kv_heads, batch_first=True)
    kv = E // H * num_kv_heads
    assert ours.k_proj_weight.shape == (kv, E) and ours.in_proj_bias.shape == (E + 2 * kv,)
    assert ours.in_proj_weight is None and not ours._qkv_same_embed_dim
    theirs = _expanded_torch(ours, H // num_kv_heads)
    q, k, v = inputs(batch_first=True, grad=False)
    out_t, w_t = theirs(q, k, v)
    out_o, w_o = ours(q, k, v)
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(w_o, w_t, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadAttention(E, H, num_kv_heads=3)


def test_window_and_alibi_match_explicit_masks():
    ours = MultiheadAttention(E, H, window_size=(2, 1), alibi=True)
    theirs = torch.nn.MultiheadAttention(E, H)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    q, k, v = inputs()
    rel = torch.arange(S)[None, :] - torch.arange(L)[:, None]
    slopes = attnkit.nn.alibi_slopes(H)
    bias = -slopes[:, None, None] * rel.abs() + torch.zeros(L, S).masked_fill((rel < -2) | (rel > 1), float("-inf"))
    out_o, w_o = ours(q, k, v, average_attn_weights=False)
    out_t, w_t = theirs(q, k, v, attn_mask=bias.repeat(B, 1, 1), average_attn_weights=False)
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(w_o, w_t, atol=ATOL, rtol=ATOL)


def test_rotary_matches_explicit_rope():
    ours = MultiheadAttention(E, H, rotary=True, batch_first=True)
    q_in, k_in, v_in = inputs(batch_first=True, grad=False)
    out, weights = ours(q_in, k_in, v_in, average_attn_weights=False)
    # Explicit: project, rotate with the reference RoPE at positions 0.., then softmax attention.
    w_q, w_k, w_v = ours.in_proj_weight.chunk(3)
    b_q, b_k, b_v = ours.in_proj_bias.chunk(3)
    heads = lambda x: x.view(B, -1, H, E // H).transpose(1, 2)  # noqa: E731
    cos, sin = ours.rotary.cos_sin(S)
    rope = attnkit.reference.attention.rotate
    q = rope(heads(F.linear(q_in, w_q, b_q)), cos, sin, torch.arange(L))
    k = rope(heads(F.linear(k_in, w_k, b_k)), cos, sin, torch.arange(S))
    p = torch.softmax(q @ k.transpose(-1, -2) / (E // H) ** 0.5, -1)
    expected = ours.out_proj(((p @ heads(F.linear(v_in, w_v, b_v))).transpose(1, 2).reshape(B, L, E)))
    torch.testing.assert_close(weights, p, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=ATOL)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention(E, H, rotary=True, add_bias_kv=True)


def test_from_torch_shares_parameters_and_pickles():
    theirs = torch.nn.MultiheadAttention(E, H)
    ours = MultiheadAttention.from_torch(theirs)
    assert ours.in_proj_weight is theirs.in_proj_weight and ours.out_proj is theirs.out_proj
    assert type(theirs) is torch.nn.MultiheadAttention  # the original is untouched
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    q, k, v = inputs(grad=False)
    torch.testing.assert_close(loaded(q, k, v)[0], theirs(q, k, v)[0], atol=ATOL, rtol=ATOL)
    assert pickle.loads(pickle.dumps(ours)).num_kv_heads == H


def test_kernel_runs_the_attention():
    _, ours = pair()
    q, k, v = inputs(grad=False)
    ours(q, k, v, need_weights=False)
    assert attnkit.last_dispatch("flash_attention") is not None


def test_head_dim_beyond_the_kernel_runs_the_explicit_path():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(260, 1)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(3, 2, 260, requires_grad=True)
    check_same(theirs, ours, x, x, x, need_weights=False)


def test_dynamic_ntk_rotary_weights_use_the_kernels_table_for_cross_attention():
    """Dynamic NTK scales its table by the sequence length: the returned weights rotated q by
    the query length's table and k by the key length's, the kernel both by the longer one."""
    torch.manual_seed(0)
    rotary = attnkit.nn.RotaryEmbedding(8, scaling="dynamic_ntk", scaling_factor=4.0, max_position_embeddings=4)
    m = MultiheadAttention(16, 2, rotary=rotary, batch_first=True, dtype=torch.float64)
    q, kv = torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(1, 11, 16, dtype=torch.float64)
    out, weights = m(q, kv, kv, average_attn_weights=False)
    v = F.linear(kv, m.in_proj_weight[32:], m.in_proj_bias[32:]).view(1, 11, 2, 8).transpose(1, 2)
    recombined = m.out_proj((weights @ v).transpose(1, 2).reshape(1, 3, 16))
    torch.testing.assert_close(recombined, out)


@pytest.mark.parametrize("extra", ["alibi", "rotary"])
def test_computed_buffers_survive_meta_construction(extra):
    """to_empty leaves non-persistent buffers uninitialized and no state_dict refills them."""
    torch.manual_seed(0)
    reference = MultiheadAttention(16, 4, batch_first=True, **{extra: True})
    with torch.device("meta"):
        m = MultiheadAttention(16, 4, batch_first=True, **{extra: True})
    m.to_empty(device="cpu")
    m.load_state_dict(reference.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(m(x, x, x)[0], reference(x, x, x)[0])


def test_from_torch_refuses_a_parametrized_module():
    module = torch.nn.MultiheadAttention(8, 2)
    torch.nn.utils.parametrizations.weight_norm(module, "in_proj_weight")
    with pytest.raises(TypeError, match="from_torch: the module has parametrizations"):
        MultiheadAttention.from_torch(module)


@pytest.mark.parametrize("need_weights", [False, True])
def test_autocast_with_bias_kv_and_float_masks_as_torch(need_weights):
    """Under CPU autocast: add_bias_kv concatenated the float32 bias to bfloat16 keys (cat
    promotes), and the kernel refused the mixed dtypes; a float mask made the returned
    weights float32 (torch: bfloat16)."""
    theirs, ours = pair(add_bias_kv=True)
    q, k, v = inputs(grad=False)
    mask = torch.randn(L, S)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, w_t = theirs(q, k, v, attn_mask=mask, need_weights=need_weights)
        out_o, w_o = ours(q, k, v, attn_mask=mask, need_weights=need_weights)
    assert out_o.dtype == out_t.dtype == torch.bfloat16
    torch.testing.assert_close(out_o, out_t, atol=3e-2, rtol=3e-2)
    if need_weights:
        assert w_o.dtype == w_t.dtype == torch.bfloat16
        torch.testing.assert_close(w_o, w_t, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_one_drops_everything_as_torch(need_weights):
    """dropout=1.0 in training raised ("dropout_p must be in [0, 1)"), torch returns the output
    projection's bias alone; so do the Transformer layers built on it."""
    theirs, ours = pair(dropout=1.0)
    q, k, v = inputs()
    out_t = theirs(q, k, v, need_weights=need_weights)[0]
    out_o = ours(q, k, v, need_weights=need_weights)[0]
    torch.testing.assert_close(out_o, out_t)
    torch.testing.assert_close(out_o, ours.out_proj.bias.expand_as(out_o))
    (grad,) = torch.autograd.grad(out_o.sum(), q)
    assert not grad.any()
    layer = attnkit.nn.TransformerEncoderLayer(E, H, 32, dropout=1.0)
    assert layer(q.detach()).shape == q.shape


@pytest.mark.parametrize("extra", [dict(alibi=True), dict(rotary=True)])
def test_meta_construction_then_load_with_assign_refills_computed_buffers(extra):
    """load_state_dict(assign=True) after construction on meta (the fast-loading flow) left the
    computed, unsaved buffers (ALiBi slopes, rotary inv_freq) on meta: forward then raised."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 16)
    loaded = attnkit.nn.MultiheadAttention(16, 4, **extra).eval()
    with torch.device("meta"):
        module = attnkit.nn.MultiheadAttention(16, 4, **extra)
    module.load_state_dict(loaded.state_dict(), assign=True)
    module.eval()
    for got, want in zip(module(x, x, x), loaded(x, x, x)):
        torch.testing.assert_close(got, want)

    with torch.device("meta"):
        rotary = attnkit.nn.RotaryEmbedding(8)
    rotary.load_state_dict({}, assign=True)
    q = torch.randn(1, 5, 2, 8)
    torch.testing.assert_close(rotary(q)[0], attnkit.nn.RotaryEmbedding(8)(q)[0])


def test_training_saves_no_more_than_torch_multihead_attention():
    """The attention output was saved twice (by the op, and copied by the reshape before the
    output projection, which saved the copy): 17% more saved memory than torch's."""
    def saved_bytes(module, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x, x, x, need_weights=False)
        return sum(storages.values())

    torch.manual_seed(0)
    x = torch.randn(2, 64, 32, requires_grad=True)
    ours = saved_bytes(attnkit.nn.MultiheadAttention(32, 4, batch_first=True), x)
    assert ours <= saved_bytes(torch.nn.MultiheadAttention(32, 4, batch_first=True), x)


def test_help_shows_the_differences_from_torch():
    assert "Differences from torch.nn.MultiheadAttention" in attnkit.nn.MultiheadAttention.__doc__  # not torch's own
