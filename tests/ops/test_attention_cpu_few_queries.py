"""The cpp flash attention's few-query forward: calls with one or two queries (up to 8
bottom-right causal ones against long keys), masks and key padding included, run the
decoding kernel (csrc/cpu/attention_decode.cpp) instead of the tiles, and the tiled backward
on its out and lse. Values and gradients against the float64 reference, for calls that take
that route and neighbours that must not; packed (varlen) calls whose sequences each have the
same few queries too."""
import pytest
import torch
from attention_cases import Features, Shape, assert_close, check_backend_matches_ground_truth, make_inputs
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced

import attnkit.backends.attention as attention_backends
from attnkit import _extensions
from attnkit.ops import flash_attention, flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"

# (shape, features, extra flash_attention kwargs, routed)
CASES = [
    (Shape(1, 1, 1, 1, 1, 16, 16), Features(), {}, True),
    (Shape(2, 4, 4, 1, 37, 64, 64), Features(), {}, True),
    (Shape(2, 6, 2, 1, 301, 80, 48), Features(softcap=3.0, alibi="batch"), {}, True),  # GQA 3, Dv != D
    (Shape(1, 4, 1, 1, 90, 72, 72), Features(window=(20, 7), alibi="heads"), {}, True),  # MQA; right side moot
    (Shape(2, 2, 2, 2, 33, 32, 32), Features(causal=True, window=(5, -1)), {}, True),
    (Shape(2, 4, 2, 2, 1, 16, 16), Features(causal=True), {}, True),  # the first query sees no key
    (Shape(2, 2, 1, 1, 0, 16, 16), Features(), {}, True),  # no keys: output 0, lse -inf
    (Shape(1, 4, 2, 5, 2600, 64, 64), Features(causal=True, softcap=2.0), {}, True),  # Nk >= 512 Nq
    (Shape(1, 2, 2, 8, 4096, 32, 24), Features(causal=True, alibi="heads"), {}, True),
    # top-left alignment: one query sees the keys only when nothing places it at position 0
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(), dict(causal_alignment="top_left"), True),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(causal=True), dict(causal_alignment="top_left"), False),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(alibi="heads"), dict(causal_alignment="top_left"), False),
    (Shape(2, 2, 2, 2, 40, 16, 16), Features(), {}, False),  # two queries, not causal
    (Shape(2, 2, 2, 2, 40, 16, 16), Features(window=(-1, 3)), {}, False),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(window=(-1, 3)), dict(causal_alignment="top_left"), False),
    (Shape(1, 2, 2, 5, 2000, 32, 32), Features(causal=True), {}, False),  # Nk < 512 Nq
    # masks and key padding go along
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(padding=True), {}, True),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(mask="bool"), {}, True),
    (Shape(2, 4, 2, 1, 300, 64, 32), Features(mask="bool", padding=True, softcap=2.0, alibi="heads"), {}, True),
    (Shape(3, 2, 1, 2, 29, 16, 16), Features(padding=True, pad_whole_sequence=True, causal=True), {}, True),
    (Shape(1, 3, 3, 2, 18, 16, 16), Features(mask="bool-2d", causal=True), {}, True),
    (Shape(2, 2, 2, 4, 2100, 32, 32), Features(causal=True, mask="bool", padding=True, window=(700, -1)), {}, True),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(mask="float"), {}, True),
    (Shape(2, 4, 2, 2, 50, 32, 32), Features(mask="float", padding=True, causal=True, alibi="batch", softcap=3.0), {},
     True),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(rotary="half"), {}, False),
]


@pytest.fixture
def routes(monkeypatch):
    seen = []
    decide = attention_backends._decode_kernel_suits

    def recording(call):
        seen.append(decide(call))
        return seen[-1]

    monkeypatch.setattr(attention_backends, "_decode_kernel_suits", recording)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,features,extra,routed", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}") for c in CASES])
def test_matches_reference(shape, features, extra, routed, dtype, routes):
    with forced(OP, "cpp", "cpu", dtype, rotary=bool(features.rotary)):
        q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu")
        check_backend_matches_ground_truth(q, k, v, dict(kwargs, **extra), dtype, "cpp")
    assert routes == [routed]


def test_heads_inside_rows_layout_and_float16(routes):
    """q as the (B, N, H, D) view MultiheadAttention and HF models pass, float16."""
    with forced(OP, "cpp", "cpu", torch.float16):
        q, k, v, kwargs = make_inputs(Shape(2, 3, 3, 2, 40, 32, 32), Features(causal=True), torch.float16, "cpu")
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        check_backend_matches_ground_truth(q, k, v, kwargs, torch.float16, "cpp")
    assert routes == [True]


