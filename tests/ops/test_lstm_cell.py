"""attnkit.ops.lstm_cell on every backend against torch.nn.LSTMCell and the reference."""
import pytest
import torch
from helpers import TOLERANCES, backend_params, forced

import attnkit
from attnkit.ops import lstm_cell

OP = "lstm_cell"
SHAPES = [  # (batch, input_size, hidden_size)
    (1, 1, 1),
    (3, 5, 7),
    (2, 17, 33),
    (4, 64, 32),
    (1, 3, 129),
    (17, 9, 12),  # past 16 rows: GEMMs on the CPU (oneDNN; the backward's by vendor), not the few-row GEMV
    (33, 40, 24),
]


def make_inputs(batch, input_size, hidden, dtype, device, bias=True, requires_grad=False):
    gen = torch.Generator().manual_seed(batch * 1000 + input_size * 10 + hidden)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    x, h, c = rand(batch, input_size), rand(batch, hidden), rand(batch, hidden)
    w_ih, w_hh = rand(4 * hidden, input_size, scale=0.5), rand(4 * hidden, hidden, scale=0.5)
    b_ih, b_hh = (rand(4 * hidden), rand(4 * hidden)) if bias else (None, None)
    return x, (h, c), w_ih, w_hh, b_ih, b_hh


def torch_lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh):
    return torch.lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_values_and_grads_match_torch(backend, device, shape, bias, dtype):
    with forced(OP, backend, device, dtype) as dev:
        args = make_inputs(*shape, dtype, dev, bias=bias, requires_grad=True)
        h, c = lstm_cell(*args)
        assert attnkit.last_dispatch(OP).backend == backend
        loss = (h * torch.linspace(-1, 1, h.numel(), dtype=dtype, device=dev).view_as(h)).sum() + (c**2).sum()
        leaves = [args[0], *args[1], *[t for t in args[2:] if t is not None]]
        grads = torch.autograd.grad(loss, leaves)

    h_ref, c_ref = torch_lstm_cell(*args)
    loss_ref = (h_ref * torch.linspace(-1, 1, h.numel(), dtype=dtype, device=dev).view_as(h)).sum() + (c_ref**2).sum()
    grads_ref = torch.autograd.grad(loss_ref, leaves)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(c, c_ref, atol=atol, rtol=rtol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (3, 4, 6)], ids=str)
def test_gradcheck_float64(backend, device, shape):
    with forced(OP, backend, device, torch.float64) as dev:
        args = make_inputs(*shape, torch.float64, dev, requires_grad=True)

        def fn(x, h, c, w_ih, w_hh, b_ih, b_hh):
            return lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

        flat = (args[0], *args[1], *args[2:])
        assert torch.autograd.gradcheck(fn, flat)


@pytest.mark.parametrize("backend,device", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_matches_float32_reference(backend, device, dtype):
    """Values and every gradient against torch's float32 cell on the same (rounded) inputs."""
    with forced(OP, backend, device, dtype) as dev:
        args = make_inputs(3, 8, 16, dtype, dev, requires_grad=True)
        h, c = lstm_cell(*args)
        leaves = [args[0], *args[1], *args[2:]]
        grads = torch.autograd.grad((h.float() * 0.7 + c.float() * 1.3).sum(), leaves)
    assert h.dtype == dtype and c.dtype == dtype
    wide = [t.detach().float().requires_grad_() for t in leaves]
    h_ref, c_ref = torch_lstm_cell(wide[0], tuple(wide[1:3]), *wide[3:])
    grads_ref = torch.autograd.grad((h_ref * 0.7 + c_ref * 1.3).sum(), wide)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(h.float(), h_ref, atol=atol * 2, rtol=rtol * 2)
    torch.testing.assert_close(c.float(), c_ref, atol=atol * 2, rtol=rtol * 2)
    # bf16 gradients on the CPU: 1e-2 measured (cpp), 3e-2 allowed (10x TOLERANCES let every
    # gradient 15% off pass); the GPU keeps 10x until measured there.
    grad_tol = 3e-2 if dtype == torch.bfloat16 and dev.type == "cpu" else atol * 10
    for g, r in zip(grads, grads_ref):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, atol=grad_tol, rtol=grad_tol)


