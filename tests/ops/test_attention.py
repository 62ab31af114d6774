"""attnkit.ops.flash_attention on every backend against the float64 reference
(values, log-sum-exp and gradients), and against SDPA where SDPA has the feature.
Triton runs here on CPU tensors under TRITON_INTERPRET=1."""
import pytest
import torch
import torch.nn.functional as F
from attention_cases import Shape, Features, assert_close, case_params, ground_truth, make_inputs
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, backend_params, forced

import attnkit
from attnkit.ops import flash_attention, flash_attention_varlen
from attnkit.reference import attention as ref

OP = "flash_attention"
BACKENDS = backend_params(OP)
TOL = ATTENTION_TOL  # tests/helpers.py: every tolerance in one place


def run(q, k, v, kwargs, grad_out, **extra):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attention(*leaves, **kwargs, **extra, return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, lse, grads


def check_against_truth(q, k, v, kwargs, dtype, **extra):
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64).to(dtype=dtype, device=q.device)
    out, lse, grads = run(q, k, v, kwargs, grad_out, **extra)
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, out_t, TOL[dtype], "out")
    assert_close(lse, lse_t, TOL[dtype], "lse")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,features", case_params())
def test_matches_reference_fp32(backend, device, shape, features):
    with forced(OP, backend, device, rotary=bool(features.rotary)) as dev:
        q, k, v, kwargs = make_inputs(shape, features, torch.float32, dev)
        check_against_truth(q, k, v, kwargs, torch.float32)
        assert attnkit.last_dispatch(OP).backend == backend


HALF_CASES = [
    (Shape(2, 2, 1, 33, 40, 64, 64), Features(causal=True)),
    (Shape(1, 2, 2, 17, 17, 80, 80), Features(softcap=4.0, padding=True)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in HALF_CASES])
def test_half_precision(backend, device, dtype, shape, features):
    with forced(OP, backend, device, dtype) as dev:
        q, k, v, kwargs = make_inputs(shape, features, dtype, dev)
        check_against_truth(q, k, v, kwargs, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float64_takes_a_scale_that_float32_cannot_hold(backend, device):
    """0.3 and log2(e) are not float32 numbers: the Triton kernels took the scale as a float32
    argument and multiplied by log2(e) in float32, 3e-8 off in float64 (2026-11-27 audit)."""
    shape, features = Shape(1, 2, 2, 20, 23, 16, 16), Features(causal=True, scale=0.3)
    with forced(OP, backend, device, torch.float64) as dev:
        q, k, v, kwargs = make_inputs(shape, features, torch.float64, dev)
        check_against_truth(q, k, v, kwargs, torch.float64)


def _launch_with_descriptors():
    """flash_attention_launch, skipping the test where this Triton has no host tensor descriptors."""
    launch = pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")
    if launch.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    return launch


def _check_through_descriptors(launch, dtype, shape, features):
    """check_against_truth on the Triton backend with the TMA path forced (features.extra as kwargs)."""
    with forced(OP, "triton", "cpu", dtype) as dev, launch.tma_forced():
        q, k, v, kwargs = make_inputs(shape, features, dtype, dev)
        check_against_truth(q, k, v, dict(kwargs, **features.extra), dtype)


# The TMA candidates (K and V through tensor descriptors in the forward and dQ, Q and
# dO in dK/dV) run on an sm_90 GPU; tma_forced() takes that path anywhere, the interpreter included.
TMA_CASES = [
    (Shape(2, 4, 2, 33, 47, 64, 64), Features(causal=True)),  # GQA, Nq != Nk, partial blocks
    (Shape(1, 2, 2, 17, 17, 80, 80), Features(padding=True, pad_whole_sequence=True)),  # D padded to 128
    (Shape(2, 2, 1, 1, 20, 32, 48), Features(window=(5, 3), softcap=4.0)),  # one query row, Dv != D
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in TMA_CASES])
def test_forward_and_backward_through_tensor_descriptors(monkeypatch, dtype, shape, features):
    launch = _launch_with_descriptors()
    described = []
    real = launch._tma_descriptors
    monkeypatch.setattr(launch, "_tma_descriptors", lambda *a: described.append(real(*a)) or described[-1])
    _check_through_descriptors(launch, dtype, shape, features)
    # The forward, dK/dV and dQ took the TMA path.
    assert len(described) == 3 and all(d is not None for d in described)


# The opt-in warp-specialized forward (ATTNKIT_TRITON_WS=1, flash_attention_ws) for plain dense
# calls; its gradients come from the general backward, through the lse it saves.
WS_CASES = [
    (Shape(2, 4, 2, 33, 47, 64, 64), Features(causal=True)),  # GQA, Nq != Nk, partial blocks
    (Shape(1, 2, 2, 50, 29, 32, 32), Features(causal=True)),  # Nq > Nk: rows that see no key
    (Shape(2, 2, 1, 17, 40, 64, 64), Features()),
    (Shape(1, 2, 2, 21, 21, 16, 16), Features(causal=True, extra=dict(causal_alignment="top_left"))),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in WS_CASES])
