"""attnkit.ops.layer_norm_lstm / layer_norm_gru on every backend against the
plain-PyTorch reference (values and every gradient), gradcheck in float64 on
the C++ path, and bad input."""
import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES, backend_params, forced

import attnkit
from attnkit import _extensions
from attnkit.ops import layer_norm_gru, layer_norm_lstm
from attnkit.backends.rnn_layernorm import LN_CUDA_ENV, CudaLayerNormGru, CudaLayerNormLstm
from attnkit.reference import rnn_layernorm as ref

LENGTHS = {"full": None, "sorted": [5, 3, 1], "unsorted": [2, 5, 0]}  # for B = 3, T = 5
SHAPES = [(5, 3, 4, 6), (5, 3, 4, 11), (1, 3, 2, 17), (5, 1, 3, 7), (5, 3, 3, 1)]  # (T, B, I, H): odd; 8-lane
# float vectors + tail (11, 17); T = 1; B = 1; H = 1


def make(cell, T, B, I, H, dtype=torch.float64, device="cpu", bias=True, seed=0):
    """(x, h0, c0 or None, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c or None), all leaves."""
    gen = torch.Generator().manual_seed(seed)
    G = (4 if cell == "lstm" else 3) * H

    def rand(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift
        return t.to(dtype=dtype, device=device).requires_grad_(True)

    x, h0 = rand(T, B, I), rand(B, H)
    c0 = rand(B, H) if cell == "lstm" else None
    w_ih, w_hh = rand(G, I, scale=0.5), rand(G, H, scale=0.5)
    b_ih, b_hh = (rand(G, scale=0.3), rand(G, scale=0.3)) if bias else (None, None)
    ln = lambda n: (rand(n, scale=0.3, shift=1.0), rand(n, scale=0.3))  # noqa: E731
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln(G), ln(G), ln(H) if cell == "lstm" else None


def zoneout_mask(kind, T, B, H, dtype, device, seed=1):
    if kind == "none":
        return None
    if kind == "eval":
        return torch.full((T, B, H), 0.3, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, H, generator=gen) < 0.4).to(dtype=dtype, device=device)


def run_op(cell, args, lengths=None, zoneout=None):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = args
    if cell == "lstm":
        out, (h, c) = layer_norm_lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, ln_ih=ln_ih, ln_hh=ln_hh, ln_c=ln_c,
                                      lengths=lengths, zoneout=zoneout)
        return out, h, c
    out, h = layer_norm_gru(x, h0, w_ih, w_hh, b_ih, b_hh, ln_ih=ln_ih, ln_hh=ln_hh, lengths=lengths, zoneout=zoneout)
    return out, h


def run_ref(cell, args, lengths=None, zoneout=None):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = args
    lengths = None if lengths is None else torch.tensor(lengths)
    if cell == "lstm":
        return ref.layer_norm_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, lengths, zoneout)[:3]
    return ref.layer_norm_gru(x, h0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, lengths, zoneout)[:2]


def leaves(args):
    flat = []
    for a in args:
        flat.extend(a if isinstance(a, tuple) else [a])
    return [t for t in flat if t is not None]


def weighted_loss(tensors):
    return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view_as(t)).sum() for t in tensors)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_precision_statistics_do_not_overflow(cell):
    """float16 runs the reference: its LN variance overflowed float16 once the projection's
    spread passed ~256 (inputs ~1e3, raw audio or sensor values), zeroing the normalized row."""
    torch.manual_seed(0)
    module = getattr(attnkit.nn, "LayerNorm" + cell.upper())(8, 6).eval()
    x = torch.randn(5, 2, 8) * 1000
    expected = module(x)[0]
    got = module.half()(x.half())[0]
    torch.testing.assert_close(got.float(), expected, atol=5e-3, rtol=0)


def test_a_constant_row_normalizes_to_zero():
    """mean() rounded a constant float32 row off by an ulp; times 1 / sqrt(eps) that was 0.4."""
    row = torch.full((1, 28), 12304.48046875)
    xhat, _ = ref._normalized(row)
    assert xhat.abs().max().item() == 0


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", backend_params("layer_norm_lstm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
@pytest.mark.parametrize("zoneout", ["none", "mask", "eval"])
def test_matches_reference(cell, backend, device, dtype, shape, lengths, zoneout, monkeypatch):
    if backend == "cuda":  # opt-in until a GPU run has checked it
        monkeypatch.setenv(LN_CUDA_ENV, "1")
    T, B, I, H = shape
    lengths = LENGTHS[lengths] if (T, B) == (5, 3) else None
    with forced(f"layer_norm_{cell}", backend, device, dtype) as dev:
        args = make(cell, T, B, I, H, dtype, dev, bias=zoneout != "eval")
        mask = zoneout_mask(zoneout, T, B, H, dtype, dev)
        outs = run_op(cell, args, lengths, mask)
        assert attnkit.last_dispatch(f"layer_norm_{cell}").backend == backend
        assert outs[0].shape == (T, B, H) and all(o.shape == (B, H) for o in outs[1:])
        expected = run_ref(cell, args, lengths, mask)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(outs, expected, atol=atol, rtol=rtol)
        present = leaves(args)
        grads = torch.autograd.grad(weighted_loss(outs), present)
        grads_ref = torch.autograd.grad(weighted_loss(expected), present)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g, r, atol=atol * RNN_GRAD_FACTOR, rtol=rtol * RNN_GRAD_FACTOR)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,lengths", [(1, 1, None), (3, 1, None), (3, 2, [3, 1]), (3, 2, [1, 3]), (3, 2, [2, 0])],
                         ids=str)