def test_float64_takes_the_tiles(routes):
    with forced(OP, "cpp", "cpu", torch.float64):
        q, k, v, kwargs = make_inputs(Shape(1, 2, 2, 1, 40, 16, 16), Features(), torch.float64, "cpu")
        check_backend_matches_ground_truth(q, k, v, kwargs, torch.float64, "cpp")
    assert routes == [False]


def test_a_fully_masked_row_gives_zero_and_zero_gradient(routes):
    """A boolean mask that hides every key of one query: out 0, lse -inf, gradient 0, as the tiles."""
    with forced(OP, "cpp", "cpu"):
        q, k, v, kwargs = make_inputs(Shape(2, 2, 2, 1, 33, 16, 16), Features(), torch.float32, "cpu")
        mask = torch.ones(2, 1, 1, 33, dtype=torch.bool)
        mask[1] = False
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out, lse = flash_attention(*leaves, attn_mask=mask, return_lse=True)
        out.sum().backward()
    assert routes == [True]
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_float_mask_of_another_dtype(dtype, routes):
    """A float64 additive mask on float32/bfloat16 inputs, one row hidden by -inf: added in
    float32 after the bias, as the reference adds it."""
    with forced(OP, "cpp", "cpu", dtype):
        q, k, v, kwargs = make_inputs(Shape(2, 3, 1, 2, 45, 24, 24), Features(causal=True), dtype, "cpu")
        mask = torch.randn(2, 1, 2, 45, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        mask[1, :, 0] = float("-inf")
        check_backend_matches_ground_truth(q, k, v, dict(kwargs, attn_mask=mask), dtype, "cpp")
    assert routes == [True]


@pytest.mark.parametrize("bad", ["mask shape", "mask dtype", "padding shape"])
def test_decode_entry_point_checks_its_masks(bad):
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    q, k = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 9, 16)
    lengths = torch.full((2,), 9, dtype=torch.int32)
    mask = torch.ones(2, 2, 1, 9, dtype=torch.bool)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    if bad == "mask shape":
        mask = mask[..., :8]
    elif bad == "mask dtype":
        mask = mask.int()
    else:
        padding = padding[:, :8]
    with pytest.raises(RuntimeError, match="attn_mask" if bad.startswith("mask") else "key_padding_mask"):
        ext.attention_decode_forward(q, k, k, lengths, 0.25, 0.0, -1, None, mask, padding)


# (queries per sequence, key lengths, heads, kv heads, D, Dv, flash_attention_varlen kwargs, routed)
VARLEN_CASES = [
    ([1, 1, 1], [7, 300, 1], 4, 2, 64, 64, {}, True),
    ([1, 1], [0, 33], 2, 2, 16, 16, {}, True),  # a sequence without keys: output 0, lse -inf
    ([1, 1, 1, 1], [40, 3, 129, 64], 6, 2, 80, 48, dict(softcap=2.0, alibi=True), True),
    ([1, 1], [90, 17], 4, 1, 32, 32, dict(causal=True, window_size=(20, 0)), True),
    ([1], [300], 4, 1, 32, 32, {}, True),  # one sequence, MQA: its rows split over the threads
    ([2, 2, 2], [1, 40, 65], 4, 2, 32, 32, dict(causal=True), True),  # the 1-key sequence's first query sees none
    ([2, 2], [30, 41], 2, 2, 16, 16, {}, False),  # two queries, not causal
    ([1, 2, 1], [30, 41, 9], 2, 2, 16, 16, dict(causal=True), False),  # uneven queries
    ([1, 1], [20, 25], 2, 2, 16, 16, dict(dropout_p=0.1), False),
]


