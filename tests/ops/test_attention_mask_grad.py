"""The gradient of an additive (float) attn_mask: a learned bias such as T5's or Swin's
relative position bias, trained through flash_attention / scaled_dot_product_attention.
Every backend against autograd through the float64 reference, plus gradcheck."""
import pytest
import torch
import torch.nn.functional as F
from attention_cases import Features, Shape, assert_close, make_inputs, reference_options, rotated
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, backend_params, forced

import attnkit
from attnkit.ops import flash_attention
from attnkit.reference import attention as ref

OP = "flash_attention"
BACKENDS = backend_params(OP)

S = Shape
# (shape, features, mask shape): the mask broadcasts from its own shape to (B, H, Nq, Nk), and its
# gradient is summed back to that shape.
CASES = [
    (S(2, 2, 2, 17, 23, 16, 16), Features(), (2, 2, 17, 23)),
    # Shared over the batch (a per-head bias), GQA, causal: the tiles no query visits stay 0.
    (S(2, 4, 2, 17, 29, 16, 16), Features(causal=True), (1, 4, 17, 29)),
    # One query, D = 80, soft-capping (the bias is added after the cap), a bias over keys only.
    (S(1, 2, 2, 1, 33, 80, 80), Features(softcap=2.0), (33,)),
    # Nq > Nk, bottom-right causal: the first rows see no key; one batch entry entirely padding.
    (S(2, 2, 1, 33, 17, 16, 16), Features(causal=True, padding=True, pad_whole_sequence=True), (2, 1, 33, 17)),
    (S(1, 2, 2, 40, 40, 32, 32), Features(window=(3, 2), alibi="heads"), (2, 40, 40)),
    (S(2, 2, 2, 20, 24, 16, 16), Features(rotary="half"), (1, 1, 20, 24)),
    # Several blocks per side (16 under the interpreter): unchecked tiles beside checked ones.
    (S(1, 2, 2, 70, 50, 16, 16), Features(softcap=3.0), (2, 70, 50)),
]


def _case_id(case):
    shape, features, mask_shape = case
    return f"{shape}-{features}-mask{'x'.join(map(str, mask_shape))}"


def _bias(mask_shape, dtype, device, seed=0, masked_row=False):
    gen = torch.Generator().manual_seed(seed)
    bias = torch.randn(mask_shape, generator=gen, dtype=torch.float64)
    if masked_row and len(mask_shape) >= 2:
        bias[..., 1, :] = float("-inf")  # a query row the mask hides entirely: output 0, gradient 0
    return bias.to(dtype=dtype, device=device)