@pytest.mark.parametrize("backend,device", backend_params(OP))
def test_hx_none_means_zeros_and_unused_output_has_no_grad_issue(backend, device):
    with forced(OP, backend, device) as dev:
        x, _, w_ih, w_hh, b_ih, b_hh = make_inputs(2, 3, 4, torch.float32, dev, requires_grad=True)
        h, _ = lstm_cell(x, None, w_ih, w_hh, b_ih, b_hh)
        (gx,) = torch.autograd.grad(h.sum(), [x])  # c never reaches the loss
    zeros = torch.zeros(2, 4, device=dev)
    h_ref, _ = torch_lstm_cell(x, (zeros, zeros), w_ih, w_hh, b_ih, b_hh)
    (gx_ref,) = torch.autograd.grad(h_ref.sum(), [x])
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_saturated_gates_stay_finite():
    """Huge pre-activations saturate sigmoid/tanh: no NaN/inf, like torch."""
    x, hx, w_ih, w_hh, b_ih, b_hh = make_inputs(2, 3, 4, torch.float32, "cpu", requires_grad=True)
    with torch.no_grad():
        w_ih.mul_(1e4)
    for backend in ("cpp", "reference"):
        with attnkit.use_backend(backend):
            h, c = lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)
            grads = torch.autograd.grad((h.sum() + c.sum()), [x, w_ih])
        h_ref, c_ref = torch_lstm_cell(x, hx, w_ih, w_hh, b_ih, b_hh)
        torch.testing.assert_close(h, h_ref)
        torch.testing.assert_close(c, c_ref)
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("batch", [6, 20])  # the few-row GEMV and oneDNN's GEMMs
def test_non_contiguous_inputs(batch):
    x, hx, w_ih, w_hh, b_ih, b_hh = make_inputs(batch, 5, 3, torch.float32, "cpu")
    x_strided = torch.randn(5, batch).t().requires_grad_()  # (batch, 5), not contiguous
    w_t = w_ih.t().contiguous().t().requires_grad_()  # same values, transposed strides
    w_ref = w_ih.clone().requires_grad_()
    h, c = lstm_cell(x_strided, hx, w_t, w_hh, b_ih, b_hh)
    h_ref, c_ref = torch_lstm_cell(x_strided, hx, w_ref, w_hh, b_ih, b_hh)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(c, c_ref)
    grads = torch.autograd.grad((h * c).sum(), (x_strided, w_t))
    grads_ref = torch.autograd.grad((h_ref * c_ref).sum(), (x_strided, w_ref))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("route", ["onednn", "aten"])
