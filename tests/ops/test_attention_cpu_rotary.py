"""Fused RoPE in the cpp attention backend beyond the shared suite: several tiles
per row and column and both backward schedules, half precision, top-left
alignment, strided q/k, varlen, equality with "apply_rotary then attend", and the
argument checks of the C++ entry points (csrc/cpu/rotary.cpp, attention_rotary.cpp).
The kernels rotate q and k where they copy them (Q tiles, K^T, the backward's
transposed operands, per key block on the one-task-per-(batch, kv-head) backward
schedule) and dq, dk back where they write them (attention.cpp, attention_rope.h)."""
import pytest
import torch
from attention_cases import (Features, Shape, assert_close, check_backend_matches_ground_truth, ground_truth,
                             make_inputs, run_with_grads)
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced, num_threads

import attnkit
from attnkit import _extensions
from attnkit.ops import apply_rotary, flash_attention, flash_attention_varlen

OP = "flash_attention"
TOL = ATTENTION_TOL  # tests/helpers.py: every tolerance in one place


def _tables(positions, rotary_dim, dtype=torch.float32):
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(rotary_dim // 2, dtype=torch.float64) * 2 / rotary_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# B * H_kv = 1 takes the split backward, B * H_kv = 32 the fused one (up to 8 threads);
# Nk = 600 > 512 gives the forward two key blocks, Nq = 257 five query blocks.
LARGE_CASES = [
    (Shape(1, 2, 1, 257, 600, 64, 64), Features(rotary="partial", causal=True)),
    (Shape(4, 8, 8, 130, 200, 64, 64), Features(rotary="half", causal=True)),
    (Shape(4, 8, 4, 150, 220, 64, 64), Features(rotary="interleaved", window=(40, 10), softcap=3.0)),
]


@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in LARGE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_shapes_match_reference(shape, features, dtype):
    with forced(OP, "cpp", "cpu", dtype, rotary=True):
        q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu")
        check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


@pytest.mark.parametrize("dtype,table_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float64)], ids=str)
def test_table_dtypes(dtype, table_dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 33, 32, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    cos, sin = _tables(40, 24, table_dtype)
    kwargs = dict(causal=True, rotary_cos=cos, rotary_sin=sin, rotary_seqlen_offsets=5)
    grad_out = torch.randn(q.shape, dtype=torch.float64).to(dtype)
    with forced(OP, "cpp", "cpu", dtype, rotary=True):
        out, lse, grads = run_with_grads(q, k, v, kwargs, grad_out)
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out)
    assert_close(out, out_t, TOL[dtype], "out")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("interleaved,alignment", [(False, "bottom_right"), (True, "top_left")])
def test_fused_equals_rotate_then_attend(interleaved, alignment):
    """Fused RoPE against apply_rotary (cpp) followed by the plain cpp attention, on strided
    q/k/v views of a packed (B, N, 3, H, D) projection, Nq < Nk."""
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(2, 60, 3, 4, 32, generator=gen)
    q, k, v = (qkv[:, :45 if i == 0 else 60, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views
    cos, sin = _tables(80, 16)
    offsets = torch.tensor([7, 0], dtype=torch.int32)
    grad_out = torch.randn(2, 4, 45, 32, generator=gen)
    kwargs = dict(causal=True, causal_alignment=alignment)
    with attnkit.use_backend("cpp"):
        fused = run_with_grads(q, k, v, dict(kwargs, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                                    rotary_seqlen_offsets=offsets), grad_out)
        assert attnkit.last_dispatch(OP).backend == "cpp"
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        spin = dict(interleaved=interleaved, layout="bhnd")
        shift_q = offsets + (15 if alignment == "bottom_right" else 0)
        q_rot = apply_rotary(leaves[0], cos, sin, seqlen_offsets=shift_q, **spin)
        out = flash_attention(q_rot, apply_rotary(leaves[1], cos, sin, seqlen_offsets=offsets, **spin), leaves[2],
                              **kwargs)
        assert attnkit.last_dispatch("rotary").backend == "cpp"
        grads = torch.autograd.grad(out, leaves, grad_out)
    torch.testing.assert_close(fused[0], out, atol=1e-5, rtol=1e-5)
    for g_fused, g in zip(fused[2], grads):
        torch.testing.assert_close(g_fused, g, atol=1e-5, rtol=1e-5)


def test_varlen_fused_equals_rotate_then_attend():
    gen = torch.Generator().manual_seed(9)
    cu_q = torch.tensor([0, 70, 70, 75], dtype=torch.int32)
    cu_k = torch.tensor([0, 90, 93, 93 + 130], dtype=torch.int32)
    q = torch.randn(75, 4, 48, generator=gen, requires_grad=True)
    k, v = (torch.randn(223, 2, 48, generator=gen, requires_grad=True) for _ in range(2))
    cos, sin = _tables(200, 32)
    offsets = torch.tensor([3, 0, 60], dtype=torch.int32)
    grad_out = torch.randn(75, 4, 48, generator=gen)
    with attnkit.use_backend("cpp"):
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, 70, 130, causal=True, rotary_cos=cos, rotary_sin=sin,
                                     rotary_seqlen_offsets=offsets)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        # Bottom-right: query i of sequence b sits at key position i + Nk_b - Nq_b.
        shift_q = offsets + (cu_k.diff() - cu_q.diff())
        q_rot = apply_rotary(q, cos, sin, seqlen_offsets=shift_q, cu_seqlens=cu_q, max_seqlen=70)
        k_rot = apply_rotary(k, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu_k, max_seqlen=130)
        expected = flash_attention_varlen(q_rot, k_rot, v, cu_q, cu_k, 70, 130, causal=True)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for g, g_e in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_e, atol=1e-5, rtol=1e-5)


def test_entry_points_reject_bad_arguments():
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    x = torch.randn(2, 5, 3, 8)
    cos, sin = _tables(6, 8)
    bad_rotary = [
        (x, cos.double(), sin.double(), None, 0, False, False, torch.empty_like(x), None),  # table dtype
        (x, cos, sin[:, :3], None, 0, False, False, torch.empty_like(x), None),  # cos/sin differ
        (x, cos, sin, None, 0, False, False, torch.empty(2, 5, 3, 7), None),  # out shape
        (x, cos, sin, torch.zeros(3, dtype=torch.int32), 0, False, False, torch.empty_like(x), None),  # offsets
        (x[0], cos, sin, None, 0, False, False, torch.empty_like(x[0]), torch.tensor([0, 4], dtype=torch.int32)),
    ]
    for args in bad_rotary:
        with pytest.raises(RuntimeError, match="rotary"):
            ext.rotary_apply(*args)
    q = torch.randn(2, 2, 8, 16)
    base = (None, None, 8, 8, None, None, None, -1, -1, True, 0.0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="rotary_cos"):
        ext.attention_rotary_forward(q, q, q, *base, cos[0], sin[0], torch.zeros(2, dtype=torch.int32), False)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_cpp_walks_any_layout(interleaved):
    """The cpp rotary kernel walks heads outer for SDPA-layout views (dense and packed),
    heads inner otherwise, and takes a strided last dim; rows past the table stay as they are."""
    gen = torch.Generator().manual_seed(12)
    cos, sin = _tables(20, 12)
    offsets = torch.tensor([2, 15], dtype=torch.int32)  # sequence 1 runs past the table
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    cases = [
        dict(x=torch.randn(2, 3, 9, 16, generator=gen), layout="bhnd", seqlen_offsets=offsets),
        dict(x=torch.randn(2, 9, 3, 32, generator=gen)[..., ::2], seqlen_offsets=offsets),
        dict(x=torch.randn(3, 16, 16, generator=gen).transpose(0, 1), cu_seqlens=cu, max_seqlen=9,
             seqlen_offsets=offsets),
    ]
    for case in cases:
        x = case.pop("x")
        with attnkit.use_backend("reference", op="rotary"):
            expected = apply_rotary(x, cos, sin, interleaved=interleaved, **case)
        with attnkit.use_backend("cpp", op="rotary"):
            out = apply_rotary(x, cos, sin, interleaved=interleaved, **case)
            y = x.clone()
            apply_rotary(y, cos, sin, interleaved=interleaved, inplace=True, **case)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_opcheck_on_cpp():
    """The custom ops (fake kernels, autograd registration, schema) with RoPE on the cpp backend."""
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 5, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 8, generator=gen, requires_grad=True) for _ in range(2))
    cos, sin = _tables(12, 6)
    offsets = torch.tensor([0, 3], dtype=torch.int32)
    with attnkit.use_backend("cpp"):
        schema = torch.ops.attnkit.attention_forward.default._schema
        args = [q, k, v, None, None, 5, 7, None, None, -1, 0, True, 0.0, 0.35, 0.0, None, None, cos, sin, offsets, True]
        assert len(args) == len(schema.arguments)
        torch.library.opcheck(torch.ops.attnkit.attention_forward.default, tuple(args))
        assert attnkit.last_dispatch(OP).backend == "cpp"
        x = torch.randn(2, 5, 3, 8, generator=gen, requires_grad=True)
        torch.library.opcheck(torch.ops.attnkit.rotary.default, (x, cos, sin, offsets, 0, True, False, None, 0))
        torch.library.opcheck(torch.ops.attnkit.rotary_.default, (x.detach().clone(), cos, sin, None, 2, False, None, 0))
        assert attnkit.last_dispatch("rotary").backend == "cpp"


