"""Property tests: attnkit.ops.additive_attention (Bahdanau) on random shapes (lengths and
sizes from 1, odd feature sizes), padding masks incl. fully masked batch entries, with and
without the weights returned, against attnkit.reference.additive_attention in float64:
context, weights and the gradients of all six inputs."""
import torch
from attention_cases import assert_close
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced
from hypothesis import given
from hypothesis import strategies as st
from prop_common import examples, seeds

import attnkit
from attnkit.ops import additive_attention
from attnkit import reference

OP = "additive_attention"
sizes = st.integers(1, 20)


@st.composite
def problems(draw, max_len=24):
    batch = draw(st.integers(1, 3))
    n_k = draw(st.integers(1, max_len))
    return dict(batch=batch, n_q=draw(st.integers(1, max_len)), n_k=n_k, d_q=draw(sizes), d_k=draw(sizes),
                d_v=draw(sizes), hidden=draw(st.integers(1, 40)), return_weights=draw(st.booleans()),
                lengths=draw(st.one_of(st.none(), st.lists(st.integers(0, n_k), min_size=batch, max_size=batch))),
                seed=draw(seeds))


def check(backend, p, dtype):
    gen = torch.Generator().manual_seed(p["seed"])
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    b = p["batch"]
    inputs = [rand(b, p["n_q"], p["d_q"]), rand(b, p["n_k"], p["d_k"]), rand(b, p["n_k"], p["d_v"]),
              rand(p["hidden"], p["d_q"]), rand(p["hidden"], p["d_k"]), rand(p["hidden"])]
    mask = None
    if p["lengths"] is not None:  # True = a real key; length 0: every query of that entry sees nothing
        mask = torch.arange(p["n_k"])[None, :] < torch.tensor(p["lengths"])[:, None]
    grad_context = rand(b, p["n_q"], p["d_v"])
    grad_weights = rand(b, p["n_q"], p["n_k"])
    with forced(OP, backend, "cpu", dtype):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        result = additive_attention(*leaves, mask, return_weights=p["return_weights"])
        assert attnkit.last_dispatch(OP).backend == backend
        outs = list(result) if p["return_weights"] else [result]
        grads = torch.autograd.grad(outs, leaves, [grad_context, grad_weights][: len(outs)])
    truth_leaves = [t.double().requires_grad_(True) for t in inputs]
    context_t, weights_t = reference.additive_attention(*truth_leaves, mask)
    outs_t = [context_t, weights_t][: len(outs)]
    grads_t = torch.autograd.grad(outs_t, truth_leaves, [g.double() for g in [grad_context, grad_weights][: len(outs)]])
    tol = ATTENTION_TOL[dtype]
    for name, o, o_t in zip(("context", "weights"), outs, outs_t):
        assert_close(o, o_t, tol, name)
    for name, g, g_t in zip(("query", "keys", "values", "W_q", "W_k", "v_a"), grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@examples(30)
@given(p=problems(), backend=st.sampled_from(["cpp", "reference"]), dtype=DTYPES)
def test_cpu_backends_match_reference(p, backend, dtype):
    check(backend, p, dtype)


@examples(6)
@given(p=problems(max_len=10))
def test_triton_matches_reference(p):
    check("triton", p, torch.float32)
