"""flash_attention features beyond the shared cases: dropout (Philox, reproducible,
same mask in the backward), varlen packed batches, torch.compile and opcheck."""
import pytest
import torch
from attention_cases import Features, Shape, assert_close, ground_truth, make_inputs
from helpers import backend_params, forced

import attnkit
from attnkit.ops import flash_attention, flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"
BACKENDS = backend_params(OP)


def test_reference_philox_matches_triton_randint():
    """The reference's Philox reproduces tl.randint bit for bit (so every backend draws one mask)."""
    pytest.importorskip("triton")
    if not attnkit.available_backends()["triton"].available:
        pytest.skip(attnkit.available_backends()["triton"].reason)
    from attnkit.triton_kernels import flash_attention_launch as launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (0, 12345 << 20, (1 << 40) - 3):
        expected = ref.dropout_keep_mask(seed, 2, 3, 19, 37, 0.3, device)
        assert torch.equal(launch.dropout_keep_mask(2, 3, 19, 37, 0.3, seed, device), expected)
    keep = ref.dropout_keep_mask(7, 4, 4, 64, 64, 0.25)
    assert abs(1 - keep.float().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_the_same_mask(backend, device, causal):
    shape, features = Shape(2, 4, 2, 17, 23, 32, 32), Features(causal=causal)
    with forced(OP, backend, device) as dev:
        q, k, v, kwargs = make_inputs(shape, features, torch.float32, dev)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        gen = torch.Generator(device="cpu").manual_seed(5)
        out = flash_attention(*leaves, **kwargs, dropout_p=0.3, generator=gen)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
        gen.manual_seed(5)
        out_again = flash_attention(*leaves, **kwargs, dropout_p=0.3, generator=gen)
    assert torch.equal(out, out_again), "same generator state, same dropout mask"
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(5))) << 20
    keep = ref.dropout_keep_mask(seed, 2, 4, 17, 23, 0.3, q.device)
    out_t, _, grads_t = ground_truth(q, k, v, kwargs, grad_out, dropout_p=0.3, dropout_keep=keep)
    assert_close(out, out_t, 1e-4, "out")
    for g, g_t in zip(grads, grads_t):
        assert_close(g, g_t, 4e-4, "grad")
    plain = flash_attention(q, k, v, **kwargs)
    assert not torch.allclose(out, plain), "dropout changed nothing"


def test_dropout_uses_torch_manual_seed():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with attnkit.use_backend("reference"):
        torch.manual_seed(3)
        a = flash_attention(q, k, v, dropout_p=0.5)
        b = flash_attention(q, k, v, dropout_p=0.5)
        torch.manual_seed(3)
        c = flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)


def pack(lengths, heads, dim, dtype, device, gen):
    total = sum(lengths)
    packed = torch.randn(total, heads, dim, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return packed, cu


VARLEN_CASES = [
    dict(lengths_q=[5, 1, 17], lengths_k=[5, 1, 17], heads=2, heads_kv=2, dim=16, kwargs={}),
    dict(lengths_q=[3, 17, 8], lengths_k=[9, 17, 4], heads=4, heads_kv=2, dim=32, kwargs=dict(causal=True)),
    dict(lengths_q=[20, 0, 7], lengths_k=[16, 5, 7], heads=2, heads_kv=1, dim=80, kwargs=dict(window_size=(4, 2))),
    dict(lengths_q=[33, 12], lengths_k=[33, 40], heads=2, heads_kv=2, dim=24, kwargs=dict(softcap=2.0, causal=True)),
    dict(lengths_q=[7, 12], lengths_k=[9, 12], heads=2, heads_kv=2, dim=16, kwargs=dict(alibi_slopes=torch.tensor([0.5, 0.25]))),
    dict(lengths_q=[4, 9, 1], lengths_k=[6, 9, 11], heads=2, heads_kv=1, dim=16,
         kwargs=dict(causal=True, rotary_cos=torch.rand(32, 6), rotary_sin=torch.rand(32, 6), rotary_interleaved=True,
                     rotary_seqlen_offsets=torch.tensor([2, 0, 5], dtype=torch.int32))),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"{c['lengths_q']}x{c['lengths_k']}-{'+'.join(c['kwargs']) or 'plain'}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_varlen_matches_dense_per_sequence(backend, device, case, dropout_p):
    gen = torch.Generator().manual_seed(11)
    with forced(OP, backend, device, rotary="rotary_cos" in case["kwargs"]) as dev:
        q, cu_q = pack(case["lengths_q"], case["heads"], case["dim"], torch.float32, dev, gen)
        k, cu_k = pack(case["lengths_k"], case["heads_kv"], case["dim"], torch.float32, dev, gen)
        v, _ = pack(case["lengths_k"], case["heads_kv"], case["dim"], torch.float32, dev, gen)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        max_q, max_k = max(case["lengths_q"]), max(case["lengths_k"])
        drop_gen = torch.Generator().manual_seed(9)
        kwargs = {key: value.to(dev) if torch.is_tensor(value) else value for key, value in case["kwargs"].items()}
        out, lse = flash_attention_varlen(*leaves, cu_q, cu_k, max_q, max_k, **kwargs, dropout_p=dropout_p,
                                          generator=drop_gen, return_lse=True)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert out.shape == q.shape and lse.shape == (case["heads"], q.shape[0])
    keep = None
    if dropout_p:
        seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(9))) << 20
        keep = ref.dropout_keep_mask(seed, len(case["lengths_q"]), case["heads"], max_q, max_k, dropout_p, q.device)
    outs, lses, grad_parts = [], [], []
    for b, (q_b, k_b, v_b, do_b) in enumerate(zip(ref.split_varlen(q, cu_q), ref.split_varlen(k, cu_k),
                                                   ref.split_varlen(v, cu_k), ref.split_varlen(grad_out, cu_q))):
        keep_b = None if keep is None else keep[b : b + 1, :, : q_b.shape[2], : k_b.shape[2]]
        kwargs_b = dict(kwargs)
        if torch.is_tensor(kwargs.get("rotary_seqlen_offsets")):
            kwargs_b["rotary_seqlen_offsets"] = kwargs["rotary_seqlen_offsets"][b]
        o, l, g = ground_truth(q_b, k_b, v_b, kwargs_b, do_b, dropout_p=dropout_p, dropout_keep=keep_b)
        outs.append(o)
        lses.append(l.squeeze(0))
        grad_parts.append(g)
    assert_close(out, ref.join_varlen(outs), 1e-4, "out")
    assert_close(lse, torch.cat(lses, dim=1), 1e-4, "lse")
    for i, name in enumerate("qkv"):
        assert_close(grads[i], ref.join_varlen([g[i] for g in grad_parts]), 4e-4, f"d{name}")