# The cpp backward takes one task per (batch, kv-head) when B * H_kv >= 4 * threads
# (rotating K block by block in the dK/dV kernel), else the split dK/dV + dQ schedule.

# (shape, features, schedule): D = 80 and 64 take the float kernels' 8 x 8 transposes on
# full 16-row chunks, D = 20 and odd N their scalar tails; Nq = 1, Nq > Nk (top-left), GQA.
SCHEDULE_CASES = [
    (Shape(1, 2, 1, 37, 70, 80, 80), Features(rotary="partial", causal=True), "split"),
    (Shape(2, 4, 2, 37, 70, 80, 48), Features(rotary="partial", causal=True), "per-kv-head"),
    (Shape(4, 4, 2, 1, 33, 20, 20), Features(rotary="interleaved", causal=True), "per-kv-head"),
    (Shape(1, 3, 3, 1, 33, 20, 20), Features(rotary="interleaved"), "split"),
    (Shape(2, 2, 2, 45, 40, 64, 64), Features(rotary="half", causal=True, extra=dict(causal_alignment="top_left")),
     "per-kv-head"),
    (Shape(1, 2, 2, 45, 40, 64, 64), Features(rotary="half", window=(9, 3), extra=dict(causal_alignment="top_left")),
     "split"),
]


def _one_thread(shape, schedule):
    assert (shape.batch * shape.heads_kv >= 4) == (schedule == "per-kv-head"), "case misses its schedule"
    return num_threads(1)


