"""The cpp attention backend beyond the shared suite: shapes larger than the
interpreter can afford (several tiles per row and column, both backward
schedules), strided layouts, Philox bit equality, determinism and argument
checks of the C++ entry points."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
from attention_cases import (Features, Shape, assert_close, check_backend_matches_ground_truth, ground_truth,
                             make_inputs, run_with_grads)
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced, num_threads

from attnkit import _extensions
from attnkit.ops import flash_attention, flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"


def _ext():
    ext, reason = _extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    return ext


# B * H_kv = 1 takes the split backward (dK/dV per key block, dQ per query block),
# B * H_kv = 32 the fused one (one task per (batch, kv-head) pair), with up to 8 threads.
LARGE_CASES = [
    (Shape(1, 2, 1, 257, 257, 64, 64), Features(causal=True)),
    (Shape(1, 1, 1, 1000, 1000, 64, 64), Features()),
    (Shape(4, 8, 8, 257, 300, 64, 64), Features(causal=True)),
    (Shape(4, 16, 8, 300, 257, 64, 64), Features(window=(100, 20), softcap=5.0, padding=True)),
    (Shape(1, 2, 2, 1000, 700, 64, 32), Features(causal=True, mask="float", alibi="heads")),
    (Shape(2, 2, 2, 300, 300, 64, 64), Features(mask="bool", window=(-1, 40))),
]


@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in LARGE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_shapes_match_reference(shape, features, dtype):
    with forced(OP, "cpp", "cpu", dtype):
        q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu")
        check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("features", [Features(), Features(causal=True, mask="float")], ids=str)
def test_head_dims_off_the_transpose_blocks(features, dtype):
    """K^T, V^T, Q^T and dO^T are laid out by 8 x 8 register transposes (float) and element by
    element past them: head dims 20 and 11 and lengths 13 and 19 leave edges on both sides."""
    with forced(OP, "cpp", "cpu", dtype):
        q, k, v, kwargs = make_inputs(Shape(2, 2, 1, 13, 19, 20, 11), features, dtype, "cpu")
        check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


SCRATCH_SEQUENCE = [  # one thread, in order: its kept operand buffers grow, shrink, change dtype and layout
    (Shape(2, 4, 2, 70, 90, 64, 48), Features(causal=True), torch.float32),
    (Shape(1, 2, 1, 13, 19, 20, 11), Features(mask="float"), torch.float64),
    (Shape(2, 2, 2, 17, 23, 32, 32), Features(rotary="half"), torch.float32),
    (Shape(2, 4, 2, 33, 33, 16, 16), Features(padding=True, rotary="interleaved"), torch.float16),  # float copies
    (Shape(64, 1, 1, 257, 40, 128, 128), Features(), torch.float32),  # 8.4 MB copies: past a kept buffer's 8 MB
    (Shape(2, 4, 2, 70, 90, 64, 48), Features(causal=True), torch.float32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rows_that_see_keys_late_or_never(dtype):
    """The forward's accumulator paths: a row whose first key tiles (512 keys each) are all
    masked and that sees keys later, rows that see keys only early, rows that see none
    (output 0, lse -inf), and a query block that has no key tile at all (bottom-right causal,
    Nq > Nk: the first 64 queries see nothing)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen, dtype=dtype) for n in (4, 1100, 1100))
    mask = torch.zeros(4, 1100, dtype=torch.bool)
    mask[0, 1030:] = True  # only the third tile
    mask[1, :10] = True  # only the first
    mask[3] = True  # all; row 2 sees nothing
    queries, keys = torch.randn(1, 2, 100, 32, generator=gen, dtype=dtype), torch.randn(1, 2, 20, 32, generator=gen,
                                                                                      dtype=dtype)
    for args, kwargs, ref_kwargs in (((q, k, v), dict(attn_mask=mask), dict(attn_mask=mask.expand(1, 2, 4, 1100))),
                                     ((queries, keys, keys), dict(causal=True), dict(window=(-1, 0)))):
        with forced(OP, "cpp", "cpu", dtype):
            out, lse = flash_attention(*args, **kwargs, return_lse=True)
        want, want_lse = ref.attention(*args, **ref_kwargs)
        assert_close(out, want, ATTENTION_TOL[dtype], "out")
        assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
        assert_close(torch.where(torch.isinf(lse), 0, lse), torch.where(torch.isinf(want_lse), 0, want_lse),
                     ATTENTION_TOL[dtype], "lse")
    assert out[0, :, :80].abs().max() == 0 and torch.isinf(lse[0, :, :80]).all()


