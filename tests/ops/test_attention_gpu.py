"""Large attention cases for a GPU (`make test-gpu`): long sequences and big head
dims in bf16 against SDPA, which the interpreter cannot afford."""
import pytest
import torch
import torch.nn.functional as F
from attention_cases import assert_close

import attnkit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("n", [1024, 4096, 16384])
@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_bf16_forward_vs_sdpa(dim, n, causal):
    torch.manual_seed(0)
    batch = max(1, 16384 // n)
    q, k, v = (torch.randn(batch, 8, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with attnkit.use_backend("triton"):
        out = attnkit.ops.flash_attention(q, k, v, causal=causal)
    assert_close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal), 2e-2, "out")


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("gqa", [False, True])
def test_backward_bf16_vs_sdpa(dim, gqa):
    torch.manual_seed(0)
    n, heads, heads_kv = 2048, 8, 2 if gqa else 8
    q = torch.randn(2, heads, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, heads_kv, n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with attnkit.use_backend("triton"):
        out = attnkit.ops.flash_attention(q, k, v, causal=True)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)
    grads_expected = torch.autograd.grad(expected, leaves, grad.float())
    for g, g_e in zip(grads, grads_expected):
        assert_close(g, g_e, 5e-2, "grad")


_CONFIG_CASES = [(torch.bfloat16, 64), (torch.float16, 80), (torch.bfloat16, 128), (torch.bfloat16, 256),
                 (torch.float32, 64)]


def _every_config():
    """(dtype, dim, index) for each candidate of each case: one test each, so that
    pytest-xdist spreads their compiles over its workers (one test looping over all
    of a case's candidates took 35-45 s, and four of them ended up in a row on one
    worker of 14 at the end of the H200's suite, 2026-11-27)."""
    if not torch.cuda.is_available():
        return [pytest.param(dtype, dim, 0) for dtype, dim in _CONFIG_CASES]  # skipped: the module's mark
    from attnkit.triton_kernels.flash_attention_launch import config_count

    return [pytest.param(dtype, dim, index, id=f"{str(dtype)[6:]}-{dim}-config{index}")
            for dtype, dim in _CONFIG_CASES for index in range(config_count(dim, dtype))]


@pytest.mark.parametrize("dtype, dim, index", _every_config())
def test_every_block_config_matches_sdpa(monkeypatch, dtype, dim, index):
    """The rest of the GPU suite runs one block config (tests/conftest.py);
    the autotuner may pick any of them. Each one, forward and backward, with
    lengths off the block grid, Nq != Nk (causal, bottom-right) and GQA."""
    triton = pytest.importorskip("triton")
    from attnkit.triton_kernels import flash_attention_launch

    assert flash_attention_launch.config_count(dim, dtype) > 1
    torch.manual_seed(0)
    nq, nk, heads, heads_kv = 300, 333, 4, 2
    q = torch.randn(2, heads, nq, dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, heads_kv, nk, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, heads, nq, dim, device="cuda", dtype=dtype)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    # Bottom-right causal: query i sees keys up to i + (nk - nq).
    keep = torch.ones(nq, nk, dtype=torch.bool, device="cuda").tril(nk - nq)
    expected = F.scaled_dot_product_attention(*leaves, attn_mask=keep, enable_gqa=True)
    grads_expected = torch.autograd.grad(expected, leaves, grad.double())
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(index))
    try:
        with attnkit.use_backend("triton"):
            out = attnkit.ops.flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad)
    except triton.runtime.errors.OutOfResources:
        if index == 0:
            raise  # the default candidate must fit every GPU the kernels support
        pytest.skip(f"config {index} needs more shared memory than this GPU has: the autotuner skips it too")
    assert_close(out, expected, tolerance, f"out, config {index}")
    for name, g, g_e in zip("qkv", grads, grads_expected):
        assert_close(g, g_e, 2 * tolerance, f"d{name}, config {index}")


def test_deterministic_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with attnkit.use_backend("triton"):
        out = attnkit.ops.flash_attention(q, k, v, causal=True, deterministic=True)
        first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
        second = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("heads_kv", [1, 8, 32])
def test_decode_long_cache_bf16_vs_reference(heads_kv):
    torch.manual_seed(0)
    q = torch.randn(4, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(4, heads_kv, 16384, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.tensor([16384, 1, 9000, 4097], dtype=torch.int32, device="cuda")
    with attnkit.use_backend("triton"):
        out = attnkit.ops.attention_decode(q, k, v, lengths)
    from attnkit.reference import attention as ref

    assert_close(out, ref.decode(q.float(), k.float(), v.float(), lengths)[0], 2e-2, "out")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the warp-specialized forward needs sm_90")
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialized_forward_every_config_vs_sdpa(monkeypatch, dim, causal):
    from attnkit.triton_kernels import flash_attention_ws

    torch.manual_seed(0)
    nq, nk = 300, 333  # partial blocks, bottom-right causal
    q = torch.randn(2, 4, nq, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, nk, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = torch.ones(nq, nk, dtype=torch.bool, device="cuda").tril(nk - nq) if causal else None
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep, enable_gqa=True)
    calls = []
    real = flash_attention_ws.forward
    monkeypatch.setattr(flash_attention_ws, "forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv("ATTNKIT_TRITON_WS", "1")
    for index in range(len(flash_attention_ws.WS_SHAPES)):
        monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(index))
        with attnkit.use_backend("triton"):
            out = attnkit.ops.flash_attention(q, k, v, causal=causal)
        assert_close(out, expected, 2e-2, f"out, config {index}")
    assert len(calls) == len(flash_attention_ws.WS_SHAPES)