@pytest.mark.parametrize("shape,features,schedule", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}")
                                                     for c in SCHEDULE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_both_backward_schedules_match_reference(shape, features, schedule, dtype):
    with forced(OP, "cpp", "cpu", dtype, rotary=True), _one_thread(shape, schedule):
        q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu")
        kwargs.update(features.extra)
        check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


@pytest.mark.parametrize("shape,features,schedule", [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}")
                                                     for c in SCHEDULE_CASES[2:5]])
def test_gradcheck_float64_both_schedules(shape, features, schedule):
    small = Shape(shape.batch, shape.heads, shape.heads_kv, min(shape.n_q, 5), min(shape.n_k, 7), 6, 4)
    with forced(OP, "cpp", "cpu", torch.float64, rotary=True), _one_thread(small, schedule):
        q, k, v, kwargs = make_inputs(small, features, torch.float64, "cpu")
        kwargs.update(features.extra)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, **kwargs), leaves)
        assert attnkit.last_dispatch(OP).backend == "cpp"


@pytest.mark.parametrize("threads", [1, 4], ids=["per-kv-head", "split"])
def test_positions_past_the_table_stay_unrotated(threads):
    """At the C++ entry points (no Python position check), a row whose position falls
    outside the table is used unrotated, as rotary_apply leaves it."""
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(21)
    q, k, v, grad_out = (torch.randn(2, 2, 20, 16, generator=gen, dtype=torch.float64) for _ in range(4))
    cos, sin = _tables(24, 12, torch.float64)
    offsets = torch.tensor([0, 9], dtype=torch.int32)  # sequence 1: positions 9..28, the last 5 past the table
    base = (None, None, 20, 20, None, None, None, -1, 0, True, 0.0, 0.25, 0.0, 0)
    rope = (cos, sin, offsets, False)

    def spin(x, conjugate=False):
        out = torch.empty_like(x)
        ext.rotary_apply(x.transpose(1, 2), cos, sin, offsets.long(), 0, False, conjugate, out.transpose(1, 2), None)
        return out

    with num_threads(threads):
        out, lse = ext.attention_rotary_forward(q, k, v, *base, *rope)
        grads = ext.attention_rotary_backward(grad_out, q, k, v, out, lse, *base, *rope, False)
        out_e, lse_e = ext.attention_forward(spin(q), spin(k), v, *base)
        dq, dk, dv = ext.attention_backward(grad_out, spin(q), spin(k), v, out_e, lse_e, *base, False)
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(lse, lse_e)
    for g, g_e in zip(grads, (spin(dq, True), spin(dk, True), dv)):
        torch.testing.assert_close(g, g_e)


