"""Masks at the edges of what the kernels see: additive biases near float's limit (the
finfo(dtype).min padding transformers builds), empty calls with broadcast float masks, and the
gradient of a half-precision learned bias summed over its broadcast dims."""
import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, forced

from attnkit.ops import flash_attention

OP = "flash_attention"
BACKENDS = backend_params(OP)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_under_a_huge_negative_bias_are_still_a_softmax(backend, device, dtype):
    """A row whose keys all carry finfo(dtype).min is the softmax of equal scores (SDPA's mean
    of v), not 0 or NaN: the bf16 CPU tiles scaled it by log2(e) before subtracting the row
    max (-inf - -inf), Triton overflowed it to -inf, a hidden key. Rows before and after it
    and the gradients stay finite."""
    with forced(OP, backend, device, dtype) as dev:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 2, 5, 16, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = torch.zeros(2, 1, 5, 5, device=dev, dtype=dtype)
        mask[0, :, 1] = torch.finfo(dtype).min  # a query that sees only padding
        mask[1, :, :, 3:] = torch.finfo(dtype).min  # padded keys
        mask[1, :, 4, 2] = -1e4
        out, lse = flash_attention(q, k, v, attn_mask=mask, return_lse=True)
        out.float().square().sum().backward()
    expected = F.scaled_dot_product_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                                              attn_mask=mask.double())
    torch.testing.assert_close(out.double(), expected, atol=5e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    assert torch.isfinite(lse).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape_q,shape_k,mask_shape", [
    ((2, 2, 3, 8), (2, 2, 0, 8), (3, 1)),  # no keys
    ((2, 2, 0, 8), (2, 2, 4, 8), (1, 4)),  # no queries
    ((0, 2, 3, 8), (0, 2, 4, 8), (3, 4)),  # no batch
])
def test_empty_calls_with_a_broadcast_learned_bias(backend, device, shape_q, shape_k, mask_shape):
    """Empty outputs and a zero bias gradient (cpp narrowed a broadcast dim of size 0, and its
    backward took an empty mask for no mask)."""
    with forced(OP, backend, device) as dev:
        q = torch.randn(shape_q, device=dev, requires_grad=True)
        k, v = (torch.randn(shape_k, device=dev, requires_grad=True) for _ in range(2))
        bias = torch.randn(mask_shape, device=dev, requires_grad=True)
        out = flash_attention(q, k, v, attn_mask=bias)
        out.sum().backward()
    assert out.shape == shape_q and not out.abs().sum()
    assert bias.grad.shape == mask_shape and not bias.grad.abs().sum()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_bias_gradient_is_summed_in_float32(backend, device, dtype):
    """A bias broadcast over batch and heads: its gradient is the float32 sum over them rounded
    once (as SDPA's), the same as a float32 copy's rounded, not a sum of rounded elements."""
    with forced(OP, backend, device, dtype) as dev:
        torch.manual_seed(0)
        q, k, v = (torch.randn(4, 8, 24, 16, device=dev, dtype=dtype) for _ in range(3))
        bias = torch.randn(1, 1, 24, 24, device=dev, dtype=dtype, requires_grad=True)
        bias32 = bias.detach().float().requires_grad_()
        for mask in (bias, bias32):
            flash_attention(q, k, v, attn_mask=mask).float().square().sum().backward()
    assert bias.grad.dtype == dtype
    assert torch.equal(bias.grad, bias32.grad.to(dtype))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_huge_positive_finite_bias_is_a_softmax_as_sdpa(backend, device):
    """An additive mask entry above 2e38 (finite in float32) went to +inf in Triton's base-2
    scores, and the row to NaN (inf - inf); SDPA gives that key the row's whole weight."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen).to(device).requires_grad_() for _ in range(3))
    mask = torch.zeros(1, 1, 3, 3, device=device)
    mask[0, 0, 0, 1], mask[0, 0, 1, 2] = 3e38, 2.5e38
    with forced(OP, backend, device):
        out = flash_attention(q, k, v, attn_mask=mask)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
