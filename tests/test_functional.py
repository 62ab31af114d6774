"""attnkit.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention
on the shapes SDPA takes: inputs of any rank from 2, leading dims and heads broadcast,
GQA along dim -3, masks broadcast to the scores, dropout_p=1; values and gradients."""
import pytest
import torch
import torch.nn.functional as F

import attnkit

# (query shape, key shape, value shape, mask shape or None, enable_gqa)
SHAPES = [
    ((5, 8), (7, 8), (7, 6), None, False),  # 2-D
    ((5, 8), (7, 8), (7, 8), (5, 7), False),
    ((4, 5, 8), (2, 7, 8), (2, 7, 8), None, True),  # 3-D GQA: dim -3 is the heads
    ((3, 5, 8), (3, 7, 8), (3, 7, 8), (3, 5, 7), False),
    ((2, 3, 4, 5, 8), (2, 3, 4, 7, 8), (2, 3, 4, 7, 8), (3, 1, 5, 7), False),  # 5-D
    ((2, 3, 4, 5, 8), (3, 2, 7, 8), (3, 2, 7, 8), (5, 7), True),  # 5-D query, 4-D GQA key/value
    ((2, 4, 5, 8), (1, 4, 7, 8), (1, 4, 7, 8), None, False),  # key/value batch broadcast
    ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), (2, 1, 1, 7), False),  # one key/value head, no GQA: broadcast
    ((2, 1, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), None, False),  # one query head broadcast over three
    ((2, 4, 5, 8), (4, 7, 8), (4, 7, 8), None, False),  # mixed ranks
    ((2, 4, 5, 8), (2, 2, 7, 8), (2, 1, 7, 8), None, True),  # GQA with different key and value heads
]


def _randn(shape, gen, requires_grad=True):
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


# SDPA takes is_causal or a mask, not both: the causal variant of each case without a mask.
CASES = [(*shapes, False) for shapes in SHAPES] + [(*shapes, True) for shapes in SHAPES if shapes[3] is None]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("q_shape,k_shape,v_shape,mask_shape,gqa,causal", CASES, ids=lambda x: str(x))
def test_shapes_broadcast_as_sdpa(backend, q_shape, k_shape, v_shape, mask_shape, gqa, causal):
    gen = torch.Generator().manual_seed(sum(q_shape) * 7 + sum(k_shape))
    q, k, v = _randn(q_shape, gen), _randn(k_shape, gen), _randn(v_shape, gen)
    mask = None if mask_shape is None else _randn(mask_shape, gen)
    kwargs = dict(attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=0.3)
    with attnkit.use_backend(backend, op="flash_attention"):
        out = attnkit.scaled_dot_product_attention(q, k, v, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    leaves = [t for t in (q, k, v, mask) if t is not None]
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for g, g_e in zip(grads, expected_grads):
        assert g.shape == g_e.shape
        torch.testing.assert_close(g, g_e, rtol=1e-8, atol=1e-8)


def test_dropout_of_one_gives_zeros_and_zero_gradients():
    q, k, v = (torch.randn(2, 3, 4, 8, requires_grad=True) for _ in range(3))
    out = attnkit.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros(2, 3, 4, 8))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, dropout_p=1.0), out)  # what SDPA gives


def test_a_key_shared_by_the_batch_is_passed_as_a_view():
    """A key shared by the batch (batch 1, expanded) is passed as a view, not repeated in memory."""
    q = torch.randn(4, 2, 5, 8)
    k = torch.randn(1, 2, 7, 8)
    seen = {}
    real = attnkit.functional.flash_attention

    def spy(q, k, v, **kwargs):
        seen["stride"] = k.stride(0)
        return real(q, k, v, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attnkit.functional, "flash_attention", spy)
        attnkit.scaled_dot_product_attention(q, k, k)
    assert seen["stride"] == 0


