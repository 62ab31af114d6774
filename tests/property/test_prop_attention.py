"""Property tests: flash_attention / flash_attention_varlen / attention_decode on random
problems (shapes incl. length 1 and odd head dims, GQA ratios, causal, windows, softcap,
ALiBi, fused RoPE, bool/float masks with fully masked rows, key padding incl. whole padded
entries, varlen splits incl. empty sequences) against the float64 reference."""
import torch
from attention_cases import assert_close, ground_truth
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced
from hypothesis import given
from hypothesis import strategies as st
from prop_common import attention_problems, examples, seeds

import attnkit
from attnkit.ops import attention_decode, flash_attention, flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"
ALL_DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


def check_dense(backend, problem, dtype, with_grads):
    with forced(OP, backend, "cpu", dtype, rotary=bool(problem.rotary)):
        q, k, v, kwargs = problem.inputs(dtype)
        leaves = [t.requires_grad_(with_grads) for t in (q, k, v)]
        out, lse = flash_attention(*leaves, **kwargs, return_lse=True)
        assert attnkit.last_dispatch(OP).backend == backend
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(problem.seed), dtype=torch.float64)
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype)) if with_grads else ()
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out.to(dtype))
    tol = ATTENTION_TOL[dtype]
    assert_close(out, out_t, tol, "out")
    assert_close(lse, lse_t, tol, "lse")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


@examples(40)
@given(problem=attention_problems(), dtype=ALL_DTYPES, with_grads=st.booleans())
def test_cpp_matches_reference(problem, dtype, with_grads):
    check_dense("cpp", problem, dtype, with_grads)


@examples(40)
@given(problem=attention_problems(max_n_q=2), dtype=ALL_DTYPES, with_grads=st.booleans())
def test_cpp_few_queries_match_reference(problem, dtype, with_grads):
    """One or two queries: the cpp forward's decoding-kernel route (masks and padding too).
    float16/bfloat16 forward only: the route changes no backward, and with one or two keys and
    large scores their gradients (computed from the rounded output, as SDPA's are) exceed the
    fixed bounds on either path, as SDPA's own do (float16 dk 4.8e-3 > 4e-3; bfloat16 dq 0.041 >
    0.04, the same as SDPA's)."""
    check_dense("cpp", problem, dtype, with_grads and dtype in (torch.float32, torch.float64))


@examples(10)
@given(problem=attention_problems(), dtype=ALL_DTYPES, with_grads=st.booleans())
def test_reference_backend_matches_ground_truth(problem, dtype, with_grads):
    """The reference backend has its own backward formulas (not autograd): checked too."""
    check_dense("reference", problem, dtype, with_grads)


@examples(6)
@given(problem=attention_problems(max_batch=2, max_group=2, max_n=12, dims=(1, 8, 24)), with_grads=st.booleans())
def test_triton_matches_reference(problem, with_grads):
    check_dense("triton", problem, torch.float32, with_grads)


@st.composite
def varlen_problems(draw, max_batch=4, max_n=24, dims=(1, 8, 24, 40), few_queries=False):
    """few_queries: every sequence has the same one or two queries (a decoding step over a packed batch)."""
    batch = draw(st.integers(1, max_batch))
    lengths = st.lists(st.integers(0, max_n), min_size=batch, max_size=batch)
    lengths_q = [draw(st.integers(1, 2))] * batch if few_queries else draw(lengths)
    return dict(lengths_q=lengths_q, lengths_k=draw(lengths), heads_kv=draw(st.integers(1, 2)),
                group=draw(st.integers(1, 3)), dim=draw(st.sampled_from(dims)), causal=draw(st.booleans()),
                window=draw(st.one_of(st.just((-1, -1)), st.tuples(*[st.integers(-1, max_n)] * 2))),
                softcap=draw(st.sampled_from([0.0, 3.0])), alibi=draw(st.booleans()), seed=draw(seeds))