def test_warp_specialized_forward(monkeypatch, dtype, shape, features):
    launch = _launch_with_descriptors()
    from attnkit.triton_kernels import flash_attention_ws

    calls = []
    real = flash_attention_ws.forward
    monkeypatch.setattr(flash_attention_ws, "forward", lambda *a, **kw: calls.append(a[7]) or real(*a, **kw))
    monkeypatch.setenv("ATTNKIT_TRITON_WS", "1")
    _check_through_descriptors(launch, dtype, shape, features)
    assert calls == [features.causal]  # the forward took it, once


def test_warp_specialized_forward_only_where_asked_and_plain():
    launch = _launch_with_descriptors()
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)

    def eligible(q=q, **kwargs):
        call = dict(dict(cu_q=None, cu_k=None, max_q=8, max_k=8, mask=None, pad=None, bottom_right=True, window=(-1, 0),
                         softcap=0.0, scale=0.125, dropout_p=0.0, seed=0, alibi_slopes=None, rotary=None), **kwargs)
        c = launch._common(q, q, q, *call.values())
        return launch.ws_eligible(q, c, launch._tma_descriptors(q, q, c))

    with launch.tma_forced():
        assert not eligible()  # not asked for
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ATTNKIT_TRITON_WS", "1")
            assert eligible() and eligible(window=(-1, -1))
            assert not eligible(window=(4, 0)) and not eligible(softcap=2.0) and not eligible(dropout_p=0.1)
            assert not eligible(pad=torch.zeros(1, 8, dtype=torch.uint8))
            assert not eligible(mask=torch.ones(1, 1, 8, 8, dtype=torch.uint8))
            assert not eligible(alibi_slopes=torch.ones(2))
            assert not eligible(q=torch.randn(1, 2, 8, 80, dtype=torch.float16))  # D not a power of two
            assert not eligible(q=q.float())  # no descriptors for 4-byte types
            mp.setattr(launch, "_WS_SUPPORTED", False)  # a Triton whose tl.range has no warp_specialize
            assert not eligible()


def test_tensor_descriptors_only_where_tma_can_serve():
    """Varlen, fused RoPE, 4-byte types and strides that are not multiples of 16
    bytes keep the pointer loads."""
    launch = _launch_with_descriptors()
    k = torch.randn(2, 2, 8, 64, dtype=torch.float16)
    plain = dict(varlen=False, flags=dict(ROTARY_DIM=0, BLOCK_D=64, BLOCK_DV=64))
    with launch.tma_forced():
        assert launch._tma_descriptors(k, k, plain) is not None
        assert launch._tma_descriptors(k, k, dict(plain, varlen=True)) is None
        assert launch._tma_descriptors(k, k, dict(plain, flags=dict(plain["flags"], ROTARY_DIM=64))) is None
        assert launch._tma_descriptors(k.float(), k.float(), plain) is None
        odd = torch.randn(2, 2, 8, 68, dtype=torch.float16)[..., :64]  # rows 136 bytes apart
        assert launch._tma_descriptors(odd, odd, plain) is None
    assert launch._tma_descriptors(k, k, plain) is None  # CPU tensors, not forced


GRADCHECK_CASES = [
    (Shape(1, 2, 1, 3, 5, 4, 3), Features(causal=True)),
    (Shape(2, 1, 1, 4, 4, 3, 3), Features(softcap=1.5, mask="float")),
    (Shape(2, 2, 2, 5, 3, 2, 2), Features(window=(1, 1), padding=True, pad_whole_sequence=True)),
    (Shape(2, 1, 1, 2, 3, 4, 4), Features(rotary="partial", causal=True)),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in GRADCHECK_CASES])
