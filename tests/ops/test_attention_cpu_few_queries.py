"""The cpp flash attention's few-query forward: calls with one or two queries (up to 8
bottom-right causal ones against long keys) run the decoding kernel
(csrc/cpu/attention_decode.cpp) instead of the tiles, and the tiled backward on its
out and lse. Values and gradients against the float64 reference, for calls that take
that route and neighbours that must not."""
import pytest
import torch
from attention_cases import Features, Shape, check_backend_matches_ground_truth, make_inputs
from helpers import forced

import attnkit.backends.attention as attention_backends

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
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(padding=True), {}, False),
    (Shape(2, 2, 2, 1, 40, 16, 16), Features(mask="bool"), {}, False),
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