@pytest.mark.parametrize("zoneout", ["none", "mask"])
def test_gradcheck_cpp_float64(cell, T, B, lengths, zoneout):
    args = make(cell, T, B, 2, 3, bias=True)  # odd H
    mask = zoneout_mask(zoneout, T, B, 3, torch.float64, "cpu")
    structure = [(len(a) if isinstance(a, tuple) else None) for a in args]
    present = leaves(args)

    def fn(*flat):
        it, rebuilt = iter(flat), []
        for a, n in zip(args, structure):
            rebuilt.append(None if a is None else tuple(next(it) for _ in range(n)) if n else next(it))
        return run_op(cell, rebuilt, lengths, mask)

    with attnkit.use_backend("cpp"):
        assert torch.autograd.gradcheck(fn, present)
        assert attnkit.last_dispatch(f"layer_norm_{cell}").backend == "cpp"


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saved_tensors_agree_across_backends(cell):
    """The cpp kernels save what the reference computes, so either backward takes either forward."""
    args = make(cell, 5, 3, 4, 6)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = args
    lengths = torch.tensor(LENGTHS["unsorted"])
    mask = zoneout_mask("mask", 5, 3, 6, torch.float64, "cpu")
    ext = _extensions.load("_C")[0]
    if cell == "lstm":
        got = ext.ln_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln_ih, *ln_hh, *ln_c, lengths, mask, True)
        want = ref.layer_norm_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, lengths, mask)
    else:
        got = ext.ln_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, *ln_ih, *ln_hh, lengths, mask, True)
        want = ref.layer_norm_gru(x, h0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, lengths, mask)
    run = (torch.arange(5).unsqueeze(1) < lengths).unsqueeze(2)  # rows past their length: unused by the backward
    for g, w in zip(got, want):
        if g.dim() == 3:
            g, w = torch.where(run, g, 0), torch.where(run, w, 0)
        torch.testing.assert_close(g, w.detach())


def _forward_entry(ext, cell, args, lengths, mask):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = args
    if cell == "lstm":
        return ext.ln_lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln_ih, *ln_hh, *ln_c, lengths, mask, True)
    return ext.ln_gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, *ln_ih, *ln_hh, lengths, mask, True)


def _backward_entry(ext, cell, grads, args, lengths, mask, saved):
    x, h0, c0, w_ih, w_hh, _, _, ln_ih, ln_hh, ln_c = args
    if cell == "lstm":
        return ext.ln_lstm_backward(*grads, x, h0, c0, w_ih, w_hh, ln_ih[0], ln_hh[0], *ln_c, lengths, mask, saved[0],
                                    *saved[3:])
    return ext.ln_gru_backward(*grads, x, h0, w_ih, w_hh, ln_ih[0], ln_hh[0], lengths, mask, saved[0], *saved[2:])


@pytest.mark.gpu
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (7, 5, 24, 300), (3, 2, 8, 1)], ids=str)  # H past one block's threads
def test_cuda_entry_points_match_the_cpu_kernels(cell, shape):
    """The CUDA kernels' saved tensors and gradients against the CPU's on the same float64
    inputs (unsorted lengths with an empty row, a zoneout mask); the forward of one device
    feeds the backward of the other."""
    T, B, I, H = shape
    cpu, gpu = _extensions.load("_C")[0], _extensions.load("_C_cuda")[0]
    args = [tuple(t.detach() for t in a) if isinstance(a, tuple) else a if a is None else a.detach()
            for a in make(cell, T, B, I, H)]
    moved = [tuple(t.cuda() for t in a) if isinstance(a, tuple) else a if a is None else a.cuda() for a in args]
    lengths = torch.tensor([T, 0, max(1, T - 2), T, 1][:B])
    mask = zoneout_mask("mask", T, B, H, torch.float64, "cpu")
    want, got = _forward_entry(cpu, cell, args, lengths, mask), _forward_entry(gpu, cell, moved, lengths, mask.cuda())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-10)
    grads = [torch.randn(T, B, H, dtype=torch.float64)] + [torch.randn(B, H, dtype=torch.float64)
                                                           for _ in range(2 if cell == "lstm" else 1)]
    want = _backward_entry(cpu, cell, grads, args, lengths, mask, want)
    got = _backward_entry(gpu, cell, [g.cuda() for g in grads], moved, lengths, mask.cuda(), got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-9, atol=1e-10)


