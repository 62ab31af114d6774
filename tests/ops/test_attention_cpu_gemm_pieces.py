"""The cpp attention's tile GEMMs in pieces of bounded sizes (csrc/cpu/attention_gemm.cpp) on
operands transposed into 64-column panels: values and gradients where the pieces have
remainders (rows, keys and head dims off the multiples of 16 and 64, windows starting inside a
panel, packed sequences), and the memory the brgemm kernels keep. oneDNN's brgemm
JIT-compiles a kernel per (M, N, K, lda, ldb, ldc), which ATen caches per thread and never
frees; before the pieces, each new sequence length kept ~0.45 MB for good."""
import sys

import pytest
import torch
from attention_cases import Features, Shape, check_backend_matches_ground_truth, make_inputs
from helpers import forced, kept_memory_mb

from attnkit.ops import flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"

CASES = [
    # B * H_kv >= 8 takes the fused backward (one task per pair), below it the split one.
    (Shape(1, 2, 1, 50, 50, 64, 64), Features()),  # 48 + 2 rows, 48 + 2 keys
    (Shape(4, 4, 2, 77, 141, 72, 40), Features(causal=True)),  # head dims off 16: K and N whole
    (Shape(2, 2, 2, 131, 200, 24, 24), Features(window=(37, 5))),  # windows start inside a panel
    (Shape(1, 1, 1, 1, 300, 64, 64), Features()),  # one query: M = 1, keys 4 x 64 + 44
    (Shape(3, 4, 4, 65, 65, 16, 16), Features(causal=True, softcap=4.0, mask="float")),
    (Shape(2, 2, 1, 129, 70, 80, 80), Features(padding=True, alibi="heads")),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CASES])
def test_remainders_match_reference(shape, features, dtype):
    with forced(OP, "cpp", "cpu", dtype):
        q, k, v, kwargs = make_inputs(shape, features, dtype, "cpu")
        check_backend_matches_ground_truth(q, k, v, kwargs, dtype, "cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_sequences_start_on_their_own_panels(dtype):
    """Each sequence's columns begin a panel: lengths 1, 70, 0, 129 and 64 packed, GQA."""
    gen = torch.Generator().manual_seed(5)
    lens_q, lens_k = [1, 70, 0, 129, 64], [3, 65, 2, 129, 100]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 40, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 40, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 24, generator=gen, dtype=dtype, requires_grad=True)
    grad = torch.randn(sum(lens_q), 4, 24, generator=gen, dtype=dtype)
    with forced(OP, "cpp", "cpu", dtype):
        out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_out, want_grads = [], [torch.zeros_like(t) for t in (q, k, v)]
    for b in range(len(lens_q)):
        sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        parts = [t[s].detach().transpose(0, 1).unsqueeze(0).double().requires_grad_() for t, s in
                 ((q, sq), (k, sk), (v, sk))]
        o, _ = ref.attention(parts[0], parts[1].repeat_interleave(2, 1), parts[2].repeat_interleave(2, 1),
                             window=(-1, 0))
        want_out.append(o[0].transpose(0, 1))
        if o.numel():
            for acc, g, s in zip(want_grads, torch.autograd.grad(o, parts, grad[sq].transpose(0, 1).unsqueeze(0)),
                                 (sq, sk, sk)):
                acc[s] += g[0].transpose(0, 1).to(dtype)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(out, torch.cat(want_out).to(dtype), rtol=tol, atol=tol)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


_STEP = """
    attnkit.set_backend("cpp", op="flash_attention")
    queries = sys.argv[1] == "one-query"
    def step(n):
        q = torch.randn(1, 2, 1 if queries else n, 64, requires_grad=not queries)
        kv = torch.randn(1, 2, n, 64, requires_grad=not queries)
        with torch.set_grad_enabled(not queries):
            out = attnkit.ops.flash_attention(q, kv, kv, causal=not queries)
            if not queries:
                out.sum().backward()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
@pytest.mark.parametrize("kind", ["train", "one-query"])
def test_new_sequence_lengths_keep_no_memory(kind):
    """128 new lengths after a warm-up over as many others: before, ~0.45 MB each (fwd+bwd)."""
    # Lengths 257..384 use every piece that 385..512 do (the same power-of-two key tiles), and more.
    growth = kept_memory_mb(_STEP, [512] + list(range(257, 385)), range(385, 513), kind)
    assert growth < 6, f"{growth:.1f} MB kept over 128 sequence lengths"