def check_varlen(backend, p, dtype, with_grads=True):
    gen = torch.Generator().manual_seed(p["seed"])
    heads = p["heads_kv"] * p["group"]
    total_q, total_k = sum(p["lengths_q"]), sum(p["lengths_k"])
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = rand(total_q, heads, p["dim"]), rand(total_k, p["heads_kv"], p["dim"]), rand(total_k, p["heads_kv"], p["dim"])
    grad_out = rand(total_q, heads, p["dim"])
    cu = [torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
          for lengths in (p["lengths_q"], p["lengths_k"])]
    slopes = torch.rand(len(p["lengths_q"]), heads, generator=gen) if p["alibi"] else None
    kwargs = dict(causal=p["causal"], window_size=p["window"], softcap=p["softcap"])
    with forced(OP, backend, "cpu", dtype):
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        out, lse = flash_attention_varlen(*leaves, *cu, max(p["lengths_q"]), max(p["lengths_k"]), **kwargs,
                                          alibi_slopes=slopes, return_lse=True)
        grads = torch.autograd.grad(out, leaves, grad_out)
    # Truth: each sequence alone through the dense float64 reference.
    parts = [ref.split_varlen(t, c) for t, c in ((q, cu[0]), (k, cu[1]), (v, cu[1]), (grad_out, cu[0]))]
    outs, lses, dqs, dks, dvs = [], [], [], [], []
    for b, (q_b, k_b, v_b, g_b) in enumerate(zip(*parts)):
        seq_kwargs = dict(kwargs, alibi_slopes=None if slopes is None else slopes[b : b + 1])
        out_b, lse_b, (dq, dk, dv) = ground_truth(q_b, k_b, v_b, seq_kwargs, g_b)
        outs.append(out_b), lses.append(lse_b[0]), dqs.append(dq), dks.append(dk), dvs.append(dv)
    tol = ATTENTION_TOL[dtype]
    assert_close(out, ref.join_varlen(outs), tol, "out")
    assert_close(lse, torch.cat(lses, dim=1), tol, "lse")
    for name, g, g_t in (("dq", grads[0], dqs), ("dk", grads[1], dks), ("dv", grads[2], dvs)):
        if with_grads:
            assert_close(g, ref.join_varlen(g_t), ATTENTION_GRAD_TOL[dtype], name)


@examples(25)
@given(p=varlen_problems(), dtype=ALL_DTYPES)
def test_varlen_cpp_matches_per_sequence_reference(p, dtype):
    check_varlen("cpp", p, dtype)


@examples(20)
@given(p=varlen_problems(few_queries=True), dtype=ALL_DTYPES)
def test_varlen_cpp_few_queries_match_per_sequence_reference(p, dtype):
    """The cpp forward's decoding-kernel route for packed sequences; gradients as in
    test_cpp_few_queries_match_reference (float32/float64 only)."""
    check_varlen("cpp", p, dtype, with_grads=dtype in (torch.float32, torch.float64))


@examples(5)
@given(p=varlen_problems(max_batch=3, max_n=10, dims=(1, 8, 24)))
def test_varlen_triton_matches_per_sequence_reference(p):
    check_varlen("triton", p, torch.float32)


@st.composite
def decode_problems(draw, max_n=48):
    batch = draw(st.integers(1, 3))
    n_max = draw(st.integers(1, max_n))
    return dict(batch=batch, heads_kv=draw(st.integers(1, 2)), group=draw(st.integers(1, 4)),
                n_q=draw(st.integers(1, 3)), n_max=n_max, dim=draw(st.sampled_from((1, 8, 24, 40, 64))),
                lengths=draw(st.lists(st.integers(0, n_max), min_size=batch, max_size=batch)),
                softcap=draw(st.sampled_from([0.0, 2.0])), window_left=draw(st.integers(-1, n_max)),
                alibi=draw(st.booleans()), seed=draw(seeds))


def check_decode(backend, p, dtype):
    gen = torch.Generator().manual_seed(p["seed"])
    heads = p["heads_kv"] * p["group"]
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    q = rand(p["batch"], heads, p["n_q"], p["dim"])
    k, v = (rand(p["batch"], p["heads_kv"], p["n_max"], p["dim"]) for _ in range(2))
    lengths = torch.tensor(p["lengths"], dtype=torch.int32)
    slopes = torch.rand(heads, generator=gen) if p["alibi"] else None
    with forced("attention_decode", backend, "cpu", dtype, alibi=p["alibi"]):
        out, lse = attention_decode(q, k, v, lengths, softcap=p["softcap"], window_left=p["window_left"],
                                    alibi_slopes=slopes, return_lse=True)
    out_t, lse_t = ref.decode(q.double(), k.double(), v.double(), lengths, softcap=p["softcap"],
                              window_left=p["window_left"],
                              alibi_slopes=None if slopes is None else slopes.expand(p["batch"], -1))
    tol = ATTENTION_TOL[dtype]
    assert_close(out, out_t, tol, "out")
    assert_close(lse, lse_t, tol, "lse")


@examples(25)
@given(p=decode_problems(), dtype=ALL_DTYPES)
def test_decode_cpp_matches_reference(p, dtype):
    check_decode("cpp", p, dtype)


@examples(5)
@given(p=decode_problems(max_n=20))
def test_decode_triton_matches_reference(p):
    check_decode("triton", p, torch.float32)