@pytest.mark.parametrize("mask", [None, "float", "bool"])
def test_autocast_computes_in_its_dtype_as_sdpa(mask):
    """SDPA is on autocast's lower-precision list: inside an autocast region its inputs (a float
    mask too) are cast to the autocast dtype and so is the output; float64 is left alone."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
    attn_mask = {None: None, "float": torch.randn(9, 9), "bool": torch.rand(9, 9) > 0.3}[mask]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        assert attnkit.scaled_dot_product_attention(q.double(), k.double(), v.double()).dtype == torch.float64
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=4e-2, rtol=4e-2)
    weights = torch.randn(out.shape)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected.float() * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("shapes", [((2, 3, 5, 0), (2, 3, 7, 0), (2, 3, 7, 4)), ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 0)),
                                    ((2, 0, 5, 8), (2, 0, 7, 8), (2, 0, 7, 8))], ids=["E=0", "Ev=0", "H=0"])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_head_dims_and_heads_as_sdpa(shapes, causal):
    """SDPA takes zero heads and empty head dims (E = 0: every score 0, rows of v averaged);
    the drop-in raised a ValueError for them."""
    gen = torch.Generator().manual_seed(0)
    inputs = [_randn(shape, gen) for shape in shapes]
    got = attnkit.scaled_dot_product_attention(*inputs, is_causal=causal)
    want = F.scaled_dot_product_attention(*inputs, is_causal=causal)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(want.sum(), inputs)):
        torch.testing.assert_close(g, w)


_REAL_SCALARS = {
    "scale-np.float32": ("scale", lambda np: np.float32(0.3)),
    "scale-np.int64": ("scale", lambda np: np.int64(1)),
    "scale-tensor": ("scale", lambda np: torch.tensor(0.3)),
    "dropout_p-np.float32(0)": ("dropout_p", lambda np: np.float32(0)),
    "dropout_p-np.float32(1)": ("dropout_p", lambda np: np.float32(1)),
}


@pytest.mark.parametrize("case", list(_REAL_SCALARS))
def test_scalars_of_any_real_type_as_sdpa(case):
    """numpy scalars and one-element tensors: SDPA takes them, the drop-in raised TypeError."""
    np = pytest.importorskip("numpy")
    name, make = _REAL_SCALARS[case]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn((1, 2, 5, 8), gen, requires_grad=False) for _ in range(3))
    got = attnkit.scaled_dot_product_attention(q, k, v, **{name: make(np)})
    want = F.scaled_dot_product_attention(q, k, v, **{name: make(np)})
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("flag", ["is_causal", "enable_gqa"])
def test_flags_must_be_bool_as_sdpa(flag):
    """SDPA refuses an int for its bool flags; the drop-in took enable_gqa=1 as True."""
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(TypeError, match=flag.replace("is_causal", "causal")):
        attnkit.scaled_dot_product_attention(q, q, q, **{flag: 1})
    with pytest.raises(TypeError):
        F.scaled_dot_product_attention(q, q, q, **{flag: 1})


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_output_takes_the_query_layout_as_sdpa(layout):
    """q a transposed view of (B, N, H, D) (MultiheadAttention, HF models): the output has that
    layout too, as SDPA's, so that out.transpose(1, 2).reshape(B, N, H * D) copies nothing."""
    torch.manual_seed(0)
    shape = (2, 3, 7, 8) if layout == "bhnd" else (2, 7, 3, 8)
    q, k, v = (torch.randn(shape) for _ in range(3))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    got = attnkit.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_a_float_mask_of_another_dtype_than_query_is_refused_as_sdpa(mask_dtype):
    q = torch.randn(1, 2, 3, 8)
    mask = torch.zeros(3, 3, dtype=mask_dtype)
    with pytest.raises(RuntimeError, match="dtype"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with pytest.raises(RuntimeError, match="a float attn_mask must have query's dtype torch.float32"):
        attnkit.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both but a float64 mask, as SDPA's
        if mask_dtype == torch.float64:
            with pytest.raises(RuntimeError, match="dtype"):
                attnkit.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        else:
            assert attnkit.scaled_dot_product_attention(q, q, q, attn_mask=mask).dtype == torch.bfloat16
            assert F.scaled_dot_product_attention(q, q, q, attn_mask=mask).dtype == torch.bfloat16


def test_broadcast_shapes_as_torch():
    """_validate.broadcast_shapes (plain Python for int sizes) against torch.broadcast_shapes,
    zero sizes included, and torch's own for traced sizes."""
    from attnkit._validate import broadcast_shapes

    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        count = int(torch.randint(1, 4, (), generator=gen))
        shapes = [torch.Size(torch.randint(0, 4, (int(torch.randint(0, 5, (), generator=gen)),), generator=gen).tolist())
                  for _ in range(count)]
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            with pytest.raises(RuntimeError):
                broadcast_shapes(*shapes)
        else:
            assert broadcast_shapes(*shapes) == expected, shapes
    traced = torch.jit.trace(lambda x: x.new_zeros(broadcast_shapes(x.shape, (3, 1))), torch.zeros(1, 2))
    assert traced(torch.zeros(1, 5)).shape == (3, 5)  # sizes as tensors while tracing: torch's, not frozen