@pytest.mark.parametrize("interleaved", [False, True])
def test_bfloat16_tiles_varlen_rope_matches_the_float_tiles(monkeypatch, interleaved):
    """bfloat16 with fused RoPE on the bfloat16 tiles (q and k rotated once into bfloat16 copies,
    dq and dk rotated back): packed sequences of 7, 40 and 2 tokens, GQA, causal, per-sequence
    offsets and a partial rotary dim, against the float tiles (ATTNKIT_CPU_BF16_TILES=0), which the
    tests above hold to the float64 reference."""
    ext, reason = _extensions.load("_C")
    if ext is None or not ext.attention_bf16_tiles_available():
        pytest.skip(reason or "no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    gen = torch.Generator().manual_seed(31)
    cu = torch.tensor([0, 7, 47, 49], dtype=torch.int32)
    q, k, v = (torch.randn(49, heads, 32, generator=gen).bfloat16() for heads in (4, 2, 2))
    grad_out = torch.randn(49, 4, 32, generator=gen).bfloat16()
    cos, sin = _tables(60, 24)
    kwargs = dict(causal=True, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                  rotary_seqlen_offsets=torch.tensor([3, 0, 11], dtype=torch.int32))

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention_varlen(*leaves, cu, cu, 40, 40, **kwargs)
        return (out,) + torch.autograd.grad(out, leaves, grad_out)

    with forced(OP, "cpp", "cpu", torch.bfloat16, rotary=True):
        tiles = run()
        monkeypatch.setenv("ATTNKIT_CPU_BF16_TILES", "0")
        plain = run()
    assert not torch.equal(tiles[0], plain[0])
    for name, got, want in zip(("out", "dq", "dk", "dv"), tiles, plain):
        assert_close(got, want, (TOL if name == "out" else ATTENTION_GRAD_TOL)[torch.bfloat16], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("empty", ["queries", "keys"])
def test_empty_strided_queries_or_keys_with_fused_rope(dtype, empty):
    """An empty q or k from a (B, N, H, D) projection: the bf16 tiles rotate it into a copy,
    and two empty tensors (one null pointer) were taken for an in-place call with other strides."""
    cos, sin = _tables(16, 8)
    sizes = {"queries": (0, 5), "keys": (5, 0)}[empty]
    q, k = (torch.randn(1, n, 2, 8, dtype=dtype).transpose(1, 2) for n in sizes)
    with forced(OP, "cpp", "cpu", dtype):
        out = flash_attention(q, k, k, rotary_cos=cos, rotary_sin=sin, causal_alignment="top_left")
    assert out.shape == (1, 2, sizes[0], 8)
    if sizes[0]:  # no keys: zeros, as every backend gives rows that see no key
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("table_dtype", [torch.int64, torch.bool, torch.complex64])
def test_cpp_entry_points_refuse_tables_that_are_not_real_floats(table_dtype):
    """attention_rotary_* converted int, bool and complex tables silently (complex dropping
    its imaginary part); the op refuses them in Python, a direct call now gets the same."""
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    q = torch.randn(1, 2, 3, 8)
    table = torch.ones(4, 2, dtype=table_dtype)
    base = (None, None, 3, 3, None, None, None, -1, 0, True, 0.0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="rotary_cos and rotary_sin must be floating point"):
        ext.attention_rotary_forward(q, q, q, *base, table, table, torch.zeros(1, dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="rotary offsets must be int64 or int32"):
        ext.attention_rotary_forward(q, q, q, *base, *_tables(4, 4), torch.zeros(1), False)