def _ground_truth(q, k, v, bias, kwargs, grad_out):
    """(out, (dq, dk, dv, d_bias)) in float64 by autograd through the reference."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    q_used, k_used = rotated(leaves[0], leaves[1], kwargs)
    options = reference_options(kwargs)
    options["attn_mask"] = leaves[3].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, _ = ref.attention(q_used, k_used, leaves[2], **options)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def _check(q, k, v, bias, kwargs, dtype):
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64).to(dtype=dtype, device=q.device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
    out = flash_attention(*leaves[:3], attn_mask=leaves[3], **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    out_t, grads_t = _ground_truth(q, k, v, bias, kwargs, grad_out)
    tol = ATTENTION_TOL[dtype]
    assert_close(out, out_t, tol, "out")
    for name, g, g_t in zip(("dq", "dk", "dv", "d_mask"), grads, grads_t):
        assert g.dtype == dtype and g.shape == g_t.shape, name
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], name)
    return grads[3]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,features,mask_shape", [pytest.param(*c, id=_case_id(c)) for c in CASES])
def test_mask_grad_matches_reference(backend, device, shape, features, mask_shape):
    with forced(OP, backend, device, rotary=bool(features.rotary)) as dev:
        q, k, v, kwargs = make_inputs(shape, features, torch.float32, dev)
        d_mask = _check(q, k, v, _bias(mask_shape, torch.float32, dev), kwargs, torch.float32)
        assert attnkit.last_dispatch(OP).backend == backend
    if features.causal and shape.n_q > shape.n_k:  # rows that see no key have no gradient
        assert d_mask.abs().sum() > 0 and (d_mask[..., : shape.n_q - shape.n_k, :] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_grad_of_a_row_the_mask_hides(backend, device):
    """A row of -inf in the bias: output 0 and every gradient 0 there, none NaN."""
    with forced(OP, backend, device) as dev:
        q, k, v, kwargs = make_inputs(S(2, 2, 2, 5, 9, 16, 16), Features(), torch.float32, dev)
        d_mask = _check(q, k, v, _bias((2, 5, 9), torch.float32, dev, masked_row=True), kwargs, torch.float32)
    assert (d_mask[:, 1] == 0).all() and torch.isfinite(d_mask).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mask_grad_half_precision(backend, device, dtype):
    with forced(OP, backend, device, dtype) as dev:
        q, k, v, kwargs = make_inputs(S(1, 2, 2, 17, 33, 64, 64), Features(causal=True), dtype, dev)
        _check(q, k, v, _bias((1, 2, 17, 33), dtype, dev), kwargs, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_grad_with_dropout_matches_autograd_with_the_same_keep_mask(backend, device):
    """Dropout: the backward redraws the forward's keep mask. Against float64 autograd through
    the reference given the same Philox mask (the reference backend's own backward is under
    test too, so it is no truth here)."""
    with forced(OP, backend, device) as dev:
        q, k, v, kwargs = make_inputs(S(2, 2, 1, 17, 23, 16, 16), Features(causal=True), torch.float32, dev)
        bias = _bias((2, 1, 17, 23), torch.float32, dev)
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v, bias)]
        out = flash_attention(*leaves[:3], attn_mask=leaves[3], dropout_p=0.3,
                              generator=torch.Generator().manual_seed(7), **kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        grads = torch.autograd.grad(out, leaves, grad_out)
    seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(7))) << 20
    truth = [t.detach().double().requires_grad_(True) for t in (q, k, v, bias)]
    options = dict(reference_options(kwargs), attn_mask=truth[3].expand(2, 2, 17, 23), dropout_p=0.3,
                   dropout_keep=ref.dropout_keep_mask(seed, 2, 2, 17, 23, 0.3, q.device))
    out_t, _ = ref.attention(*truth[:3], **options)
    assert_close(out, out_t, ATTENTION_TOL[torch.float32], "out")
    for g, g_t, what in zip(grads, torch.autograd.grad(out_t, truth, grad_out.double()), ("dq", "dk", "dv", "d_mask")):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[torch.float32], what)
    assert grads[3].abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("features", [Features(causal=True), Features(softcap=1.5, window=(1, 2))], ids=str)
def test_mask_gradcheck_float64(backend, features):
    with forced(OP, backend, "cpu", torch.float64):
        q, k, v, kwargs = make_inputs(S(1, 2, 1, 3, 5, 4, 4), features, torch.float64, "cpu")
        bias = _bias((2, 3, 5), torch.float64, "cpu").requires_grad_(True)
        q.requires_grad_(True)

        def attend(q, bias):
            return flash_attention(q, k, v, attn_mask=bias, **kwargs)

        assert torch.autograd.gradcheck(attend, (q, bias))


def test_sdpa_drop_in_matches_torch_sdpa_with_a_learned_bias():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=gen) for _ in range(3))
    bias = torch.randn(3, 11, 11, generator=gen)
    grads = []
    for sdpa in (attnkit.scaled_dot_product_attention, F.scaled_dot_product_attention):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = sdpa(*leaves[:3], attn_mask=leaves[3])
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for g, g_torch, what in zip(*grads, ("dq", "dk", "dv", "d_mask")):
        torch.testing.assert_close(g, g_torch, atol=2e-5, rtol=1e-4, msg=what)


def test_mask_grad_under_compile_and_opcheck():
    """The custom ops' path: torch.compile (fake tensors of the backward op) and opcheck."""
    torch._dynamo.reset()
    q, k, v, kwargs = make_inputs(S(2, 2, 1, 9, 12, 16, 16), Features(causal=True), torch.float32, "cpu")
    bias = _bias((1, 2, 9, 12), torch.float32, "cpu").requires_grad_(True)

    def loss(q, bias):
        return flash_attention(q, k, v, attn_mask=bias, causal=True).square().sum()

    q.requires_grad_(True)
    with attnkit.use_backend("reference"):
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(q, bias)
        grads = torch.autograd.grad(compiled, (q, bias))
        grads_eager = torch.autograd.grad(loss(q, bias), (q, bias))
        for g, g_e in zip(grads, grads_eager):
            torch.testing.assert_close(g, g_e)
        mask = bias.detach().expand(2, 2, 9, 12)
        out, lse = torch.ops.attnkit.attention_forward(q.detach(), k, v, None, None, 9, 12, mask, None, -1, 0, True,
                                                       0.0, 0.25, 0.0, None, None, None, None, None, False)
        args = (torch.ones_like(out), q.detach(), k, v, out, lse, None, None, 9, 12, mask, None, -1, 0, True, 0.0,
                0.25, 0.0, None, None, None, None, None, False, True)
        torch.library.opcheck(torch.ops.attnkit.attention_backward.default, args)
