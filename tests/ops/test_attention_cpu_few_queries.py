"""The cpp flash attention's few-query forward: calls with one or two queries (up to 8
bottom-right causal ones against long keys), masks and key padding included, run the
decoding kernel (csrc/cpu/attention_decode.cpp) instead of the tiles, and the tiled backward
on its out and lse. Values and gradients against the float64 reference, for calls that take
that route and neighbours that must not."""
import pytest
import torch
from attention_cases import Features, Shape, check_backend_matches_ground_truth, make_inputs
from helpers import forced

import attnkit.backends.attention as attention_backends
from attnkit import _extensions
from attnkit.ops import flash_attention

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
