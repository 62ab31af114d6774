"""The LSTM cell custom ops: torch.library.opcheck and torch.compile(fullgraph=True)
on the CPU backends (compiling the Triton path needs a GPU)."""
import pytest
import torch
from test_lstm_cell import make_inputs

import attnkit
from attnkit.ops import lstm_cell

CPU_BACKENDS = ["cpp", "reference"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_forward_and_backward(backend, bias):
    x, (h, c), w_ih, w_hh, b_ih, b_hh = make_inputs(3, 4, 5, torch.float32, "cpu", bias=bias, requires_grad=True)
    with attnkit.use_backend(backend):
        torch.library.opcheck(torch.ops.attnkit.lstm_cell_forward.default, (x, h, c, w_ih, w_hh, b_ih, b_hh))
        h_new, c_new, gates = torch.ops.attnkit.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        grads = (torch.randn_like(h_new), torch.randn_like(c_new))
        backward_args = (*grads, x, h, c, w_ih, w_hh, gates, c_new)
        torch.library.opcheck(
            torch.ops.attnkit.lstm_cell_backward.default, tuple(t.detach() for t in backward_args)
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    x, hx, w_ih, w_hh, b_ih, b_hh = make_inputs(4, 6, 8, torch.float32, "cpu", requires_grad=True)

    def two_steps(x, hx, w_ih, w_hh, b_ih, b_hh):
        h, c = lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)
        h, c = lstm_cell(torch.tanh(x), (h, c), w_ih, w_hh, b_ih, b_hh)
        return (h * h).sum() + c.sum()

    leaves = [x, *hx, w_ih, w_hh, b_ih, b_hh]
    with attnkit.use_backend(backend):
        compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager")
        loss = compiled(x, hx, w_ih, w_hh, b_ih, b_hh)
        grads = torch.autograd.grad(loss, leaves)
        assert attnkit.last_dispatch("lstm_cell").backend == backend
    with attnkit.use_backend("reference"):
        loss_ref = two_steps(x, hx, w_ih, w_hh, b_ih, b_hh)
        grads_ref = torch.autograd.grad(loss_ref, leaves)
    torch.testing.assert_close(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_compile_inductor_runs_the_op():
    """Inductor (the default backend) keeps the custom op as one call."""
    torch._dynamo.reset()
    x, hx, w_ih, w_hh, b_ih, b_hh = make_inputs(2, 3, 4, torch.float32, "cpu")
    compiled = torch.compile(lstm_cell, fullgraph=True)
    h, c = compiled(x, hx, w_ih, w_hh, b_ih, b_hh)
    h_ref, c_ref = torch.lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