def test_operand_copies_in_kept_buffers_across_calls():
    """K^T, V^T, Q^T and dO^T of each call go to buffers the calling thread keeps between calls
    (attention.cpp's scratch): a run of forwards and backwards whose copies grow, shrink, change
    dtype, go through fused RoPE and padding, and exceed a buffer's size, each against the reference."""
    for shape, features, dtype in SCRATCH_SEQUENCE:
        with forced(OP, "cpp", "cpu", dtype):
            q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu", seed=shape.n_q)
            check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


def test_strided_layouts():
    """(B, N, H, D) inputs transposed to (B, H, N, D), and K/V expanded over the sequence (stride 0)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 70, 4, 32, generator=gen)
    q = x.transpose(1, 2)
    k = torch.randn(2, 2, 1, 32, generator=gen).expand(2, 2, 50, 32)
    v = torch.randn(2, 50, 2, 32, generator=gen).transpose(1, 2)
    with forced(OP, "cpp", "cpu"):
        out = flash_attention(q, k, v, causal=True)
    expected, _ = ref.attention(q.double(), k.double(), v.double(), window=(-1, 0))
    assert_close(out, expected, 1e-4, "out")


def test_backward_is_deterministic():
    q, k, v, kwargs = make_inputs(Shape(4, 8, 8, 200, 200, 64, 64), Features(causal=True), torch.float32, "cpu")
    grad_out = torch.randn(q.shape)
    with forced(OP, "cpp", "cpu"):
        first = run_with_grads(q, k, v, kwargs, grad_out)[2]
        second = run_with_grads(q, k, v, kwargs, grad_out)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dropout_mask_is_the_reference_philox_bit_for_bit():
    """Through the op: with q = k = 0 every probability is 1 / Nk and v = I makes
    out[i, j] = keep(i, j) / (Nk (1 - p)), so out != 0 is the keep mask itself."""
    batch, heads, n_q, n_k, p = 2, 3, 19, 37, 0.3
    q = torch.zeros(batch, heads, n_q, 8)
    k = torch.zeros(batch, heads, n_k, 8)
    v = torch.eye(n_k).expand(batch, heads, n_k, n_k)
    gen = torch.Generator().manual_seed(21)
    with forced(OP, "cpp", "cpu"):
        out = flash_attention(q, k, v, dropout_p=p, generator=gen)
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(21))) << 20
    keep = ref.dropout_keep_mask(seed, batch, heads, n_q, n_k, p)
    assert torch.equal(out != 0, keep)
    assert torch.allclose(out[keep], torch.full_like(out[keep], 1 / (n_k * (1 - p))))


def test_dropout_mask_varlen_streams_match_the_reference():
    """Varlen offsets use max_seqlen_k and sequence-local positions, as the reference's mask."""
    lengths_q, lengths_k, heads, p = [5, 11], [7, 13], 2, 0.4
    cu_q = torch.tensor([0, 5, 16], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 20], dtype=torch.int32)
    q = torch.zeros(16, heads, 4)
    k = torch.zeros(20, heads, 4)
    v = torch.zeros(20, heads, 13)
    for b, (start, n) in enumerate(zip([0, 7], lengths_k)):
        v[start : start + n, :, :n] = torch.eye(n)[:, None, :]
    gen = torch.Generator().manual_seed(4)
    with forced(OP, "cpp", "cpu"):
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, 11, 13, dropout_p=p, generator=gen)
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(4))) << 20
    keep = ref.dropout_keep_mask(seed, 2, heads, 11, 13, p)
    for b, (start, n_q, n_k) in enumerate(zip([0, 5], lengths_q, lengths_k)):
        got = (out[start : start + n_q, :, :n_k] != 0).transpose(0, 1)
        assert torch.equal(got, keep[b, :, :n_q, :n_k])


@pytest.mark.parametrize("seed", [0, 12345 << 20, (1 << 60) - 3])
def test_keep_mask_entry_point_matches_reference(seed):
    ext = _ext()
    assert torch.equal(ext.attention_dropout_keep_mask(2, 3, 19, 37, 0.3, seed), ref.dropout_keep_mask(seed, 2, 3, 19, 37, 0.3))


