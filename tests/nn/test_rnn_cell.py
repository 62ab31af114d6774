"""attnkit.nn.LSTMCell is a drop-in for torch.nn.LSTMCell."""
import pytest
import torch

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
    with pytest.raises(ValueError, match="input has 4 features but w_ih expects input_size 5"):
        ours(torch.randn(2, 4))
