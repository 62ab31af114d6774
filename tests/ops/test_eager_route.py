"""attnkit.ops.lstm / gru / lstm_cell / linear / flash_attention / attention_decode /
additive_attention / apply_rotary take two routes to the same kernels (attnkit._eager): plain
eager calls skip the torch.library custom op, anything else (here a dispatch
mode; torch.compile in test_rnn.py and test_compile_serialization.py) goes
through it. Both must give the same outputs and gradients, and each must be
taken where it should."""
import pytest
import torch
from helpers import forced
from test_rnn import make_gru, make_lstm, weighted_loss
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit import _eager
from attnkit.ops import (additive_attention, apply_rotary, attention_decode, flash_attention, gru, linear, lstm,
                         lstm_cell)


class PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing but makes the call non-plain."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def run(op, args, lengths, through_custom_op):
    x, hx, *weights = args
    kwargs = {"lengths": lengths}
    if op is lstm and len(weights) == 5:
        kwargs["w_hr"] = weights.pop()
    if through_custom_op:
        with PassThrough():
            out, state = op(x, hx, *weights, **kwargs)
    else:
        out, state = op(x, hx, *weights, **kwargs)
    outs = [out, *(state if isinstance(state, tuple) else (state,))]
    leaves = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if t is not None]
    return outs, torch.autograd.grad(weighted_loss(outs), leaves), out.grad_fn


def lstm_args(P):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = make_lstm(5, 3, 4, 6, P, torch.float32, "cpu")
    return [x, (h0, c0), w_ih, w_hh, b_ih, b_hh] + ([w_hr] if w_hr is not None else [])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", ["lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("lengths", [None, [2, 5, 0]], ids=["full", "unsorted"])