def _packed(lengths_q, lengths_k, heads, heads_kv, dim, dim_v, dtype, gen):
    def cu(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)

    q = torch.randn(sum(lengths_q), heads, dim, generator=gen).to(dtype)
    k = torch.randn(sum(lengths_k), heads_kv, dim, generator=gen).to(dtype)
    v = torch.randn(sum(lengths_k), heads_kv, dim_v, generator=gen).to(dtype)
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[f"{c[0]}-{c[1]}-{c[6]}" for c in VARLEN_CASES])
def test_varlen_matches_reference(case, dtype, routes):
    """Out, lse and gradients of packed sequences against the float64 reference per sequence."""
    lengths_q, lengths_k, heads, heads_kv, dim, dim_v, kwargs, routed = case
    gen = torch.Generator().manual_seed(len(lengths_k) + dim)
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, heads, heads_kv, dim, dim_v, dtype, gen)
    kwargs = dict(kwargs)
    slopes = torch.rand(len(lengths_q), heads, generator=gen) if kwargs.pop("alibi", False) else None
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn(q.shape[0], heads, dim_v, generator=gen).to(dtype)
    with forced(OP, "cpp", "cpu", dtype):
        out, lse = flash_attention_varlen(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), alibi_slopes=slopes,
                                          return_lse=True, generator=torch.Generator().manual_seed(0), **kwargs)
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert routes == [routed]
    if kwargs.get("dropout_p"):
        return  # the route's refusal is the point; dropout's values are test_attention_cpu's
    left, right = kwargs.get("window_size", (-1, -1))
    window = (left, 0 if kwargs.get("causal") else right)
    for b in range(len(lengths_q)):
        (q0, q1), (k0, k1) = (cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist())
        rows = [t[lo:hi].detach().transpose(0, 1)[None].double().requires_grad_(True)
                for t, lo, hi in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        expected, expected_lse = ref.attention(*rows, window=window, softcap=kwargs.get("softcap", 0.0),
                                               alibi_slopes=None if slopes is None else slopes[b : b + 1])
        truth = torch.autograd.grad(expected, rows, grad_out[q0:q1].transpose(0, 1)[None].double(), allow_unused=True)
        assert_close(out[q0:q1].transpose(0, 1)[None], expected, ATTENTION_TOL[dtype], f"out [{b}]")
        assert_close(lse[:, q0:q1][None], expected_lse, ATTENTION_TOL[dtype], f"lse [{b}]")
        for name, g, lo, hi, g_truth in zip("qkv", grads, (q0, k0, k0), (q1, k1, k1), truth):
            g_truth = torch.zeros_like(rows[0 if name == "q" else 1]) if g_truth is None else g_truth
            assert_close(g[lo:hi].transpose(0, 1)[None], g_truth, ATTENTION_GRAD_TOL[dtype], f"d{name} [{b}]")


@pytest.mark.parametrize("bad", ["uneven queries", "keys past the end", "falling keys", "dtype"])
def test_varlen_decode_entry_point_checks_its_arguments(bad):
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    q, k = torch.randn(2, 2, 16), torch.randn(9, 2, 16)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    match = "cu_seqlens_k"
    if bad == "uneven queries":
        q, cu_q, match = torch.randn(3, 2, 16), torch.tensor([0, 1, 3], dtype=torch.int32), "queries"
    elif bad == "keys past the end":
        cu_k = torch.tensor([0, 4, 10], dtype=torch.int32)
    elif bad == "falling keys":
        cu_k = torch.tensor([0, 5, 4], dtype=torch.int32)
    else:
        q, match = q.double(), "dtype"
    with pytest.raises(RuntimeError, match=match):
        ext.attention_decode_varlen_forward(q, k, k, cu_q, cu_k, 0.25, 0.0, -1, None)


def test_varlen_reads_views_of_packed_projections(routes):
    """q, k, v as slices of packed (total, 3, H, D) / (total, 2, H, D) projections (strided rows),
    one query per sequence: read through their strides."""
    gen = torch.Generator().manual_seed(3)
    lengths_k = [5, 17, 1]
    qkv = torch.randn(3, 3, 4, 32, generator=gen)
    kv = torch.randn(sum(lengths_k), 2, 4, 32, generator=gen)
    q, k, v = qkv[:, 0], kv[:, 0], kv[:, 1]
    cu_q = torch.arange(4, dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
    with forced(OP, "cpp", "cpu"):
        out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, 1, 17, return_lse=True)
    assert routes == [True]
    for b, (lo, hi) in enumerate(zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        rows = [t.transpose(0, 1)[None].double() for t in (q[b : b + 1], k[lo:hi], v[lo:hi])]
        expected, expected_lse = ref.attention(*rows)
        assert_close(out[b : b + 1].transpose(0, 1)[None], expected, ATTENTION_TOL[torch.float32], f"out [{b}]")
        assert_close(lse[:, b : b + 1][None], expected_lse, ATTENTION_TOL[torch.float32], f"lse [{b}]")