@pytest.mark.parametrize("backend", ["reference"])
def test_opcheck(backend):
    q, k, v, kwargs = make_inputs(Shape(1, 2, 1, 5, 7, 8, 8), Features(causal=True, mask="float"), torch.float32, "cpu")
    q.requires_grad_(True)
    mask = kwargs["attn_mask"].expand(1, 2, 5, 7)
    with attnkit.use_backend(backend):
        args = (q, k, v, None, None, 5, 7, mask, None, -1, 0, True, 0.0, 0.35, 0.0, None, torch.rand(1, 2), None, None, None, False)
        torch.library.opcheck(torch.ops.attnkit.attention_forward.default, args)


def test_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    q, k, v, kwargs = make_inputs(Shape(2, 2, 1, 9, 9, 16, 16), Features(causal=True, padding=True), torch.float32, "cpu")
    leaves = [t.requires_grad_(True) for t in (q, k, v)]

    def attend(q, k, v, key_padding_mask):
        return flash_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask).square().sum()

    with attnkit.use_backend("reference"):
        loss = torch.compile(attend, fullgraph=True, backend="aot_eager")(*leaves, kwargs["key_padding_mask"])
        grads = torch.autograd.grad(loss, leaves)
        loss_eager = attend(*leaves, kwargs["key_padding_mask"])
        grads_eager = torch.autograd.grad(loss_eager, leaves)
    torch.testing.assert_close(loss, loss_eager)
    for g, g_e in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_e)


def test_explain_on_cpu_says_why_each_backend_was_skipped():
    q = torch.randn(1, 1, 4, 16)
    decision = attnkit.explain("flash_attention", q, q, q)
    expected = "cpp" if attnkit.available_backends()["cpp"].available else "reference"
    assert decision.backend == expected
    assert all(decision.skipped[name] for name in attnkit.BACKENDS if name != expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_window_side_past_any_length_is_unbounded(backend, device):
    """window_size=(-1, sys.maxsize) overflowed the cpp kernel's key ranges: every output was 0;
    (2**63, 0) did not fit its int64 argument. Sides that no sequence reaches mean -1."""
    import sys

    with forced(OP, backend, device, torch.float32) as dev:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 8, generator=gen).to(dev) for n in (5, 7, 7))
        for window, same_as in (((-1, sys.maxsize), (-1, -1)), ((sys.maxsize, sys.maxsize), (-1, -1)),
                                ((2**63, 0), (-1, 0))):
            got = flash_attention(q, k, v, window_size=window)
            torch.testing.assert_close(got, flash_attention(q, k, v, window_size=same_as))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("softcap", [1e4, 1e8])
def test_a_large_softcap_is_no_cap(backend, device, softcap):
    """Triton's tanh, 2 * sigmoid(2x) - 1, cancelled for small arguments: a softcap of 1e4 was
    off by 4e-4 and one of 1e8 (a user switching capping off) zeroed every score. The decode
    kernel shared it."""
    with forced(OP, backend, device) as dev:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(dev).requires_grad_() for n in (5, 7, 7))
        got = flash_attention(q, k, v, causal=True, softcap=softcap)
        want = flash_attention(q, k, v, causal=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        lengths = torch.tensor([7], dtype=torch.int32, device=dev)
        with attnkit.use_backend(backend, op="attention_decode"):
            step = attnkit.ops.attention_decode(q[:, :, :1].detach(), k.detach(), v.detach(), lengths, softcap=softcap)
            plain = attnkit.ops.attention_decode(q[:, :, :1].detach(), k.detach(), v.detach(), lengths)
        torch.testing.assert_close(step, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_leaves_the_kernels_in_their_inputs_dtype(backend, device):
    """flash_attention (dense, varlen) computes in its inputs' dtype under autocast: the
    reference backend's plain-PyTorch matmuls took autocast's bfloat16 (errors 6e-3 in float32)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    lengths = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]

    def run():
        out = flash_attention(q, k, v, causal=True)
        packed_out = flash_attention_varlen(*packed, lengths, lengths, 12, 12)
        grads = torch.autograd.grad(out.square().sum() + packed_out.square().sum(), [q, *packed])
        return out, packed_out, *grads

    with forced(OP, backend, device):
        plain = run()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            under_autocast = run()
    for got, want in zip(under_autocast, plain):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