def test_eager_route_matches_custom_op_route(backend, case, lengths):
    op = gru if case == "gru" else lstm
    if case == "gru":
        args = list(make_gru(5, 3, 4, 6, torch.float32, "cpu"))
    else:
        args = lstm_args(4 if case == "lstm_proj" else 6)
    with forced(case[:4].rstrip("_"), backend, "cpu", torch.float32):
        outs, grads, eager_node = run(op, args, lengths, through_custom_op=False)
        outs_op, grads_op, op_node = run(op, args, lengths, through_custom_op=True)
    assert "Function" in type(eager_node).__name__, type(eager_node).__name__
    assert f"attnkit_{case[:4].rstrip('_')}_forward" in type(op_node).__name__, type(op_node).__name__
    # The same kernels on the same inputs: equal, not merely close.
    for a, b in zip(outs + list(grads), outs_op + list(grads_op)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_lstm_cell_routes_agree(backend):
    x, (h, c), w_ih, w_hh, b_ih, b_hh = lstm_args(6)
    args = (x[0], (h, c), w_ih, w_hh, b_ih, b_hh)
    leaves = [x, h, c, w_ih, w_hh, b_ih, b_hh]
    results = []
    with forced("lstm_cell", backend, "cpu", torch.float32):
        for mode in (None, PassThrough):
            with mode() if mode else torch.enable_grad():
                outs = lstm_cell(*args)
            results.append((type(outs[0].grad_fn).__name__, [*outs, *torch.autograd.grad(weighted_loss(outs), leaves)]))
    (eager_node, eager), (op_node, op) = results
    assert "Function" in eager_node and "attnkit_lstm_cell_forward" in op_node, (eager_node, op_node)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_inference_call_builds_no_graph():
    x, hx, *weights = lstm_args(6)
    with torch.no_grad():
        out, (h, c) = lstm(x, hx, *weights)
    assert out.grad_fn is None and not out.requires_grad


def test_plain_call_rules():
    t = torch.zeros(2)
    assert _eager.plain_call([t, torch.nn.Parameter(t), None, True, 3])
    with PassThrough():
        assert not _eager.plain_call([t])

    class Sub(torch.Tensor):
        pass

    assert not _eager.plain_call([t.as_subclass(Sub)])
    assert not torch.func.grad(lambda v: (v * float(_eager.plain_call([v]))).sum())(t).any()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_linear_routes_agree_to_second_order(backend):
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((3, 5), (4, 5), (4,)))
    results = []
    with forced("linear", backend, "cpu", torch.float32, rows=3):
        for mode in (None, PassThrough):
            with mode() if mode else torch.enable_grad():
                y = linear(x, w, b)
            node = type(y.grad_fn.next_functions[0][0]).__name__  # under the reshape back to x's leading dims
            # The formula is plain torch, so both routes differentiate twice.
            gx, gw = torch.autograd.grad(weighted_loss([y]), [x, w], create_graph=True)
            second = torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), [x, w, b], allow_unused=True)
            results.append((node, [y, gx, gw, *[g for g in second if g is not None]]))
    (eager_node, eager), (op_node, op) = results
    assert "Function" in eager_node and "attnkit_linear" in op_node, (eager_node, op_node)
    assert len(eager) == len(op)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_attention_decode_routes_agree(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=gen) for s in ((2, 4, 1, 16), (2, 2, 9, 16), (2, 2, 9, 16)))
    lengths = torch.tensor([9, 4], dtype=torch.int32)
    with forced("attention_decode", backend, "cpu", torch.float32):
        eager = attention_decode(q, k, v, lengths, return_lse=True)
        with PassThrough():
            op = attention_decode(q, k, v, lengths, return_lse=True)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_flash_attention_routes_agree(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=gen, requires_grad=True) for s in ((2, 4, 5, 16), (2, 2, 7, 16), (2, 2, 7, 16)))
    results = []
    with forced("flash_attention", backend, "cpu", torch.float32):
        for mode in (None, PassThrough):
            with mode() if mode else torch.enable_grad():
                out = flash_attention(q, k, v, causal=True)
            results.append((type(out.grad_fn).__name__, [out, *torch.autograd.grad(weighted_loss([out]), [q, k, v])]))
    (eager_node, eager), (op_node, op) = results
    assert "Function" in eager_node and "attnkit_attention_forward" in op_node, (eager_node, op_node)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_additive_attention_routes_agree(backend):
    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 3, 4), (2, 5, 6), (2, 5, 7), (8, 4), (8, 6), (8,))
    leaves = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    results = []
    with forced("additive_attention", backend, "cpu", torch.float32):
        for mode in (None, PassThrough):
            with mode() if mode else torch.enable_grad():
                context, weights = additive_attention(*leaves, mask, return_weights=True)
            grads = torch.autograd.grad(weighted_loss([context, weights]), leaves)
            results.append((type(context.grad_fn).__name__, [context, weights, *grads]))
    (eager_node, eager), (op_node, op) = results
    assert "Function" in eager_node and "attnkit_additive_attention_forward" in op_node, (eager_node, op_node)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_rotary_routes_agree(backend):
    """Out-of-place apply_rotary with per-sequence offsets and learned tables: outputs and the
    gradients of x, cos and sin agree; the eager route's backward stays differentiable (a
    rotation's backward is a rotation: double backward works, as through the custom op)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    cos, sin = angles.cos().requires_grad_(True), angles.sin().requires_grad_(True)
    offsets = torch.tensor([0, 2], dtype=torch.int32)
    results = []
    with forced("rotary", backend, "cpu", torch.float64):
        for mode in (None, PassThrough):
            with mode() if mode else torch.enable_grad():
                out = apply_rotary(x, cos, sin, seqlen_offsets=offsets)
            grads = torch.autograd.grad(weighted_loss([out]), [x, cos, sin])
            results.append((type(out.grad_fn).__name__, [out, *grads]))
        assert torch.autograd.gradgradcheck(lambda x: apply_rotary(x, cos.detach(), sin.detach(),
                                                                   seqlen_offsets=offsets), (x,))
    (eager_node, eager), (op_node, op) = results
    assert "Function" in eager_node and "attnkit_rotary" in op_node, (eager_node, op_node)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["flash_attention", "lstm", "lstm_cell", "additive_attention"])
def test_second_order_gradients_raise_instead_of_dropping_a_term(op):
    """A gradient penalty: grad(out.sum(), x, create_graph=True) used in a second backward.
    The first-order formulas are not differentiable; torch's once_differentiable raised
    only when the incoming gradient required grad, so the penalty's term (here through
    a ones gradient) was silently taken for a constant (2026-11-27 audit). It raises now."""
    gen = torch.Generator().manual_seed(0)
    if op == "flash_attention":
        x = torch.randn(1, 2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        out = flash_attention(x, x.detach(), x.detach())
    elif op == "lstm":
        x, h0, c0, *weights = make_lstm(5, 3, 4, 6, 6, torch.float64, "cpu")[:7]
        out = lstm(x, (h0, c0), *weights)[0]
    elif op == "lstm_cell":
        x = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        w_ih, w_hh = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
        out = lstm_cell(x, (torch.zeros(2, 4, dtype=torch.float64),) * 2, w_ih, w_hh)[0]
    else:
        x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
        keys, v = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
        w_q, w_k, v_a = (torch.randn(*shape, dtype=torch.float64) for shape in ((6, 8), (6, 8), (6,)))
        out = additive_attention(x, keys, v, w_q, w_k, v_a)
    (grad,) = torch.autograd.grad(out.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable: second-order gradients"):
        ((out**2).sum() + (grad**2).sum()).backward()
    (plain,) = torch.autograd.grad(out.sum(), [x])  # first order alone, unchanged
    assert not plain.requires_grad and torch.allclose(plain, grad.detach())


@pytest.mark.parametrize("module", ["attention", "GRU", "LSTMCell"])
def test_second_order_gradients_raise_through_autograd_grad_on_weights(module):
    """A gradient penalty (or MAML's meta-gradient) taken with torch.autograd.grad w.r.t. the
    weights: autograd.grad runs only the nodes leading to its inputs, and the raising node
    hung from detached leaves alone, so the second-order term was dropped without an error
    (2026-11-28 audit). The node now hangs from the forward's inputs too."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    if module == "attention":
        layer = torch.nn.Linear(8, 8, dtype=torch.float64)
        run = lambda x: flash_attention(layer(x)[:, None], x[:, None].detach(), x[:, None].detach())
    else:
        layer = getattr(attnkit.nn, module)(8, 5, dtype=torch.float64)
        run = lambda x: layer(x)[0] if module == "GRU" else layer(x[0])[0]
    out = run(x)
    (grad,) = torch.autograd.grad((out**2).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable: second-order gradients"):
        torch.autograd.grad(out.sum() + (grad**2).sum(), list(layer.parameters()))


def test_checkpointed_attention_keeps_no_activation_alive():
    """Activation checkpointing frees a region's activations after the forward; the ops must
    not hold their inputs beyond what they save through the saved-tensor hooks."""
    import weakref
    from torch.utils.checkpoint import checkpoint

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(1, 2, 5, 8, requires_grad=True)
    projected = []

    def region(x):
        q = layer(x)
        projected.append(weakref.ref(q))
        return flash_attention(q, q, q)

    out = checkpoint(region, x, use_reentrant=False)
    assert projected[0]() is None  # freed: recomputed in the backward
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_torch_func_differentiating_transforms_raise_a_clear_error():
    """torch.func.grad / jacrev / jvp reach the custom ops, whose autograd formulas functorch
    cannot run (torch raised about autograd.Function's setup_context); vmap alone works."""
    q = torch.randn(1, 2, 4, 8)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    for transform in (torch.func.grad, torch.func.jacrev):
        with pytest.raises(NotImplementedError, match="torch.func's grad, jacrev, jacfwd and jvp transforms"):
            transform(lambda a: flash_attention(a, k, v).sum())(q)
    with pytest.raises(NotImplementedError, match="attnkit lstm_forward"):
        x, h0, c0, *weights = make_lstm(3, 2, 4, 5, 5, torch.float32, "cpu")[:7]
        torch.func.grad(lambda x: lstm(x, (h0, c0), *weights)[0].sum())(x.detach())
    batched = torch.func.vmap(lambda a: flash_attention(a[None], k[:1], v[:1]))(q)
    assert torch.allclose(batched[:, 0], flash_attention(q, k, v), atol=1e-6)


def test_differentiating_transforms_refused_by_rotary_and_layer_norm_rnns_too():
    """They reached torch's setup_context error instead of attnkit's."""
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(NotImplementedError, match="attnkit apply_rotary: torch.func's grad"):
        torch.func.grad(lambda x: attnkit.ops.apply_rotary(x, cos, sin).sum())(torch.randn(1, 4, 2, 8))
    ln = (torch.ones(16), torch.zeros(16))
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(NotImplementedError, match="layer_norm_lstm: torch.func's grad"):
        torch.func.grad(lambda x: attnkit.ops.layer_norm_lstm(x, None, w_ih, w_hh, ln_ih=ln, ln_hh=ln,
                                                              ln_c=(torch.ones(4), torch.zeros(4)))[0].sum())(
            torch.randn(2, 1, 3))


def test_linear_runs_f_linear_under_every_torch_func_transform():
    """ops.linear is F.linear's drop-in: grad and jacrev raised (jacfwd and jvp worked through its
    forward-AD route); they all run F.linear now, with F.linear's results."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    ours, theirs = (lambda x: attnkit.ops.linear(x, w, b)), (lambda x: torch.nn.functional.linear(x, w, b))
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        torch.testing.assert_close(transform(ours)(x), transform(theirs)(x))
    torch.testing.assert_close(torch.func.grad(lambda x: ours(x).square().sum())(x),
                               torch.func.grad(lambda x: theirs(x).square().sum())(x))
    tangent = torch.randn(3, 4)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (tangent,)), torch.func.jvp(theirs, (x,), (tangent,)))


def test_vmap_then_backward_through_frozen_weights_and_in_place_rotary():
    """Under vmap the unwrapped tensors say requires_grad=False while autograd records the op
    outside: the forward saved nothing and the backward failed ("gates must be 3-D")."""
    x, h0, c0, *weights = make_lstm(3, 2, 4, 5, 5, torch.float32, "cpu")[:7]
    weights = [w.detach() for w in weights]
    xs = torch.randn(3, *x.shape, requires_grad=True)  # per-example inputs, frozen weights
    out = torch.func.vmap(lambda a: lstm(a, (h0.detach(), c0.detach()), *weights)[0])(xs)
    (grad,) = torch.autograd.grad(out.square().sum(), [xs])
    for i in range(3):
        xi = xs[i].detach().requires_grad_()
        (expected,) = torch.autograd.grad(lstm(xi, (h0.detach(), c0.detach()), *weights)[0].square().sum(), [xi])
        torch.testing.assert_close(grad[i], expected)
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    xs = torch.randn(3, 1, 4, 2, 8)
    rotated = torch.func.vmap(lambda a: attnkit.ops.apply_rotary(a.clone(), cos, sin, inplace=True))(xs)
    torch.testing.assert_close(rotated, attnkit.ops.apply_rotary(xs.flatten(0, 1), cos, sin).view_as(xs))


@pytest.mark.parametrize("op", ["lstm_cell", "gru"])
def test_second_order_gradients_raise_for_a_computed_bias(op):
    """A bias computed in the graph (MAML's adapted bias) is not saved by the op, and was
    linked to the raising node only while alive: freed, the meta-gradient came back
    first-order only, without an error."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    gates = 4 if op == "lstm_cell" else 3
    w_ih, w_hh = torch.randn(gates * 4, 3, dtype=torch.float64), torch.randn(gates * 4, 4, dtype=torch.float64)
    base = torch.randn(gates * 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(2, 4, dtype=torch.float64)
    if op == "lstm_cell":
        out = lstm_cell(x, (h0, h0), w_ih, w_hh, base * 2, None)[0]
    else:
        out = gru(x[None], h0, w_ih, w_hh, base * 2, None)[0]
    (grad,) = torch.autograd.grad(out.sum(), [x], create_graph=True)  # a constant incoming gradient
    with pytest.raises(RuntimeError, match="backward is not differentiable: second-order gradients"):
        torch.autograd.grad(grad.square().sum(), [base])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_batched_gradients_run_through_the_custom_ops(backend):
    """autograd.grad(is_grads_batched=True) (and jacobian(vectorize=True)) hands the backward
    legacy-vmap BatchedTensors, which the cpp kernels took for plain tensors and crashed on
    ("Cannot access data pointer of Tensor that doesn't have storage")."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    x = torch.randn(4, 2, 3, requires_grad=True)
    lstm_module = attnkit.nn.LSTM(3, 5)
    angles = torch.randn(3, 4)
    rotary_cases = [(lambda q, inplace=inplace: apply_rotary(q * 1, angles.cos(), angles.sin(), inplace=inplace), q)
                    for inplace in (False, True)]
    with attnkit.use_backend(backend):
        for fn, inp in [(lambda q: flash_attention(q, q, q, causal=True), q), (lambda x: lstm_module(x)[0], x),
                        *rotary_cases]:
            out = fn(inp)
            grads = torch.randn(3, *out.shape)
            (batched,) = torch.autograd.grad(out, inp, grads, is_grads_batched=True, retain_graph=True)
            for i in range(3):
                (one,) = torch.autograd.grad(out, inp, grads[i], retain_graph=True)
                torch.testing.assert_close(batched[i], one)


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    """A dual tensor does not require grad, so the ops ran their inference path and returned
    an output without a tangent: a zero derivative. nn.Linear runs F.linear there, as torch."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    q, x = torch.randn(1, 2, 3, 8), torch.randn(4, 2, 3)
    linear_module, reference = attnkit.nn.Linear(3, 5), torch.nn.Linear(3, 5)
    reference.load_state_dict(linear_module.state_dict())
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="attention_forward: forward-mode AD"):
            flash_attention(fwAD.make_dual(q, torch.ones_like(q)), q, q)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            attnkit.nn.GRU(3, 5)(fwAD.make_dual(x, torch.ones_like(x)))
        with pytest.raises(NotImplementedError, match="apply_rotary: forward-mode AD"):
            attnkit.ops.apply_rotary(fwAD.make_dual(q, torch.ones_like(q)), torch.randn(3, 4), torch.randn(3, 4))
        dual = fwAD.make_dual(x, torch.ones_like(x))
        got, want = (fwAD.unpack_dual(m(dual)).tangent for m in (linear_module, reference))
        torch.testing.assert_close(got, want)
