"""attnkit.ops.additive_attention on every backend against the plain-PyTorch
reference (attnkit.reference.additive_attention): values and the six gradients,
gradcheck, odd shapes, masks (fully masked rows), half precision, bad input,
opcheck. Triton runs here on CPU tensors under TRITON_INTERPRET=1."""
import pytest
import torch
from helpers import backend_params, forced

import attnkit
from attnkit import _dispatch
from attnkit.ops import additive_attention
from attnkit.reference import additive_attention as ref

OP = "additive_attention"
BACKENDS = backend_params(OP)
CPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cpu"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}

# (B, Tq, Tk, Dq, Dk, Dv, A, mask): length 1, Tk past a block, A not a power of two, Dv != Dk,
# padding masks with one fully masked batch row.
CASES = [
    (2, 5, 7, 6, 5, 4, 8, None),
    (1, 1, 1, 3, 3, 3, 4, None),
    (2, 1, 37, 8, 6, 5, 80, "padded"),
    (3, 9, 1, 4, 7, 6, 12, None),
    (2, 17, 70, 16, 12, 10, 96, "padded"),
    (3, 6, 11, 5, 5, 9, 24, "empty_row"),
]


def make(case, dtype=torch.float64, device="cpu", seed=0):
    batch, n_q, n_k, d_q, d_k, d_v, hidden, masking = case
    gen = torch.Generator().manual_seed(seed + 1000 * n_k + hidden)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    tensors = [rand(batch, n_q, d_q), rand(batch, n_k, d_k), rand(batch, n_k, d_v),
               rand(hidden, d_q) / d_q ** 0.5, rand(hidden, d_k) / d_k ** 0.5, rand(hidden)]
    mask = None
    if masking is not None:
        lengths = torch.randint(1, n_k + 1, (batch,), generator=gen)
        lengths[0] = n_k
        if masking == "empty_row":
            lengths[-1] = 0
        mask = torch.arange(n_k)[None, :] < lengths[:, None]
        mask = mask.to(device)
    return [t.to(dtype=dtype, device=device) for t in tensors], mask