def test_cuda_kernels_are_opt_in_until_a_gpu_has_run_them(monkeypatch):
    """Their reasons, read without a GPU: opt-in unless ATTNKIT_RNN_LN_CUDA=1 or forced by name;
    float32 and float64 only; the built extension has the entry points."""
    if _extensions.load("_C_cuda")[0] is None:
        pytest.skip("attnkit._C_cuda is not built here")
    call = {"device": torch.device("cuda"), "dtype": torch.float32}
    monkeypatch.delenv(LN_CUDA_ENV, raising=False)
    for impl in (CudaLayerNormLstm(), CudaLayerNormGru()):
        assert "opt-in" in impl.not_supported_reasons(call)[0]
        with attnkit.use_backend("cuda", op=impl.op):
            assert impl.not_supported_reasons(call) == []
        assert "float32, float64" in impl.not_supported_reasons(dict(call, dtype=torch.bfloat16))[0]
    monkeypatch.setenv(LN_CUDA_ENV, "1")
    assert CudaLayerNormLstm().not_supported_reasons(call) == CudaLayerNormGru().not_supported_reasons(call) == []


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_zero_variance_rows_are_finite(cell, backend):
    """All-zero projections (x, h0, weights zero): LN divides by sqrt(eps), no NaN."""
    args = make(cell, 3, 2, 3, 4)
    with torch.no_grad():
        for t in (args[0], args[1], args[3], args[4]):
            t.zero_()
    with attnkit.use_backend(backend):
        outs = run_op(cell, args)
        grads = torch.autograd.grad(weighted_loss(outs), leaves(args))
    expected = run_ref(cell, args)
    torch.testing.assert_close(outs, expected)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend,device", backend_params("layer_norm_lstm"))
def test_autocast_leaves_the_ops_in_their_inputs_dtype(cell, backend, device, monkeypatch):
    """As layer_norm (autocast's float32 list): same values and gradients inside an autocast region,
    float32 out. Under CPU autocast the kernels' products came back in bfloat16 and the cpp kernels
    raised; the cuda ones would have read them as float32."""
    if backend == "cuda":
        monkeypatch.setenv(LN_CUDA_ENV, "1")
    with forced(f"layer_norm_{cell}", backend, device, torch.float32) as dev:
        args = make(cell, 4, 2, 3, 5, torch.float32, dev)
        expected = run_op(cell, args)
        expected_grads = torch.autograd.grad(weighted_loss(expected), leaves(args))
        with torch.autocast(dev.type, dtype=torch.bfloat16 if dev.type == "cpu" else torch.float16):
            outs = run_op(cell, args)
            grads = torch.autograd.grad(weighted_loss(outs), leaves(args))
    assert all(o.dtype == torch.float32 for o in outs)
    torch.testing.assert_close(outs, expected, rtol=0, atol=0)
    torch.testing.assert_close(grads, expected_grads, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_autocast_casts_half_inputs_to_float32_as_layer_norm(cell, half):
    """Inside an autocast region a bfloat16 input (an autocast linear's output) with float32
    parameters ran into the ops' dtype check; layer_norm there computes in float32. Now the
    half tensors are cast to float32: the float32 run on the upcast values, gradients in the
    inputs' own dtypes."""
    args = make(cell, 4, 2, 3, 5, torch.float32)
    x_half = args[0].detach().to(half).requires_grad_(True)
    h0_half = args[1].detach().to(half).requires_grad_(True)
    upcast = (x_half.detach().float().requires_grad_(True), h0_half.detach().float().requires_grad_(True), *args[2:])
    expected = run_op(cell, upcast)
    expected_grads = torch.autograd.grad(weighted_loss(expected), upcast[:2])
    with attnkit.use_backend("cpp"), torch.autocast("cpu", dtype=half):
        outs = run_op(cell, (x_half, h0_half, *args[2:]))
        grads = torch.autograd.grad(weighted_loss(outs), (x_half, h0_half))
    assert all(o.dtype == torch.float32 for o in outs)
    assert [g.dtype for g in grads] == [half, half]
    torch.testing.assert_close(outs, expected, rtol=0, atol=0)
    torch.testing.assert_close(grads, [g.to(half) for g in expected_grads], rtol=0, atol=0)
    with pytest.raises((TypeError, RuntimeError), match="dtype"):  # outside autocast: the mismatch is refused
        run_op(cell, (x_half, h0_half, *args[2:]))


def test_no_grad_saves_nothing():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in make("lstm", 3, 2, 3, 4)]
    args = [tuple(t.detach() for t in a) if isinstance(a, tuple) else a for a in args]
    with attnkit.use_backend("cpp"):
        outs = run_op("lstm", args)
    torch.testing.assert_close(outs, run_ref("lstm", args))


