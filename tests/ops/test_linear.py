"""attnkit.ops.linear and attnkit.nn.Linear against torch.nn.functional.linear:
values on both backends over odd shapes (1 to 16 rows and past the cpp limit,
feature counts that are not a multiple of the 16-lane vector or of the 4-row
block), gradients, gradcheck, opcheck, dispatch and bad input."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_params, forced

import attnkit
from attnkit.backends.linear import MAX_ROWS
from attnkit.ops import linear

OP = "linear"
BACKENDS = backend_params(OP)

SHAPES = [  # (leading dims of x, in_features, out_features)
    ((1,), 1, 1), ((1,), 5, 3), ((2,), 16, 4), ((3,), 17, 5), ((4,), 80, 37), ((5,), 768, 9),
    ((2, 3), 33, 64), ((7,), 96, 130), ((MAX_ROWS,), 48, 7), ((MAX_ROWS + 1,), 20, 6), ((), 24, 11), ((0,), 8, 3),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_match_f_linear(backend, device, lead, k, n, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(*lead, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    with forced(OP, backend, device, rows=x.numel() // k if k else 0):
        y = linear(x, w, b)
        if x.numel():
            assert attnkit.last_dispatch(OP).backend == backend
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == expected.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * k ** 0.5)


def test_runs_cpp_for_few_float32_rows_and_f_linear_otherwise():
    w = torch.randn(8, 32)
    for rows, dtype, backend in ((1, torch.float32, "cpp"), (MAX_ROWS, torch.float32, "cpp"),
                                 (MAX_ROWS + 1, torch.float32, "reference"), (1, torch.float64, "reference")):
        linear(torch.randn(rows, 32, dtype=dtype), w.to(dtype))
        if attnkit.available_backends()["cpp"].available:
            assert attnkit.last_dispatch(OP).backend == backend, (rows, dtype)


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    x = torch.randn(40, 3)[::2].t()  # (3, 20) with strides (1, 6)
    w = torch.randn(20, 9).t()  # (9, 20) transposed
    b = torch.randn(18)[::2]
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS + 2])
def test_gradients_match_f_linear(backend, device, rows):
    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 21), torch.randn(6, 21), torch.randn(6)
    g = torch.randn(rows, 6)
    grads = []
    for fn in (linear, F.linear):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with forced(OP, backend, device, rows=rows):
            fn(*leaves).backward(g)
        grads.append([t.grad for t in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: linear(x, w), (x, w))


def test_gradient_to_weight_only():
    x, w = torch.randn(2, 5), torch.randn(3, 5, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(3, 5))


def test_opcheck():
    for rows in (1, MAX_ROWS + 1):
        args = (torch.randn(rows, 12), torch.randn(5, 12, requires_grad=True), torch.randn(5, requires_grad=True))
        torch.library.opcheck(torch.ops.attnkit.linear.default, args)


def test_nn_linear_is_a_drop_in():
    torch.manual_seed(0)
    theirs = torch.nn.Linear(24, 10)
    ours = attnkit.nn.Linear(24, 10)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert attnkit.nn.Linear(4, 2, bias=False).bias is None


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(2, 5), torch.randn(3, 4)), ValueError, "5 features"),
    ((torch.randn(2, 5), torch.randn(3, 5), torch.randn(4)), ValueError, "bias"),
    ((torch.randn(2, 5), torch.randn(3, 5, 1)), ValueError, "weight must be 2-D"),
    ((torch.randn(2, 5), torch.randn(3, 5, dtype=torch.float64)), TypeError, "weight"),
    (([1.0, 2.0], torch.randn(3, 2)), TypeError, "input must be a torch.Tensor"),
    ((torch.tensor(1.0), torch.randn(3, 1)), ValueError, "at least 1 dimension"),
    ((torch.randint(0, 3, (2, 5)), torch.randn(3, 5)), TypeError, "input has dtype"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        linear(*args)


def test_takes_f_linears_argument_names():
    x, weight, bias = torch.randn(2, 5), torch.randn(3, 5), torch.randn(3)
    torch.testing.assert_close(linear(input=x, weight=weight, bias=bias), F.linear(input=x, weight=weight, bias=bias))
    assert list(inspect.signature(linear).parameters) == ["input", "weight", "bias"]  # F.linear's (a builtin)


@pytest.mark.parametrize("rows", [1, 40])
def test_autocast_computes_in_its_dtype_as_f_linear(rows):
    """F.linear is on autocast's lower-precision list: attnkit.ops.linear and nn.Linear compute in the
    autocast dtype inside an autocast region (the cpp kernel is float32, so F.linear serves it),
    gradients reaching the float32 parameters; float64 is left alone."""
    torch.manual_seed(0)
    layer = attnkit.nn.Linear(24, 8)
    x = torch.randn(rows, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        assert linear(x.double(), layer.weight.double()).dtype == torch.float64
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_complex_tensors_run_as_torch_nn_linear():
    """torch.nn.Linear takes complex dtypes; the drop-in raised a TypeError for them."""
    torch.manual_seed(0)
    theirs = torch.nn.Linear(5, 7, dtype=torch.complex64)
    ours = attnkit.nn.Linear(5, 7, dtype=torch.complex64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, dtype=torch.complex64, requires_grad=True)
    got, want = ours(x), theirs(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.abs().sum(), x)[0], torch.autograd.grad(want.abs().sum(), x)[0])


def test_integer_tensors_run_as_f_linear():
    """F.linear takes integer x and weight of one dtype (README: other dtypes run F.linear); the op raised."""
    x, weight, bias = torch.randint(-5, 5, (3, 4)), torch.randint(-5, 5, (6, 4)), torch.randint(-5, 5, (6,))
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


@pytest.mark.parametrize("weight_shape,bias_shape", [((5,), None), ((3, 5), ()), ((3, 5), (1,)), ((3, 5), (2, 3))],
                         ids=["1-D weight", "0-D bias", "bias (1,)", "bias (rows, out)"])
def test_shapes_f_linear_takes_run_as_f_linear(weight_shape, bias_shape):
    """F.linear takes a 1-D weight and a bias that broadcasts to the output; the op refused them
    ("weight must be 2-D", "bias must have shape"), values and gradients now F.linear's."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, requires_grad=True)
    weight = torch.randn(weight_shape, requires_grad=True)
    bias = None if bias_shape is None else torch.randn(bias_shape, requires_grad=True)
    leaves = [t for t in (x, weight, bias) if t is not None]
    got, want = linear(x, weight, bias), F.linear(x, weight, bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves))