def case_id(c):
    return f"B{c[0]}-q{c[1]}-k{c[2]}-D{c[3]}/{c[4]}/{c[5]}-A{c[6]}-{c[7]}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_values_and_gradients_match_reference(backend, device, case):
    tensors, mask = make(case, torch.float64)
    leaves_ref = [t.float().requires_grad_() for t in tensors]
    context_ref, weights_ref = ref(*leaves_ref, mask)
    grad_c, grad_w = torch.randn_like(context_ref), torch.randn_like(weights_ref)
    grads_ref = torch.autograd.grad((context_ref, weights_ref), leaves_ref, (grad_c, grad_w))
    with forced(OP, backend, device) as dev:
        leaves = [t.float().to(dev).requires_grad_() for t in tensors]
        context, weights = additive_attention(*leaves, None if mask is None else mask.to(dev), return_weights=True)
        grads = torch.autograd.grad((context, weights), leaves, (grad_c.to(dev), grad_w.to(dev)))
        assert attnkit.last_dispatch(OP).backend == backend
    tol = TOL[torch.float32]
    torch.testing.assert_close(context.cpu(), context_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.cpu(), weights_ref, atol=tol, rtol=tol)
    for name, g, g_ref in zip(("query", "keys", "values", "W_q", "W_k", "v_a"), grads, grads_ref):
        torch.testing.assert_close(g.cpu(), g_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_context_only_gradients_match_reference(backend, device):
    """Without return_weights the backward sees no weight gradient (delta from the context alone)."""
    tensors, mask = make(CASES[4], torch.float64)
    leaves_ref = [t.float().requires_grad_() for t in tensors]
    context_ref, _ = ref(*leaves_ref, mask)
    grads_ref = torch.autograd.grad(context_ref.square().sum(), leaves_ref)
    with forced(OP, backend, device) as dev:
        leaves = [t.float().to(dev).requires_grad_() for t in tensors]
        context = additive_attention(*leaves, mask.to(dev))
        grads = torch.autograd.grad(context.square().sum(), leaves)
    torch.testing.assert_close(context.cpu(), context_ref, atol=2e-5, rtol=2e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.cpu(), g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [1e-5, 30.0], ids=["tiny", "saturated"])
def test_tanh_extremes_match_reference(backend, device, scale):
    """Pre-activations far past tanh's saturation, or tiny: each branch of the kernels' tanh."""
    tensors, mask = make(CASES[2], torch.float64)
    tensors[3], tensors[4] = tensors[3] * scale, tensors[4] * scale
    context_ref, weights_ref = ref(*tensors, mask)
    with forced(OP, backend, device) as dev:
        context, weights = additive_attention(*(t.float().to(dev) for t in tensors), mask.to(dev),
                                              return_weights=True)
    torch.testing.assert_close(context.cpu().double(), context_ref, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(weights.cpu().double(), weights_ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_gradcheck_float64(backend, device):
    with forced(OP, backend, device, torch.float64):
        tensors, mask = make((2, 3, 5, 3, 4, 2, 6, "empty_row"), torch.float64)
        leaves = [t.requires_grad_() for t in tensors]

        def fn(*args):
            context, weights = additive_attention(*args, mask, return_weights=True)
            return context, weights

        fast = backend == "triton"  # few launches: the interpreter is slow
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_masked_positions_and_empty_rows(backend, device):
    """Weights exactly 0 at masked keys; a fully masked row gives context 0 and zero gradients, no NaN."""
    tensors, mask = make(CASES[5], torch.float64)
    with forced(OP, backend, device) as dev:
        leaves = [t.float().to(dev).requires_grad_() for t in tensors]
        mask = mask.to(dev)
        context, weights = additive_attention(*leaves, mask, return_weights=True)
        (context.sum() + weights.square().sum()).backward()
    weights, context, mask = weights.cpu(), context.cpu(), mask.cpu()
    assert torch.equal(weights.masked_select(~mask[:, None, :]), torch.zeros(int((~mask).sum()) * weights.shape[1]))
    assert not mask[-1].any()
    assert torch.equal(context[-1], torch.zeros_like(context[-1]))
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaves[0].grad[-1].cpu(), torch.zeros_like(leaves[0].grad[-1].cpu()))
    torch.testing.assert_close(weights[:-1].sum(-1), torch.ones(weights.shape[0] - 1, weights.shape[1]))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(backend, device, dtype):
    tensors, mask = make(CASES[2], torch.float64)
    context_ref, weights_ref = ref(*tensors, mask)
    grads_ref = torch.autograd.grad(ref(*(t.requires_grad_() for t in tensors), mask)[0].sum(), tensors)
    with forced(OP, backend, device, dtype) as dev:
        leaves = [t.detach().to(dtype=dtype, device=dev).requires_grad_() for t in tensors]
        context, weights = additive_attention(*leaves, mask.to(dev), return_weights=True)
        grads = torch.autograd.grad(context.sum(), leaves)
    assert context.dtype == weights.dtype == dtype
    tol = TOL[dtype] * 4  # the projections are rounded to the half dtype before the kernel
    torch.testing.assert_close(context.cpu().double(), context_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.cpu().double(), weights_ref, atol=tol, rtol=tol)
    for g, g_ref in zip(grads, grads_ref):  # gradients come back in the input dtype, near the fp64 ones
        assert g.dtype == dtype
        torch.testing.assert_close(g.cpu().double(), g_ref, atol=10 * tol, rtol=10 * tol)


def _bad(case=(2, 3, 4, 5, 6, 7, 8, None)):
    tensors, _ = make(case, torch.float32)
    return dict(zip(("query", "keys", "values", "W_q", "W_k", "v_a"), tensors), mask=None)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda a: a.update(W_q=torch.randn(8, 4)), ValueError, r"W_q must have shape \(8, 5\)"),
    (lambda a: a.update(W_k=torch.randn(9, 6)), ValueError, r"W_k must have shape \(8, 6\)"),
    (lambda a: a.update(v_a=torch.randn(7)), ValueError, r"W_q must have shape \(7, 5\)"),
    (lambda a: a.update(values=torch.randn(2, 5, 7)), ValueError, "keys and values must have the same length"),
    (lambda a: a.update(keys=torch.randn(3, 4, 6)), ValueError, "same batch size"),
    (lambda a: a.update(query=torch.randn(3, 5)), ValueError, "query must be 3-D"),
    (lambda a: a.update(mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 4\)"),
    (lambda a: a.update(mask=torch.ones(2, 4)), TypeError, "mask has dtype float32"),
    (lambda a: a.update(mask=torch.ones(4, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 4\)"),
    (lambda a: a.update(values=torch.randn(2, 4, 7, dtype=torch.float64)), TypeError, "values has dtype"),
    (lambda a: a.update(v_a=torch.ones(8, dtype=torch.int64)), TypeError, "v_a has dtype int64"),
    (lambda a: a.update(keys=[[1.0]]), TypeError, "keys must be a torch.Tensor"),
    (lambda a: a.update(query=torch.randn(2, 0, 5)), ValueError, "empty input"),
])
def test_bad_input_raises_naming_the_argument(mutate, error, match):
    args = _bad()
    mutate(args)
    with pytest.raises(error, match=match):
        additive_attention(**args)


def test_return_weights_must_be_bool():
    with pytest.raises(TypeError, match="return_weights must be a bool"):
        additive_attention(**_bad(), return_weights=1)


@pytest.mark.parametrize("backend", [b for b in ("cpp", "reference") if b in _dispatch._OPS[OP].implementations])
def test_opcheck(backend):
    tensors, mask = make(CASES[2], torch.float32)
    qp, kp = tensors[0] @ tensors[3].t(), tensors[1] @ tensors[4].t()
    values, v_a = tensors[2], tensors[5]
    with forced(OP, backend, "cpu"):
        for return_weights in (False, True):
            args = (qp.requires_grad_(), kp.requires_grad_(), values.requires_grad_(), v_a.requires_grad_(), mask,
                    return_weights)
            torch.library.opcheck(torch.ops.attnkit.additive_attention_forward.default, args)
        context, lse, weights = torch.ops.attnkit.additive_attention_forward(qp, kp, values, v_a, mask, True)
        grad_c, grad_w = torch.randn_like(context), torch.randn_like(weights)
        delta = (grad_c * context).sum(-1) + (grad_w * weights).sum(-1)
        backward_args = tuple(t.detach() for t in (grad_c, grad_w, delta, qp, kp, values, v_a, mask, lse))
        torch.library.opcheck(torch.ops.attnkit.additive_attention_backward.default, backward_args)


def test_explain_names_a_backend():
    args = _bad()
    decision = attnkit.explain(OP, *args.values())
    assert decision.backend in attnkit.BACKENDS


@pytest.mark.parametrize("backend", [b for b in ("cpp", "reference") if b in _dispatch._OPS[OP].implementations])
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    tensors, mask = make(CASES[4], torch.float32)
    leaves = [t.requires_grad_() for t in tensors]

    def loss_fn(*args):
        context, weights = additive_attention(*args, mask, return_weights=True)
        return context.square().sum() + (weights * weights).sum()

    with attnkit.use_backend(backend, op=OP):
        loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        assert attnkit.last_dispatch(OP).backend == backend
    with attnkit.use_backend("reference", op=OP):
        loss_ref = loss_fn(*leaves)
        grads_ref = torch.autograd.grad(loss_ref, leaves)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
def test_projected_keys_give_the_same_values_and_gradients(backend, device):
    """keys @ W_k.T computed by the caller (once per source, for a decoder) and passed as
    projected_keys: same context/weights, and gradients reach keys and W_k through it."""
    case = (2, 3, 7, 6, 5, 4, 8, "padded")
    with forced(OP, backend, device, torch.float64):
        (query, keys, values, w_q, w_k, v_a), mask = make(case)
        leaves = [t.requires_grad_() for t in (query, keys, values, w_q, w_k, v_a)]
        direct = additive_attention(query, keys, values, w_q, w_k, v_a, mask, return_weights=True)
        projected = additive_attention(query, keys, values, w_q, w_k, v_a, mask, return_weights=True,
                                       projected_keys=keys @ w_k.t())
        for a, b in zip(direct, projected):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        loss = lambda out: (out[0] * out[0].detach().sin()).sum() + (out[1] * out[1].detach().cos()).sum()  # noqa: E731
        for a, b in zip(torch.autograd.grad(loss(direct), leaves), torch.autograd.grad(loss(projected), leaves)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_projected_keys_bad_shape_or_dtype():
    (query, keys, values, w_q, w_k, v_a), mask = make(CASES[0])
    with pytest.raises(ValueError, match="projected_keys"):
        additive_attention(query, keys, values, w_q, w_k, v_a, projected_keys=(keys @ w_k.t())[:, :-1])
    with pytest.raises((TypeError, ValueError), match="projected_keys"):
        additive_attention(query, keys, values, w_q, w_k, v_a, projected_keys=(keys @ w_k.t()).float())


def test_cpp_backward_checks_its_statistics_and_takes_an_empty_batch():
    """The C++ backward read lse/delta/grad_context by (b, i) unchecked (an empty lse segfaulted, a
    short one read past it) and divided by the batch (B = 0: SIGFPE)."""
    ext, reason = attnkit._extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    qp, kp, values, v_a = r(2, 3, 4), r(2, 5, 4), r(2, 5, 6), r(4)
    _, _, lse = ext.additive_attention_forward(qp, kp, values, v_a, None)
    grad_context, delta = r(2, 3, 6), r(2, 3)
    for bad in (dict(lse=torch.empty(0)), dict(lse=lse.reshape(-1)[:1]), dict(delta=torch.empty(0)),
                dict(grad_context=r(2, 1, 6))):
        args = {**dict(grad_context=grad_context, delta=delta, lse=lse), **bad}
        with pytest.raises(RuntimeError, match="additive_attention_backward"):
            ext.additive_attention_backward(args["grad_context"], None, args["delta"], qp, kp, values, v_a, None,
                                            args["lse"])
    qp, kp, values = r(0, 3, 4), r(0, 5, 4), r(0, 5, 6)
    _, _, lse = ext.additive_attention_forward(qp, kp, values, v_a, None)
    grads = ext.additive_attention_backward(r(0, 3, 6), None, r(0, 3), qp, kp, values, v_a, None, lse)
    assert [tuple(g.shape) for g in grads] == [(0, 3, 4), (0, 5, 4), (0, 5, 6), (4,)]
    assert grads[3].abs().sum().item() == 0