# --------------------------------------------------------------------------- bad input


def _lstm_call(**changes):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = make("lstm", 3, 2, 3, 4)
    kw = dict(input=x, hx=(h0, c0), w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, ln_ih=ln_ih, ln_hh=ln_hh, ln_c=ln_c)
    kw.update(changes)
    return layer_norm_lstm(**kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(ln_ih=torch.ones(16)), TypeError, "ln_ih must be a \\(weight, bias\\) pair"),
    (dict(ln_hh=(torch.ones(15, dtype=torch.float64), torch.zeros(16, dtype=torch.float64))), ValueError,
     r"ln_hh\[0\] \(weight\) must have shape \(16,\)"),
    (dict(ln_c=(torch.ones(4), torch.zeros(4))), TypeError, "ln_c\\[0\\] \\(weight\\) has dtype"),
    (dict(ln_c=(torch.ones(4, dtype=torch.float64), "b")), TypeError, "ln_c\\[1\\] \\(bias\\) must be a torch.Tensor"),
    (dict(zoneout=torch.full((3, 2, 4), 1.5, dtype=torch.float64)), ValueError, "zoneout must hold values in \\[0, 1\\]"),
    (dict(zoneout=torch.full((3, 2, 4), float("nan"), dtype=torch.float64)), ValueError, "zoneout must hold values in"),
    (dict(zoneout=torch.zeros(3, 2, 4, dtype=torch.float64, requires_grad=True)), NotImplementedError,
     "gradients with respect to zoneout are not implemented"),
    (dict(zoneout=torch.zeros(3, 2, 5, dtype=torch.float64)), ValueError, "zoneout must have shape \\(3, 2, 4\\)"),
    (dict(zoneout=torch.zeros(3, 2, 4)), TypeError, "zoneout has dtype"),
    (dict(input=torch.zeros(3, 2, 5, dtype=torch.float64)), ValueError, "input has 5 features"),
    (dict(hx=(torch.zeros(2, 4, dtype=torch.float64),)), TypeError, "hx must be a tuple"),
    (dict(lengths=[1, 4]), ValueError, "lengths must lie in"),
])
def test_bad_input_raises_before_any_kernel(changes, error, match):
    with pytest.raises(error, match=match):
        _lstm_call(**changes)


def test_gru_bad_input():
    x, h0, _, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, _ = make("gru", 3, 2, 3, 4)
    with pytest.raises(ValueError, match="ln_ih\\[1\\] \\(bias\\) must have shape \\(12,\\)"):
        layer_norm_gru(x, h0, w_ih, w_hh, ln_ih=(ln_ih[0], ln_ih[1][:5]), ln_hh=ln_hh)
    with pytest.raises(ValueError, match="hx must have shape"):
        layer_norm_gru(x, h0[:1], w_ih, w_hh, ln_ih=ln_ih, ln_hh=ln_hh)


def test_cpp_entry_points_check_their_arguments():
    """Called directly with wrong arguments, the C++ raises (TORCH_CHECK), never crashes."""
    ext = _extensions.load("_C")[0]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c = [
        tuple(t.detach() for t in a) if isinstance(a, tuple) else a.detach() for a in make("lstm", 3, 2, 3, 4)
    ]
    good = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, *ln_ih, *ln_hh, *ln_c, None, None, True]
    for index, bad, match in [(1, h0[:1], "h0 must have shape"), (7, ln_ih[0][:3], "g_ih must have shape"),
                              (0, x.float(), "has dtype"), (13, torch.tensor([1, 9]), "lengths\\[1\\] = 9"),
                              (14, torch.zeros(3, 2, 4), "zoneout has dtype"), (4, w_hh.t(), "w_hh must")]:
        args = list(good)
        args[index] = bad
        with pytest.raises(RuntimeError, match=match):
            ext.ln_lstm_forward(*args)
    saved = ext.ln_lstm_forward(*good[:-1], False)
    with pytest.raises(RuntimeError, match="save=false"):
        ext.ln_lstm_backward(saved[0], h0, c0, x, h0, c0, w_ih, w_hh, ln_ih[0], ln_hh[0], *ln_c, None, None, *saved[:1],
                             *saved[3:])
    xg, hg, _, wig, whg, big, bhg, lig, lhg, _ = make("gru", 3, 2, 3, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="be_hh must have shape"):
        ext.ln_gru_forward(xg, hg, wig, whg, big, bhg, *lig, lhg[0], lhg[1][:2], None, None, True)