def test_gradcheck_float64(backend, device, shape, features):
    with forced(OP, backend, device, torch.float64, rotary=bool(features.rotary)) as dev:
        q, k, v, kwargs = make_inputs(shape, features, torch.float64, dev)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        # The interpreter is slow: Triton gets gradcheck's fast mode (random projections), the others the full one.
        assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, **kwargs), leaves,
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_masked_rows_give_zero_output_and_gradient(backend, device):
    with forced(OP, backend, device) as dev:
        q, k, v = (torch.randn(1, 2, 6, 16, device=dev, requires_grad=True) for _ in range(3))
        mask = torch.ones(6, 6, dtype=torch.bool, device=dev)
        mask[2] = False  # query row 2 sees no key
        out, lse = flash_attention(q, k, v, attn_mask=mask, return_lse=True)
        (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(dq[:, :, 2], torch.zeros_like(dq[:, :, 2]))
    assert torch.isinf(lse[:, :, 2]).all() and (lse[:, :, 2] < 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_dropin_matches_sdpa(backend, device, is_causal, gqa):
    """attnkit.scaled_dot_product_attention vs F.scaled_dot_product_attention:
    top-left causal with Nq != Nk, GQA, custom scale, gradients."""
    with forced(OP, backend, device) as dev:
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(2, 4, 9, 32, generator=gen).to(dev).requires_grad_(True)
        k = torch.randn(2, 2 if gqa else 4, 13, 32, generator=gen).to(dev).requires_grad_(True)
        v = torch.randn(2, 2 if gqa else 4, 13, 24, generator=gen).to(dev).requires_grad_(True)
        args = dict(is_causal=is_causal, scale=0.2, enable_gqa=gqa)
        out = attnkit.scaled_dot_product_attention(q, k, v, **args)
        grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    expected = F.scaled_dot_product_attention(q, k, v, **args)
    grads_expected = torch.autograd.grad(expected.square().sum(), [q, k, v])
    assert_close(out, expected, 1e-4, "out")
    for g, g_e in zip(grads, grads_expected):
        assert_close(g, g_e, 4e-4, "grad")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool-3d"])
def test_dropin_masks_match_sdpa(backend, device, mask_kind):
    with forced(OP, backend, device) as dev:
        gen = torch.Generator().manual_seed(2)
        if mask_kind == "bool-3d":  # (N, L, E) inputs with an (N, L, S) mask
            q, k, v = (torch.randn(3, 11, 16, generator=gen).to(dev) for _ in range(3))
            mask = torch.rand(3, 11, 11, generator=gen).to(dev) > 0.4
            mask[..., 0] = True  # SDPA gives NaN on fully masked rows; keep every row alive here
        else:
            q, k, v = (torch.randn(2, 2, 11, 16, generator=gen).to(dev) for _ in range(3))
            mask = torch.rand(11, 11, generator=gen).to(dev)
            if mask_kind == "bool":
                mask = mask > 0.4
                mask[:, 0] = True
        out = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1e-4, "out")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_queries_with_no_keys_at_all(backend, device):
    """Nk = 0 (dense), and a varlen sequence with queries but no keys: empty rows (0, lse -inf,
    gradient 0). The reference raised IndexError here (amax over an empty dim)."""
    with forced(OP, backend, device) as dev:
        q = torch.randn(1, 2, 3, 8, device=dev, requires_grad=True)
        empty = torch.randn(1, 2, 0, 8, device=dev, requires_grad=True)
        out, lse = flash_attention(q, empty, empty, return_lse=True)
        (dq,) = torch.autograd.grad(out.sum(), [q])
        cu_q = torch.tensor([0, 2, 5], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 0, 4], dtype=torch.int32, device=dev)  # sequence 0 has no keys
        packed_q = torch.randn(5, 2, 8, device=dev, requires_grad=True)
        packed_kv = torch.randn(4, 2, 8, device=dev)
        out_v, lse_v = flash_attention_varlen(packed_q, packed_kv, packed_kv, cu_q, cu_k, 3, 4, return_lse=True)
        (dq_v,) = torch.autograd.grad(out_v.sum(), [packed_q])
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
    assert torch.isinf(lse).all() and (lse < 0).all()
    assert torch.equal(out_v[:2], torch.zeros_like(out_v[:2])) and torch.equal(dq_v[:2], torch.zeros_like(dq_v[:2]))
    assert torch.isneginf(lse_v[:, :2]).all() and torch.isfinite(lse_v[:, 2:]).all()
    expected, _ = ref.attention(packed_q[2:].detach().transpose(0, 1)[None].double(),
                                *(packed_kv.transpose(0, 1)[None].double(),) * 2)
    assert_close(out_v[2:], expected[0].transpose(0, 1), 1e-4, "out of the sequence with keys")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen_cu_seqlens_may_be_strided_views(backend, device):
    """Columns of one (B + 1, 2) table: Triton read cu_seqlens as contiguous (values off by 1e9
    and more); cpp and the reference were right."""
    with forced(OP, backend, device) as dev:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, 2, 16, generator=gen).to(dev).requires_grad_() for n in (7, 11, 11))
        table = torch.tensor([[0, 0], [3, 5], [3, 7], [7, 11]], dtype=torch.int32, device=dev)
        got = flash_attention_varlen(q, k, v, table[:, 0], table[:, 1], 4, 5, causal=True)
        want = flash_attention_varlen(q, k, v, table[:, 0].contiguous(), table[:, 1].contiguous(), 4, 5, causal=True)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), q), torch.autograd.grad(want.sum(), q))
