"""Offsets past 2^31 elements: a tensor (or mask) whose batch b starts beyond int32's range.
The Triton kernels computed b * stride in int32, which wrapped to an address before the tensor
(reads of other memory, stores into it). The views here reach those offsets in a storage of
which only the touched pages are ever committed."""
import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, forced

from attnkit.ops import flash_attention, flash_attention_varlen

OP = "flash_attention"
BACKENDS = backend_params(OP)
BATCH_STRIDE = 3 * 2**29  # batch 2 starts at 3 * 2^30 elements: -2^30 as int32


def far_apart(storage_dtype, shape, device, fill=None, generator=None):
    """A (3, ...) view whose batches lie BATCH_STRIDE elements apart."""
    inner = torch.Size(shape[1:]).numel()
    storage = torch.empty(2 * BATCH_STRIDE + inner, dtype=storage_dtype, device=device)
    strides = (BATCH_STRIDE,) + torch.empty(shape[1:]).stride()
    view = storage.as_strided(shape, strides)
    if fill is None:
        view.copy_(torch.randn(shape, generator=generator).to(storage_dtype))
    else:
        view.fill_(fill)
    return view


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_queries_and_mask_past_2_to_the_31_elements(backend, device):
    with forced(OP, backend, device, torch.float16) as dev:
        gen = torch.Generator().manual_seed(0)
        shape = (3, 2, 16, 16)
        q = far_apart(torch.float16, shape, dev, generator=gen).requires_grad_()
        mask = far_apart(torch.bool, (3, 1, 16, 16), dev, fill=True)
        mask[:, :, :, 12:] = False
        k, v = (torch.randn(shape, generator=gen).to(dev, torch.float16).requires_grad_() for _ in range(2))
        grad = torch.randn(shape, generator=gen).to(dev, torch.float16)
        out = flash_attention(q, k, v, attn_mask=mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        leaves = [t.detach().float().contiguous().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, attn_mask=mask.contiguous())
        ref_grads = torch.autograd.grad(ref, leaves, grad.float())
        for got, want in zip((out, dq, dk, dv), (ref, *ref_grads)):
            torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_rows_and_packed_rows_past_2_to_the_31_elements(backend, device):
    """Inside one head too: a mask row whose offset Nq * stride passes 2^31 (a sliding-window
    model's (B, 1, 64k, 64k) mask), and packed rows of a varlen batch that far apart."""
    with forced(OP, backend, device, torch.float16) as dev:
        gen = torch.Generator().manual_seed(1)
        rows = torch.empty(20 * 2**27, dtype=torch.float16, device=dev)
        q = rows.as_strided((20, 2, 16), (2**27, 16, 1))  # row 16 starts at 2^31
        q.copy_(torch.randn(20, 2, 16, generator=gen))
        k, v = (torch.randn(20, 2, 16, generator=gen).to(dev, torch.float16) for _ in range(2))
        cu = torch.tensor([0, 9, 20], dtype=torch.int32, device=dev)
        out = flash_attention_varlen(q, k, v, cu, cu, 11, 11, causal=True)
        expected = torch.cat([F.scaled_dot_product_attention(*(t[s:e].float().transpose(0, 1) for t in (q, k, v)),
                                                             is_causal=True).transpose(0, 1)
                              for s, e in ((0, 9), (9, 20))])
        torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)

        mask_rows = torch.ones(16 * 2**28, dtype=torch.bool, device=dev)
        mask = mask_rows.as_strided((1, 1, 16, 16), (0, 0, 2**28, 1))  # row 8 starts at 2^31
        mask[0, 0, :, 10:] = False
        q, k, v = (torch.randn(1, 2, 16, 16, generator=gen).to(dev, torch.float16) for _ in range(3))
        out = flash_attention(q, k, v, attn_mask=mask)
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.contiguous())
        torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rows_of_one_head_past_2_to_the_31_elements(backend, device):
    """Within one head: row i of a (B, N, H, D) view sits at i * H * D, past 2^31 from 512k tokens
    at H * D = 4096. Rows 2^27 elements apart put row 16 there; forward and backward read them."""
    with forced(OP, backend, device, torch.float16) as dev:
        gen = torch.Generator().manual_seed(2)
        shape, strides = (1, 2, 20, 16), (20 * 2**27, 16, 2**27, 1)
        q, k, v = (torch.empty(20 * 2**27, dtype=torch.float16, device=dev).as_strided(shape, strides)
                   for _ in range(3))
        for t in (q, k, v):
            t.copy_(torch.randn(shape, generator=gen))
            t.requires_grad_()
        grad = torch.randn(shape, generator=gen).to(dev, torch.float16)
        out = flash_attention(q, k, v, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        leaves = [t.detach().float().contiguous().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*leaves, is_causal=True)
        ref_grads = torch.autograd.grad(ref, leaves, grad.float())
        for got, want in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_2_gib_apart(backend, device, dtype):
    """Query rows 2^31 bytes apart or more (a BLAS leading dimension past int, a brgemm stride
    past its int bytes): the cpp backend threw bad_alloc in float32 and, in float64, MKL refused
    the GEMM and left its scores unwritten (output 0.2-0.8 off). A single row's stride, whatever
    it is, never reaches a GEMM."""
    with forced(OP, backend, device, dtype) as dev:
        gen = torch.Generator().manual_seed(3)
        apart = 2**31 // torch.finfo(dtype).bits * 8  # elements in 2^31 bytes
        q = torch.empty(2 * apart + 8, dtype=dtype, device=dev).as_strided((1, 1, 3, 8), (0, 0, apart, 1))
        q.copy_(torch.randn(1, 1, 3, 8, generator=gen))
        single = torch.randn(8, generator=gen).to(dev, dtype).as_strided((1, 1, 1, 8), (1, 1, 2**32 + 1, 1))
        k, v = (torch.randn(1, 1, 5, 8, generator=gen).to(dev, dtype) for _ in range(2))
        for query in (q, single):
            query.requires_grad_()
            out = flash_attention(query, k, v)
            grads = torch.autograd.grad(out.square().sum(), query)
            ref_query = query.detach().contiguous().double().requires_grad_()
            ref = F.scaled_dot_product_attention(ref_query, k.double(), v.double())
            ref_grads = torch.autograd.grad(ref.square().sum(), ref_query)
            for got, want in zip((out, *grads), (ref, *ref_grads)):
                torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