def test_backward_gemm_routes_on_cpu(route, monkeypatch):
    """Past 16 rows the float32 GEMMs, forward and backward, go to oneDNN or to at::mm (MKL
    on Intel CPUs) by the CPU's vendor: each route against torch, whatever this machine picks."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", route)
    args = make_inputs(33, 40, 24, torch.float32, "cpu", requires_grad=True)
    with attnkit.use_backend("cpp"):
        h, c = lstm_cell(*args)
    h_ref, c_ref = torch_lstm_cell(*args)
    leaves = [args[0], *args[1], *args[2:]]
    grads = torch.autograd.grad((h * c).sum() + h.sum(), leaves)
    grads_ref = torch.autograd.grad((h_ref * c_ref).sum() + h_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_zero_batch():
    x, hx, w_ih, w_hh, b_ih, b_hh = make_inputs(1, 3, 4, torch.float32, "cpu")
    h, c = lstm_cell(x[:0], (hx[0][:0], hx[1][:0]), w_ih, w_hh, b_ih, b_hh)
    assert h.shape == (0, 4) and c.shape == (0, 4)


class TestBadInput:
    def args(self):
        return list(make_inputs(2, 3, 4, torch.float32, "cpu"))

    def test_input_not_tensor(self):
        args = self.args()
        args[0] = [[1.0, 2.0, 3.0]]
        with pytest.raises(TypeError, match="input must be a torch.Tensor"):
            lstm_cell(*args)

    def test_input_wrong_rank(self):
        args = self.args()
        args[0] = args[0][None]
        with pytest.raises(ValueError, match="input must be 2-D"):
            lstm_cell(*args)

    def test_integer_dtype(self):
        args = self.args()
        args[0] = args[0].long()
        with pytest.raises(TypeError, match="input has dtype int64"):
            lstm_cell(*args)

    def test_w_ih_shape(self):
        args = self.args()
        args[2] = args[2][:, :2]
        with pytest.raises(ValueError, match="input has 3 features but w_ih expects input_size 2"):
            lstm_cell(*args)

    def test_w_hh_not_4h(self):
        args = self.args()
        args[3] = args[3][:15]
        with pytest.raises(ValueError, match="w_hh must have shape"):
            lstm_cell(*args)

    def test_bias_shape(self):
        args = self.args()
        args[4] = args[4][:5]
        with pytest.raises(ValueError, match="b_ih must have shape"):
            lstm_cell(*args)

    def test_hx_not_pair(self):
        args = self.args()
        args[1] = args[1][0]
        with pytest.raises(TypeError, match="hx must be a tuple"):
            lstm_cell(*args)

    def test_hx_batch_mismatch(self):
        args = self.args()
        args[1] = (args[1][0][:1], args[1][1])
        with pytest.raises(ValueError, match=r"hx\[0\] must have shape \(2, 4\)"):
            lstm_cell(*args)

    def test_mixed_dtypes(self):
        args = self.args()
        args[3] = args[3].double()
        with pytest.raises(TypeError, match="w_hh has dtype torch.float64 but input has torch.float32"):
            lstm_cell(*args)

    def test_mixed_devices(self):
        args = self.args()
        args[2] = args[2].to("meta")
        with pytest.raises(RuntimeError, match="w_ih is on meta but input is on cpu"):
            lstm_cell(*args)

    def test_w_ih_rows(self):
        args = self.args()
        args[2] = args[2][:12]
        with pytest.raises(ValueError, match="w_ih must have 4\\*hidden_size = 16 rows"):
            lstm_cell(*args)


@pytest.mark.parametrize("custom_op", [False, True], ids=["eager", "custom_op"])
def test_bias_gradients_are_separate_tensors(custom_op):
    """b_ih and b_hh got one gradient tensor between them (their gradients are equal), so
    an in-place change of one changed the other; a frozen bias gets none."""
    x, (h, c), w_ih, w_hh, b_ih, b_hh = make_inputs(3, 5, 7, torch.float32, "cpu", requires_grad=True)

    def run():
        if custom_op:  # the autograd formula as torch.compile sees it
            return torch.ops.attnkit.lstm_cell_forward(x, h, c, w_ih, w_hh, b_ih, b_hh)[:2]
        return lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)

    h_new, c_new = run()
    g_ih, g_hh = torch.autograd.grad((h_new * c_new).sum(), [b_ih, b_hh])
    assert g_ih is not g_hh
    torch.testing.assert_close(g_ih, g_hh)
    b_hh.requires_grad_(False)
    h_new, c_new = run()
    (h_new * c_new).sum().backward()
    assert b_hh.grad is None
    torch.testing.assert_close(b_ih.grad, g_ih)


@pytest.mark.parametrize("batch", [3, 17])  # 17: the CPU kernels' ATen GEMM route
def test_runs_in_its_inputs_dtype_under_autocast(batch):
    """The kernels run with autocast off: its casts of their ATen GEMMs' operands failed
    ("expected scalar type Float but found BFloat16"); float32 inputs stay float32."""
    args = make_inputs(batch, 9, 12, torch.float32, "cpu", requires_grad=True)
    leaves = [args[0], *args[1], *args[2:]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = lstm_cell(*args)
        grads = torch.autograd.grad((h * c).sum(), leaves)
    assert h.dtype == c.dtype == torch.float32
    h_ref, c_ref = lstm_cell(*args)
    grads_ref = torch.autograd.grad((h_ref * c_ref).sum(), leaves)
    torch.testing.assert_close((h, c), (h_ref, c_ref), atol=0, rtol=0)
    torch.testing.assert_close(grads, grads_ref, atol=0, rtol=0)