def test_keep_mask_rows_are_independent_past_two_to_the_32_elements():
    """The counter was the one word i * max_k + j (mod 2^32): at max_k = 2^16 rows 0 and 2^16
    shared their mask (measured: bit-identical outputs at Nq = 65537). The key and query index
    are now two words; cpp and Triton draw the reference's bits (the tests above and
    test_attention_features), so the reference's counters are checked here."""
    cols = torch.arange(1 << 16)
    rows = [ref.philox_randint(torch.tensor(7), cols, torch.tensor(i)) for i in (0, 1 << 16, 1)]
    assert (rows[0] != rows[1]).float().mean() > 0.99 and (rows[0] != rows[2]).float().mean() > 0.99


def test_entry_points_reject_bad_arguments():
    """The C++ functions check what they read (they are reachable without the op's validator)."""
    ext = _ext()
    q = torch.randn(2, 2, 8, 16)
    base = (None, None, 8, 8, None, None, None, -1, -1, True, 0.0, 0.25, 0.0, 0)
    bad_calls = [
        ((q, q[:, :1, :, :8], q), base),  # head dims differ
        ((q, q, q.double()), base),  # dtypes differ
        ((q, q, q), (None, None, 9, 8) + base[4:]),  # dense max_seqlen != N
        ((q, q, q), base[:4] + (torch.ones(2, 2, 8, 7, dtype=torch.bool),) + base[5:]),  # mask shape
        ((q, q, q), base[:5] + (torch.ones(2, 9, dtype=torch.bool),) + base[6:]),  # padding shape
        ((q, q, q), base[:6] + (torch.ones(2, 2, dtype=torch.float64),) + base[7:]),  # alibi dtype
        ((q, q, q), base[:12] + (1.0, 0)),  # dropout_p = 1
    ]
    packed = torch.randn(10, 2, 16)
    for cu in ([0, 4, 11], [0, 6, 4, 10], [1, 10]):
        cu = torch.tensor(cu, dtype=torch.int32)
        bad_calls.append(((packed, packed, packed), (cu, cu, 10, 10) + base[4:]))
    for tensors, args in bad_calls:
        with pytest.raises(RuntimeError, match="attention"):
            ext.attention_forward(*tensors, *args)
    out, lse = ext.attention_forward(q, q, q, *base)
    with pytest.raises(RuntimeError, match="lse"):
        ext.attention_backward(out, q, q, q, out, lse[:, :, :4], *base, False)


def test_opcheck_cpp():
    q, k, v, kwargs = make_inputs(Shape(1, 2, 1, 5, 7, 8, 8), Features(causal=True, mask="float"), torch.float32, "cpu")
    q.requires_grad_(True)
    mask = kwargs["attn_mask"].expand(1, 2, 5, 7)
    with forced(OP, "cpp", "cpu"):
        schema = torch.ops.attnkit.attention_forward.default._schema
        args = [q, k, v, None, None, 5, 7, mask, None, -1, 0, True, 0.0, 0.35, 0.0, None]
        args += [None] * (len(schema.arguments) - len(args))  # optional arguments added later (ALiBi, RoPE)
        torch.library.opcheck(torch.ops.attnkit.attention_forward.default, tuple(args))


BF16_TILE_CASES = [
    (Shape(2, 4, 2, 100, 130, 64, 64), Features(causal=True)),  # GQA, Nq != Nk, tails of 64 and 512 keys
    (Shape(1, 2, 2, 70, 600, 80, 160), Features(window=(100, 20), softcap=5.0)),  # D = 80, Dv in 64-column chunks
    (Shape(2, 2, 1, 1, 37, 16, 16), Features()),  # one query
    (Shape(2, 2, 2, 65, 65, 96, 32), Features(mask="float", alibi="heads", padding=True, pad_whole_sequence=True)),
    (Shape(1, 3, 3, 129, 257, 128, 128), Features(mask="bool", scale=0.3)),
    (Shape(1, 2, 2, 40, 70, 32, 32), Features(causal=True, extra=dict(dropout_p=0.2))),
]


