"""attnkit.nn.LSTMCell is a drop-in for torch.nn.LSTMCell."""
import re

import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES

import attnkit


def pair(bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    ours = attnkit.nn.LSTMCell(5, 7, bias=bias, dtype=dtype)
    theirs = torch.nn.LSTMCell(5, 7, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_same_parameters_and_state_dict_keys():
    ours, theirs = pair()
    assert isinstance(ours, torch.nn.LSTMCell)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs2 = torch.nn.LSTMCell(5, 7)
    ours.load_state_dict(theirs2.state_dict())  # loads a torch.nn checkpoint
    assert torch.equal(ours.weight_hh, theirs2.weight_hh)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_outputs_and_grads_match(bias, batched, with_state):
    ours, theirs = pair(bias, torch.float64)
    shape = (3, 5) if batched else (5,)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_state:
        state_shape = (3, 7) if batched else (7,)
        hx = (torch.randn(*state_shape, dtype=torch.float64), torch.randn(*state_shape, dtype=torch.float64))
    h, c = ours(x, hx)
    h_ref, c_ref = theirs(x, hx)
    assert h.shape == h_ref.shape and c.shape == c_ref.shape
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
    grads = torch.autograd.grad((h.sum() + c.pow(2).sum()), [x, *ours.parameters()])
    grads_ref = torch.autograd.grad((h_ref.sum() + c_ref.pow(2).sum()), [x, *theirs.parameters()])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_wrong_rank_errors_like_torch():
    ours, _ = pair()
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D instead"):
        ours(torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match=r"Expected hx\[1\] to be 1D or 2D"):
        ours(torch.randn(2, 5), (torch.randn(2, 7), torch.randn(1, 2, 7)))


def test_wrong_input_size():
    ours, _ = pair()
    with pytest.raises(ValueError, match=r"LSTMCell: input has 4 features but weight_ih expects input_size 5 "
                                         r"\(input shape \(2, 4\)\)"):
        ours(torch.randn(2, 4))


@pytest.mark.parametrize("batched", [True, False])
def test_wrong_state_shape_names_what_was_passed(batched):
    """The op sees unbatched input as a batch of one: its errors named the
    unsqueezed shapes ("hx[0] must be 2-D, got shape (1, 2, 7)" for a 2-D hx)."""
    ours, theirs = pair()
    x = torch.randn(3, 5) if batched else torch.randn(5)
    good = torch.zeros(3, 7) if batched else torch.zeros(7)
    bad = torch.zeros(2, 7)
    with pytest.raises(RuntimeError):
        theirs(x, (bad, good))  # torch rejects it too
    if batched:
        message = "LSTMCell: hx[0] must have shape (3, 7) (batch, hidden_size) for batched 2-D input of shape (3, 5)"
    else:
        message = "LSTMCell: hx[0] must have shape (7,) (hidden_size) for unbatched 1-D input of shape (5,)"
    with pytest.raises(ValueError, match="^" + re.escape(message + ", got (2, 7)") + "$"):
        ours(x, (bad, good))
    with pytest.raises(ValueError, match=r"^LSTMCell: hx\[1\] must have shape"):
        ours(x, (good, torch.zeros(*good.shape[:-1], 6)))
    with pytest.raises(TypeError, match=r"^LSTMCell: hx\[1\] has dtype torch.float64 but input has torch.float32"):
        ours(x, (good, good.double()))


def test_bias_gradients_are_separate_tensors():
    """torch gives b_ih and b_hh a gradient tensor each; one tensor for both let an
    in-place change of one (a hook, an optimizer step on autograd.grad's results)
    change the other."""
    ours, theirs = pair()
    x = torch.randn(3, 5)
    grads = torch.autograd.grad(ours(x)[0].sum(), list(ours.parameters()))
    grads_ref = torch.autograd.grad(theirs(x)[0].sum(), list(theirs.parameters()))
    assert grads[2] is not grads[3]
    grads[2].zero_()
    torch.testing.assert_close(grads[3], grads_ref[3])
    for module in (ours, theirs):
        module.bias_ih.register_hook(lambda g: g.mul_(0))
        module(x)[0].sum().backward()
    torch.testing.assert_close(ours.bias_hh.grad, theirs.bias_hh.grad)
    assert ours.bias_hh.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("state", [None, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batched", [True, False])
def test_cpu_autocast_follows_torch(dtype, state, batched):
    """Under CPU autocast torch.nn.LSTMCell runs its matmuls in bfloat16 but returns
    the state's dtype (c's; the input's without hx): a float32 module takes bfloat16
    input there. The C++ kernels failed on autocast's mixed dtypes."""
    ours, theirs = pair()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*((3, 5) if batched else (5,)), generator=gen).to(dtype)
    hx = None
    if state is not None:
        hx = tuple(torch.randn(*((3, 7) if batched else (7,)), generator=gen).to(state) for _ in range(2))
    atol, rtol = TOLERANCES[torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(x, hx), theirs(x, hx)
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [state or dtype] * 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol)
    grads = torch.autograd.grad(sum(t.float().sum() for t in got), list(ours.parameters()))
    grads_ref = torch.autograd.grad(sum(t.float().sum() for t in expected), list(theirs.parameters()))
    for g, e in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=atol * RNN_GRAD_FACTOR, rtol=rtol * RNN_GRAD_FACTOR)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batch", [3, 20])
@pytest.mark.parametrize("route", ["onednn", "aten"])
def test_empty_sizes_as_torch(cls, batch, route, monkeypatch):
    """input_size 0 and hidden_size 0 are torch's cells' results too (GRUCell(5, 0) raised), with
    gradients, on both GEMM routes (oneDNN has no primitive for K = 0: from 16 rows it raised)."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", route)
    for input_size, hidden_size in ((5, 0), (0, 4)):
        torch.manual_seed(0)
        ours = getattr(attnkit.nn, cls)(input_size, hidden_size)
        theirs = getattr(torch.nn, cls)(input_size, hidden_size)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(batch, input_size, requires_grad=True)
        got, expected = ours(x), theirs(x)
        got, expected = (got[0], expected[0]) if cls == "LSTMCell" else (got, expected)
        torch.testing.assert_close(got, expected)
        if hidden_size:
            grads = torch.autograd.grad(got.square().sum(), [x, *ours.parameters()])
            torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), [x, *theirs.parameters()]))