@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in BF16_TILE_CASES])
def test_bfloat16_forward_on_bfloat16_tiles(monkeypatch, shape, features):
    """bfloat16 inputs with an even head dim run the forward's tile GEMMs in bfloat16 where the CPU
    has them (attention_forward_bf16.cpp; P rounded to bfloat16 for P V): against the float64
    reference, and not the float tiles' result (ATTNKIT_CPU_BF16_TILES=0), which rounds only the output."""
    if not _ext().attention_bf16_tiles_available():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    q, k, v, kwargs = make_inputs(shape, features, torch.bfloat16, "cpu")
    dropout_p = features.extra.get("dropout_p", 0.0)
    with forced(OP, "cpp", "cpu", torch.bfloat16):
        if dropout_p == 0:
            check_backend_matches_ground_truth(q, k, v, kwargs, torch.bfloat16, "cpp")
        tiles = flash_attention(q, k, v, **kwargs, dropout_p=dropout_p, generator=torch.Generator().manual_seed(5))
        monkeypatch.setenv("ATTNKIT_CPU_BF16_TILES", "0")
        plain = flash_attention(q, k, v, **kwargs, dropout_p=dropout_p, generator=torch.Generator().manual_seed(5))
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(5))) << 20
    keep = ref.dropout_keep_mask(seed, shape.batch, shape.heads, shape.n_q, shape.n_k, dropout_p) if dropout_p else None
    expected, expected_lse, _ = ground_truth(q, k, v, kwargs, torch.zeros(tiles.shape, dtype=torch.float64), dropout_p,
                                             keep)
    assert_close(tiles, expected, ATTENTION_TOL[torch.bfloat16], "out")  # with dropout: the same Philox mask
    # lse sees no bfloat16 rounding (bf16 products are exact in float): a tight check of the fast exp's sum.
    with forced(OP, "cpp", "cpu", torch.bfloat16):
        monkeypatch.delenv("ATTNKIT_CPU_BF16_TILES")
        lse = flash_attention(q, k, v, **kwargs, return_lse=True)[1]
    assert_close(lse, expected_lse, 2e-5, "lse")
    assert not torch.equal(tiles, plain)
    assert_close(tiles, plain, 2e-2, "out")


@pytest.mark.parametrize("threads", [1, 2])  # 1: the one-task-per-(batch, KV head) schedule where B * H_kv >= 4
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in BF16_TILE_CASES])
def test_bfloat16_backward_on_bfloat16_tiles(monkeypatch, shape, features, threads):
    """The backward's five tile products in bfloat16 (attention_backward_bf16.cpp; P and dS
    rounded for the products they feed): every gradient against the float64 reference (with
    dropout, on the same Philox mask), on both schedules."""
    if not _ext().attention_bf16_tiles_available():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    q, k, v, kwargs = make_inputs(shape, features, torch.bfloat16, "cpu")
    dropout_p = features.extra.get("dropout_p", 0.0)
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=gen, dtype=torch.float64).bfloat16()

    def grads():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention(*leaves, **kwargs, dropout_p=dropout_p, generator=torch.Generator().manual_seed(5))
        return torch.autograd.grad(out, leaves, grad_out)

    with num_threads(threads), forced(OP, "cpp", "cpu", torch.bfloat16):
        tiles = grads()
        monkeypatch.setenv("ATTNKIT_CPU_BF16_TILES", "0")
        plain = grads()
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(5))) << 20
    keep = ref.dropout_keep_mask(seed, shape.batch, shape.heads, shape.n_q, shape.n_k, dropout_p) if dropout_p else None
    _, _, truth = ground_truth(q, k, v, kwargs, grad_out, dropout_p, keep)
    for name, g, g_truth in zip("qkv", tiles, truth):
        assert g.dtype == torch.bfloat16
        assert_close(g, g_truth, ATTENTION_GRAD_TOL[torch.bfloat16], f"d{name}")
    assert not all(torch.equal(a, b) for a, b in zip(tiles, plain))


@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_tiles_mask_gradient(monkeypatch, threads):
    """A learned bias with bfloat16 inputs on the bfloat16 tiles: its gradient (and q, k, v's) as the
    float tiles give them, with a window leaving whole tiles unvisited (their gradient 0), GQA, and
    key blocks past the first; threads=1 takes the one-task-per-(batch, KV head) schedule."""
    if not _ext().attention_bf16_tiles_available():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 70, 32, generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 300, 32, generator=gen).bfloat16() for _ in range(2))
    bias = torch.randn(1, 4, 70, 300, generator=gen).bfloat16()
    grad_out = torch.randn(2, 4, 70, 32, generator=gen).bfloat16()

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = flash_attention(*leaves[:3], attn_mask=leaves[3], window_size=(20, 5))
        return torch.autograd.grad(out, leaves, grad_out)

    with num_threads(threads), forced(OP, "cpp", "cpu", torch.bfloat16):
        tiles = grads()
        monkeypatch.setenv("ATTNKIT_CPU_BF16_TILES", "0")
        plain = grads()
    assert not torch.equal(tiles[3], plain[3])
    # Query i sees keys i + 210 .. i + 235 (bottom-right diagonal 230, window (20, 5)): none before 210.
    assert (tiles[3][..., :210] == 0).all() and (tiles[3][..., 210:] != 0).any()
    for name, got, want in zip(("dq", "dk", "dv", "d_mask"), tiles, plain):
        assert_close(got, want, ATTENTION_GRAD_TOL[torch.bfloat16], name)


def test_bfloat16_tiles_leave_odd_head_dims_to_the_float_kernel(monkeypatch):
    """VNNI pairs rows of K^T: an odd head dim runs the float tiles, which the switch cannot change."""
    q, k, v, kwargs = make_inputs(Shape(1, 2, 2, 50, 70, 33, 33), Features(causal=True), torch.bfloat16, "cpu")
    with forced(OP, "cpp", "cpu", torch.bfloat16):
        first = flash_attention(q, k, v, **kwargs)
        monkeypatch.setenv("ATTNKIT_CPU_BF16_TILES", "0")
        assert torch.equal(first, flash_attention(q, k, v, **kwargs))


def test_bfloat16_tiles_varlen():
    """Packed sequences of 5, 65 and 1 tokens (GQA, causal) on the bfloat16 tiles: each sequence's
    keys packed from its own start, against the float64 reference per sequence."""
    if not _ext().attention_bf16_tiles_available():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    gen = torch.Generator().manual_seed(11)
    cu = torch.tensor([0, 5, 70, 71], dtype=torch.int32)
    q, k, v = (torch.randn(71, heads, 64, generator=gen).bfloat16() for heads in (4, 2, 2))
    with forced(OP, "cpp", "cpu", torch.bfloat16):
        out, lse = flash_attention_varlen(q, k, v, cu, cu, 65, 65, causal=True, return_lse=True)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        rows = [t[start:end].transpose(0, 1)[None].double() for t in (q, k, v)]
        expected, expected_lse = ref.attention(*rows, window=(-1, 0))
        assert_close(out[start:end].transpose(0, 1)[None], expected, ATTENTION_TOL[torch.bfloat16], "out")
        assert_close(lse[:, start:end][None], expected_lse, 2e-5, "lse")


def test_bfloat16_tiles_varlen_backward():
    """The bfloat16 backward on packed sequences of 5, 66 and 1 tokens (GQA, causal; odd starts, so
    each sequence's rows are packed in pairs from its own start): per sequence vs the float64 reference."""
    if not _ext().attention_bf16_tiles_available():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    gen = torch.Generator().manual_seed(12)
    cu = torch.tensor([0, 5, 71, 72], dtype=torch.int32)
    q, k, v = (torch.randn(72, heads, 32, generator=gen).bfloat16().requires_grad_(True) for heads in (4, 2, 2))
    grad_out = torch.randn(72, 4, 32, generator=gen).bfloat16()
    with forced(OP, "cpp", "cpu", torch.bfloat16):
        out = flash_attention_varlen(q, k, v, cu, cu, 66, 66, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        rows = [t[start:end].detach().transpose(0, 1)[None].double().requires_grad_(True) for t in (q, k, v)]
        expected, _ = ref.attention(*rows, window=(-1, 0))
        truth = torch.autograd.grad(expected, rows, grad_out[start:end].transpose(0, 1)[None].double())
        for name, g, g_truth in zip("qkv", grads, truth):
            got = g[start:end].transpose(0, 1)[None]
            assert_close(got, g_truth, ATTENTION_GRAD_TOL[torch.bfloat16], f"d{name} [{start}:{end}]")


def test_huge_page_switch_gives_the_same_results():
    """Operands past the 8 MB kept per thread go on transparent huge pages unless
    ATTNKIT_CPU_HUGE_PAGES=0 (read once per process): both allocations, same bits."""
    _ext()
    script = (
        "import hashlib, torch, attnkit\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, n, 128, generator=g).requires_grad_() for n in (64, 9000, 9000))\n"
        "with attnkit.use_backend('cpp', op='flash_attention'):\n"
        "    out = attnkit.ops.flash_attention(q, k, v, causal=True)\n"
        "    out.square().sum().backward()\n"
        "print(hashlib.sha256(b''.join(t.detach().numpy().tobytes() for t in (out, q.grad, k.grad, v.grad))).hexdigest())\n"
    )
    digests = []
    for switch in ("1", "0"):
        env = dict(os.environ, ATTNKIT_CPU_HUGE_PAGES=switch)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        digests.append(run.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1] and len(digests[0]) == len(hashlib.sha256().hexdigest())
