"""attnkit.ops.lstm / attnkit.ops.gru on every backend against the plain-PyTorch
reference (differentiated by autograd) and torch.nn.LSTM / GRU."""
import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES, backend_params, forced, num_threads

import attnkit
from attnkit import reference
from attnkit.ops import gru, lstm

LENGTHS = {"full": None, "sorted": [5, 3, 1], "unsorted": [2, 5, 0]}  # for B = 3, T = 5


def make_lstm(T, B, I, H, P, dtype, device, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return t.to(dtype=dtype, device=device).requires_grad_(True)

    x, h0, c0 = rand(T, B, I), rand(B, P), rand(B, H)
    w_ih, w_hh = rand(4 * H, I, scale=0.5), rand(4 * H, P, scale=0.5)
    b_ih, b_hh = (rand(4 * H), rand(4 * H)) if bias else (None, None)
    w_hr = rand(P, H, scale=0.5) if P != H else None
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr


def make_gru(T, B, I, H, dtype, device, bias=True, seed=0):
    x, h0, _, _, _, _, _, _ = make_lstm(T, B, I, H, H, dtype, device, bias, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rand = lambda *s: (torch.randn(*s, generator=gen, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    return x, h0, rand(3 * H, I), rand(3 * H, H), *((rand(3 * H), rand(3 * H)) if bias else (None, None))


def weighted_loss(tensors):
    """A loss that gives every output element a different gradient."""
    return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view_as(t)).sum() for t in tensors)


def check_against(outs, outs_ref, leaves, dtype, grad_scale=10):
    atol, rtol = TOLERANCES[dtype]
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(weighted_loss(outs), present)
    grads_ref = torch.autograd.grad(weighted_loss(outs_ref), present)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=atol * grad_scale, rtol=rtol * grad_scale)


@pytest.mark.parametrize("backend,device", backend_params("lstm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "shape", [(5, 3, 4, 6, 6), (5, 3, 9, 11, 4), (1, 3, 2, 17, 17), (5, 3, 3, 1, 1)], ids=str
)  # (T, B, I, H, P): odd sizes, vector lanes + tail, projection, T = 1, H = 1
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
def test_lstm_matches_reference(backend, device, dtype, shape, lengths):
    T, B, I, H, P = shape
    lengths = None if T == 1 else LENGTHS[lengths]
    with forced("lstm", backend, device, dtype) as dev:
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args = make_lstm(T, B, I, H, P, dtype, dev)
        out, (h_n, c_n) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths)
        assert attnkit.last_dispatch("lstm").backend == backend
        assert out.shape == (T, B, P) and h_n.shape == (B, P) and c_n.shape == (B, H)
        ref = reference.lstm(*args, None if lengths is None else torch.tensor(lengths))[:3]
        check_against((out, h_n, c_n), ref, args, dtype)


@pytest.mark.parametrize("backend,device", backend_params("gru"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (5, 3, 9, 11), (1, 3, 2, 17), (5, 3, 3, 1)], ids=str)
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gru_matches_reference(backend, device, dtype, shape, lengths, bias):
    T, B, I, H = shape
    lengths = None if T == 1 else LENGTHS[lengths]
    with forced("gru", backend, device, dtype) as dev:
        args = make_gru(T, B, I, H, dtype, dev, bias)
        out, h_n = gru(*args, lengths=lengths)
        assert attnkit.last_dispatch("gru").backend == backend
        ref = reference.gru(*args, None if lengths is None else torch.tensor(lengths))[:2]
        check_against((out, h_n), ref, args, dtype)


_LOOPS = [("fused_loop", torch.float32), ("fused_loop", torch.float16), ("generic_loop", torch.float32),
          ("generic_loop", torch.float16), ("direct_gemm", torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("loop, dtype", _LOOPS, ids=[f"{loop}-{dtype}" for loop, dtype in _LOOPS])
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
def test_cuda_time_loops_match_reference(monkeypatch, loop, dtype, lengths):
    """The cuda backend's time loops: its own (csrc/cuda/rnn.cu, a GEMM and a kernel a
    step on raw pointers, the default), the same with its GEMMs on cuBLAS directly
    (ATTNKIT_RNN_CUDA_DIRECT_GEMM=1, float16/bfloat16 only) and the shared one of
    rnn_sequence.h that ATTNKIT_RNN_CUDA_GENERIC_LOOP=1 selects. Values and every
    gradient, both kinds, B = 3 with lengths that stop rows (sorted: the GEMMs shrink;
    unsorted: masked); float16 against the float32 reference."""
    monkeypatch.delenv("ATTNKIT_RNN_CUDA_GENERIC_LOOP", raising=False)
    monkeypatch.delenv("ATTNKIT_RNN_CUDA_DIRECT_GEMM", raising=False)
    if loop == "generic_loop":
        monkeypatch.setenv("ATTNKIT_RNN_CUDA_GENERIC_LOOP", "1")
    if loop == "direct_gemm":
        from attnkit import _extensions

        assert _extensions.load("_C_cuda")[0].rnn_direct_gemm_available()  # else the default loop would run
        monkeypatch.setenv("ATTNKIT_RNN_CUDA_DIRECT_GEMM", "1")
    lengths = LENGTHS[lengths]
    ref_lengths = None if lengths is None else torch.tensor(lengths)

    def check(run, reference_run, args):
        if dtype == torch.float32:
            check_against(run(args), reference_run(args), args, dtype)
            return
        ours = [None if a is None else a.detach().to(dtype).requires_grad_() for a in args]
        outs, refs = run(ours), reference_run(args)
        for o, r in zip(outs, refs):  # float16: 3 significant digits, against float32
            torch.testing.assert_close(o.float(), r, atol=2e-2, rtol=2e-2)
        leaves = [(o, a) for o, a in zip(ours, args) if a is not None]
        grads = torch.autograd.grad(weighted_loss(outs), [o for o, _ in leaves])
        grads_ref = torch.autograd.grad(weighted_loss(refs), [a for _, a in leaves])
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g.float(), r, atol=5e-2, rtol=5e-2)

    with forced("lstm", "cuda", "cuda", dtype) as dev:
        check(lambda a: (lambda out, hc: (out, *hc))(*lstm(a[0], (a[1], a[2]), *a[3:7], lengths=lengths)),
              lambda a: reference.lstm(*a, ref_lengths)[:3], make_lstm(5, 3, 9, 24, 24, torch.float32, dev))
    with forced("gru", "cuda", "cuda", dtype) as dev:
        check(lambda a: gru(*a, lengths=lengths), lambda a: reference.gru(*a, ref_lengths)[:2],
              make_gru(5, 3, 9, 24, torch.float32, dev))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_reference_and_ops_match_torch_nn(backend):
    """The ground truth itself: one layer of torch.nn.LSTM (with projection) / GRU."""
    torch.manual_seed(0)
    x = torch.randn(6, 2, 5, dtype=torch.float64)
    m = torch.nn.LSTM(5, 7, proj_size=3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 7, dtype=torch.float64)
    out_ref, (h_ref, c_ref) = m(x, (h0, c0))
    with attnkit.use_backend(backend):
        out, (h, c) = lstm(x, (h0[0], c0[0]), m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0, w_hr=m.weight_hr_l0)
    torch.testing.assert_close((out, h, c), (out_ref, h_ref[0], c_ref[0]))
    g = torch.nn.GRU(5, 7, dtype=torch.float64)
    out_ref, h_ref = g(x, h0.new_ones(1, 2, 7))
    with attnkit.use_backend(backend):
        out, h = gru(x, h0.new_ones(2, 7), g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
    torch.testing.assert_close((out, h), (out_ref, h_ref[0]))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("lengths", [None, [3, 1], [2, 3]], ids=str)
@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
def test_gradcheck_float64(backend, lengths, proj):
    args = make_lstm(3, 2, 3, 4, 2 if proj else 4, torch.float64, "cpu")
    gargs = make_gru(3, 2, 3, 4, torch.float64, "cpu")
    with attnkit.use_backend(backend):
        def run_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *w_hr):
            out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr[0] if w_hr else None, lengths=lengths)
            return out, h, c

        assert torch.autograd.gradcheck(run_lstm, [a for a in args if a is not None])
        assert torch.autograd.gradcheck(lambda *a: gru(*a, lengths=lengths), gargs)


def test_inference_saves_nothing_and_matches_training():
    args = make_lstm(4, 3, 5, 8, 8, torch.float32, "cpu")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = args
    with torch.no_grad():
        out, h, c, gates, cs, hc = torch.ops.attnkit.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, False)
        assert gates.numel() == cs.numel() == hc.numel() == 0
    out_train, (h_train, c_train) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    torch.testing.assert_close((out, h, c), (out_train, h_train, c_train), atol=0, rtol=0)


@pytest.mark.parametrize("lengths", [None, [2, 4, 0]], ids=["plain", "lengths"])  # the quick checks, the full ones
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_missing_hx_means_zeros(kind, lengths):
    """hx=None runs from zero states (one zeros tensor for h0 and c0 on the quick
    path): the same values and gradients as explicit zeros, and no two outputs
    share memory through it (a row of length 0 hands its initial state back)."""
    if kind == "lstm":
        x, _, _, w_ih, w_hh, b_ih, b_hh, _ = make_lstm(4, 3, 5, 6, 6, torch.float64, "cpu")
        weights, zeros = (w_ih, w_hh, b_ih, b_hh), (torch.zeros(3, 6, dtype=torch.float64),) * 2
        call = lambda hx: (lambda out, state: (out, *state))(*lstm(x, hx, *weights, lengths=lengths))  # noqa: E731
    else:
        x, _, *weights = make_gru(4, 3, 5, 6, torch.float64, "cpu")
        zeros = torch.zeros(3, 6, dtype=torch.float64)
        call = lambda hx: gru(x, hx, *weights, lengths=lengths)  # noqa: E731
    leaves = [x, *weights]
    check_against(call(None), call(zeros), leaves, torch.float64)
    with torch.no_grad():
        outs = call(None)
        expected = [t.clone() for t in outs]
        outs[-1].fill_(7.0)  # the last state: c_n, or the GRU's h_n
        torch.testing.assert_close(outs[:-1], expected[:-1], atol=0, rtol=0)


def test_only_some_outputs_used():
    """Outputs that never reach the loss (h_n, c_n here) come back as None grads."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_lstm(3, 2, 3, 4, 4, torch.float64, "cpu")
    out, _ = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    ref = reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), [x])[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 3, 4, 6, 6), (5, 3, 9, 11, 4), (1, 3, 2, 17, 17), (8, 6, 5, 20, 20)],
                         ids=str)  # (T, B, I, H, P); batch 6: the fused loops of batch 5+
@pytest.mark.parametrize("lengths", ["full", "unsorted"])
def test_half_precision_runs_the_cpp_kernels_in_float32_on_cpu(dtype, shape, lengths):
    """bfloat16 / float16 on the CPU: the cpp kernels in float32, results rounded back;
    values and every gradient against the float32 reference on the same (rounded) inputs."""
    T, B, I, H, P = shape
    lengths = None if T == 1 or LENGTHS[lengths] is None else torch.tensor(LENGTHS[lengths] * (B // 3))
    wide = [None if a is None else a.detach().to(dtype).float().requires_grad_()
            for a in make_lstm(T, B, I, H, P, torch.float32, "cpu")]
    low = [None if a is None else a.detach().to(dtype).requires_grad_() for a in wide]
    outs = lstm(low[0], (low[1], low[2]), *low[3:7], w_hr=low[7], lengths=lengths)
    assert attnkit.last_dispatch("lstm").backend == "cpp"
    refs = reference.lstm(*wide, lengths)[:3]
    outs = (outs[0], *outs[1])
    assert all(o.dtype == dtype for o in outs)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.float(), r, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(weighted_loss([o.float() for o in outs]), [a for a in low if a is not None])
    grads_ref = torch.autograd.grad(weighted_loss(refs), [a for a in wide if a is not None])
    grad_tol = 6e-2 if dtype == torch.bfloat16 else 1e-2  # measured 3e-2 and 4e-3
    for g, r in zip(grads, grads_ref):  # the saved gates are rounded too: looser
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r, atol=grad_tol, rtol=grad_tol)

    gru_wide = [None if a is None else a.detach().to(dtype).float().requires_grad_()
                for a in make_gru(T, B, I, H, torch.float32, "cpu")]
    gru_low = [None if a is None else a.detach().to(dtype).requires_grad_() for a in gru_wide]
    out, h = gru(*gru_low, lengths=lengths)
    assert attnkit.last_dispatch("gru").backend == "cpp" and out.dtype == h.dtype == dtype
    refs = reference.gru(*gru_wide, lengths)[:2]
    torch.testing.assert_close(out.float(), refs[0], atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(weighted_loss([out.float(), h.float()]), gru_low)
    grads_ref = torch.autograd.grad(weighted_loss(refs), gru_wide)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), r, atol=6e-2, rtol=6e-2)


def test_half_precision_short_sequences_at_larger_batch_stay_on_the_reference():
    """Converting the weights to float32 costs more than a few steps save at batch 5+: the
    reference (bfloat16 GEMMs) serves those automatically; forcing cpp still runs it there."""
    low = [t.detach().bfloat16() for t in make_gru(2, 6, 3, 4, torch.float32, "cpu")]
    out, _ = gru(*low)
    decision = attnkit.last_dispatch("gru")
    assert decision.backend == "reference" and "pays from 8 steps at batch > 4" in "; ".join(decision.skipped["cpp"])
    with attnkit.use_backend("cpp"):
        forced_out, _ = gru(*low)
    assert attnkit.last_dispatch("gru").backend == "cpp"
    torch.testing.assert_close(forced_out.float(), out.float(), atol=2e-2, rtol=2e-2)
    long = [t.detach().bfloat16() for t in make_gru(8, 6, 3, 4, torch.float32, "cpu")]
    gru(*long)
    assert attnkit.last_dispatch("gru").backend == "cpp"


def test_half_precision_on_the_reference_backend_when_forced():
    x, h0, w_ih, w_hh, b_ih, b_hh = (t.detach().bfloat16() for t in make_gru(3, 2, 3, 4, torch.float32, "cpu"))
    with attnkit.use_backend("reference"):
        out, _ = gru(x, h0, w_ih, w_hh, b_ih, b_hh)
    assert attnkit.last_dispatch("gru").backend == "reference" and out.dtype == torch.bfloat16
    ref = reference.gru(*(t.float() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)))[0]
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend,device", [p for p in backend_params("lstm") if "cuda" in p.id])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_gpu(backend, device, dtype):
    """float16 / bfloat16 LSTM and GRU on the GPU: values (out, h_n, c_n) and every gradient
    against the float32 reference on the same (rounded) inputs. (Bounds of the CPU test's
    bfloat16 case, for both dtypes until measured on a GPU.)"""
    cases = {"lstm": (lambda a: (lambda o: (o[0], *o[1]))(lstm(a[0], (a[1], a[2]), *a[3:])),
                      lambda a: reference.lstm(*a, None, None)[:3], make_lstm(6, 4, 8, 16, 16, torch.float32, device)[:7]),
             "gru": (lambda a: (lambda o: (o[0], o[1]))(gru(*a)),
                     lambda a: reference.gru(*a)[:2], make_gru(6, 4, 8, 16, torch.float32, device))}
    for op, (run, run_reference, made) in cases.items():
        wide = [a.detach().to(dtype).float().requires_grad_() for a in made]
        low = [a.detach().to(dtype).requires_grad_() for a in wide]
        with forced(op, backend, device, dtype):
            outs = run(low)
            grads = torch.autograd.grad(weighted_loss([o.float() for o in outs]), low)
        refs = run_reference(wide)
        grads_ref = torch.autograd.grad(weighted_loss(refs), wide)
        for o, r in zip(outs, refs):
            assert o.dtype == dtype
            torch.testing.assert_close(o.float(), r, atol=2e-2, rtol=2e-2)
        for g, r in zip(grads, grads_ref):
            assert g.dtype == dtype
            torch.testing.assert_close(g.float(), r, atol=6e-2, rtol=6e-2)


def test_zero_batch_and_extreme_inputs():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_lstm(2, 3, 3, 4, 4, torch.float32, "cpu")
    out, (h, c) = lstm(x[:, :0], (h0[:0], c0[:0]), w_ih, w_hh, b_ih, b_hh)
    assert out.shape == (2, 0, 4) and h.shape == (0, 4)
    big = (x * 1e4).detach().requires_grad_()
    out, (h, c) = lstm(big, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    ref = reference.lstm(big, h0, c0, w_ih, w_hh, b_ih, b_hh)[:3]
    torch.testing.assert_close((out, h, c), ref)
    assert torch.isfinite(torch.autograd.grad(out.sum(), [big, w_ih])[1]).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = make_lstm(3, 2, 3, 4, 2, torch.float32, "cpu")
    gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh = make_gru(3, 2, 3, 4, torch.float32, "cpu")
    lengths = torch.tensor([3, 1])
    with attnkit.use_backend(backend):
        torch.library.opcheck(
            torch.ops.attnkit.lstm_forward.default, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, True)
        )
        torch.library.opcheck(torch.ops.attnkit.gru_forward.default, (gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh, None, True))


def test_compile_fullgraph():
    torch._dynamo.reset()
    args = make_gru(4, 2, 3, 5, torch.float32, "cpu")

    def loss(x, h0, w_ih, w_hh, b_ih, b_hh):
        out, h = gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=[4, 2])
        return (out * out).sum() + h.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*args), args)
    grads_ref = torch.autograd.grad(loss(*args), args)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


class TestBadInput:
    def lstm_args(self):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_lstm(3, 2, 3, 4, 4, torch.float32, "cpu")
        return [x, (h0, c0), w_ih, w_hh, b_ih, b_hh]

    @pytest.mark.parametrize(
        "change,error,match",
        [
            (lambda a: a.__setitem__(0, a[0][0]), ValueError, "input must be 3-D"),
            (lambda a: a.__setitem__(0, a[0][:0]), ValueError, "at least one time step"),
            (lambda a: a.__setitem__(0, a[0].long()), TypeError, "input has dtype int64"),
            (lambda a: a.__setitem__(2, a[2][:, :2]), ValueError, "input has 3 features but w_ih expects input_size 2"),
            (lambda a: a.__setitem__(3, a[3][:15]), ValueError, "w_hh must have 4\\*hidden_size rows"),
            (lambda a: a.__setitem__(3, a[3][:, :3]), ValueError, "w_hh must have shape"),
            (lambda a: a.__setitem__(2, a[2][:12]), ValueError, "w_ih must have 4\\*hidden_size = 16 rows"),
            (lambda a: a.__setitem__(4, a[4][:5]), ValueError, "b_ih must have shape"),
            (lambda a: a.__setitem__(1, a[1][0]), TypeError, "hx must be a tuple"),
            (lambda a: a.__setitem__(1, (a[1][0][:1], a[1][1])), ValueError, r"hx\[0\] must have shape \(2, 4\)"),
            (lambda a: a.__setitem__(1, (a[1][0], a[1][1][:, :3])), ValueError, r"hx\[1\] must have shape \(2, 4\)"),
            (lambda a: a.__setitem__(3, a[3].double()), TypeError, "w_hh has dtype torch.float64 but input"),
            (lambda a: a.__setitem__(2, a[2].to("meta")), RuntimeError, "w_ih is on meta but input is on cpu"),
            # Each tensor once more (ops.rnn's fast path for the common call must let none through).
            (lambda a: a.__setitem__(5, a[5][:15]), ValueError, "b_hh must have shape"),
            (lambda a: a.__setitem__(4, a[4].double()), TypeError, "b_ih has dtype torch.float64 but input"),
            (lambda a: a.__setitem__(1, (a[1][0], a[1][1].double())), TypeError, r"hx\[1\] has dtype"),
            (lambda a: a.__setitem__(1, (a[1][0].to("meta"), a[1][1])), RuntimeError, r"hx\[0\] is on meta"),
            (lambda a: a.__setitem__(1, [a[1][0][:1], a[1][1]]), ValueError, r"hx\[0\] must have shape"),
        ],
    )
    def test_lstm(self, change, error, match):
        args = self.lstm_args()
        change(args)
        with pytest.raises(error, match=match):
            lstm(*args)

    def test_w_hr_shape(self):
        args = self.lstm_args()
        with pytest.raises(ValueError, match="w_hr must have shape \\(4, 4\\)"):
            lstm(*args, w_hr=torch.randn(4, 3))

    @pytest.mark.parametrize(
        "lengths,error,match",
        [
            ([3], ValueError, "lengths must have shape \\(2,\\)"),
            ([4, 1], ValueError, "lengths must lie in \\[0, 3\\]"),
            ([-1, 1], ValueError, "lengths must lie in"),
            (torch.tensor([1.0, 2.0]), TypeError, "lengths must hold integers"),
            ("ab", TypeError, "lengths must be a tensor or sequence of integers"),
        ],
    )
    def test_lengths(self, lengths, error, match):
        with pytest.raises(error, match=match):
            lstm(*self.lstm_args(), lengths=lengths)

    def test_gru_hx(self):
        x, h0, w_ih, w_hh, b_ih, b_hh = make_gru(3, 2, 3, 4, torch.float32, "cpu")
        with pytest.raises(ValueError, match="hx must have shape \\(2, 4\\)"):
            gru(x, h0[:, :3], w_ih, w_hh, b_ih, b_hh)
        with pytest.raises(ValueError, match="w_hh must have 3\\*hidden_size rows"):
            gru(x, h0, w_ih, w_hh[:10], b_ih, b_hh)

    def test_cpp_entry_points_check_arguments(self):
        """Called directly, bypassing Python validation, the C++ raises, never crashes."""
        from attnkit import _extensions

        ext, reason = _extensions.load("_C")
        if ext is None:
            pytest.skip(reason)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = (None if t is None else t.detach() for t in make_lstm(3, 2, 3, 4, 4, torch.float32, "cpu"))
        with pytest.raises(RuntimeError, match="h0 must have shape"):
            ext.lstm_forward(x, h0[:1], c0, w_ih, w_hh, b_ih, b_hh, None, None, False)
        with pytest.raises(RuntimeError, match="lengths must lie in"):
            ext.lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, torch.tensor([9, 1]), False)
        with pytest.raises(RuntimeError, match="w_ih has dtype"):
            ext.gru_forward(x, h0, w_ih[:12].double(), w_hh[:12], None, None, None, False)
        with pytest.raises(RuntimeError, match="gates must have shape"):
            out = torch.zeros(3, 2, 4)
            ext.gru_backward(out, h0, x, h0, w_ih[:12], w_hh[:12], None, out, out)


@pytest.mark.cuda_build
def test_cuda_extension_exports_the_rnn_kernels():
    from attnkit import _extensions

    ext, reason = _extensions.load("_C_cuda")
    assert ext is not None, reason
    for name in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward"):
        assert callable(getattr(ext, name))


def check_cpp_against_reference(kind, T, B, I, H, dtype, lengths=None, seed=0, grad_scale=10):
    """`kind` ("lstm" / "gru", no projection) on the cpp backend vs the reference:
    outputs, final states and every gradient (h0, c0 and all weights included)."""
    lengths = None if lengths is None else torch.as_tensor(lengths)
    if kind == "lstm":
        args = make_lstm(T, B, I, H, H, dtype, "cpu", seed=seed)[:-1]
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
        with attnkit.use_backend("cpp"):
            out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths=lengths)
        outs, ref = (out, h, c), reference.lstm(*args, None, lengths)[:3]
    else:
        args = make_gru(T, B, I, H, dtype, "cpu", seed=seed)
        with attnkit.use_backend("cpp"):
            out, h = gru(*args, lengths=lengths)
        outs, ref = (out, h), reference.gru(*args, lengths)[:2]
    check_against(outs, ref, args, dtype, grad_scale)


@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted"])
def test_larger_batch_float32_cpp(lengths):
    """Batches of 16+ rows take the oneDNN GEMMs, 1-4 the small-batch dot products."""
    T, B = 6, 20
    if lengths is not None:
        lengths = torch.arange(B, 0, -1).clamp(max=T) if lengths == "sorted" else torch.randint(0, T + 1, (B,))
    for kind in ("lstm", "gru"):
        check_cpp_against_reference(kind, T, B, 24, 32, torch.float32, lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("lengths", [None, [7, 2], [3, 7]], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_small_batch_time_loop_cpp(dtype, lengths, threads):
    """Batches of 1-4 run the whole LSTM time loop in one OpenMP team, threads
    splitting the hidden units (rnn_small_batch.h): H = 70 gives a vector tail
    in each thread's slice, and the lengths stop rows mid-sequence."""
    with num_threads(threads):
        check_cpp_against_reference("lstm", 7, 2, 5, 70, dtype, lengths)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_batch_every_size_cpp(kind, dtype, B, threads):
    """B = 1..4 run whole in rnn_small_batch.h / rnn_small_batch_gru.h (B = 5:
    the generic loop, the boundary): values and all gradients (dh_n, dc_n fed
    too) vs the reference, h0 given. H = 1 (all padding), 17, 20, 37 (vector
    tails), 64 (whole vectors), 70 (each thread's slice ends in a tail), 130
    (several weight panels); T = 1, 5, 9, 17; lengths stop rows mid-sequence
    (B = 1 too), one at 0 steps, unsorted. Two threads split the units where
    B H >= 96 (small_batch_threads)."""
    with num_threads(threads):
        for T, H in ((1, 17), (1, 20), (9, 1), (9, 70), (5, 130), (17, 37), (17, 64)):
            # At T = 17 float32 weight gradients reach ~100: rounding alone (the reference's too) is ~5e-4 there.
            grad_scale = 50 if T > 9 else 10
            for lengths in (None, [T, 0, max(T - 3, 1), 1, T][:B], [max(T - 3, 1), T, 0, T, 1][:B]):
                check_cpp_against_reference(kind, T, B, 6, H, dtype, lengths, seed=B + H, grad_scale=grad_scale)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_small_batch_bias_gradients_over_long_sequences_cpp(kind):
    """The small-batch backward sums the bias gradients step after step: over T B = 8000
    float32 terms that sum erred by 1.4e-4 (LSTM) and 3.2e-4 (GRU) of the largest against
    float64; summed in float64 it is ~5e-7 (torch's float32 nn.LSTM ~3e-4 at T B = 20000)."""
    torch.manual_seed(0)
    T, B, I, H = 4000, 2, 4, 8
    ours = getattr(attnkit.nn, kind.upper())(I, H)
    truth = getattr(torch.nn, kind.upper())(I, H, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(T, B, I)
    weights = torch.linspace(-1, 1, T * B * H).view(T, B, H)
    with attnkit.use_backend("cpp", op=kind):
        out, _ = ours(x)
    grads = torch.autograd.grad((out * weights).sum(), [ours.bias_ih_l0, ours.bias_hh_l0])
    out64, _ = truth(x.double())
    grads64 = torch.autograd.grad((out64 * weights.double()).sum(), [truth.bias_ih_l0, truth.bias_hh_l0])
    for g, g64 in zip(grads, grads64):
        assert ((g.double() - g64).abs().max() / g64.abs().max()).item() < 1e-5


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("biases", ["b_ih", "b_hh", "both", "none"])
@pytest.mark.parametrize("B", [1, 3])
def test_small_batch_biases_cpp(kind, biases, B):
    """The small-batch forwards' input projections take no bias: the LSTM starts each step's
    recurrent product with b_ih + b_hh, the GRU with b_hh and adds b_ih in its gate math.
    Each bias alone, both and neither, H = 37 (a vector tail in each thread's slice), values
    and every gradient vs the reference."""
    if kind == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = make_lstm(6, B, 5, 37, 37, torch.float32, "cpu", seed=B)
    else:
        x, h0, w_ih, w_hh, b_ih, b_hh = make_gru(6, B, 5, 37, torch.float32, "cpu", seed=B)
    b_ih, b_hh = (b_ih if biases in ("b_ih", "both") else None), (b_hh if biases in ("b_hh", "both") else None)
    for threads in (1, 2):
        with num_threads(threads), attnkit.use_backend("cpp"):
            if kind == "lstm":
                args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
                out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
                outs, ref = (out, h, c), reference.lstm(*args, None, None)[:3]
            else:
                args = (x, h0, w_ih, w_hh, b_ih, b_hh)
                outs, ref = gru(*args), reference.gru(*args, None)[:2]
        check_against(outs, ref, args, torch.float32)


@pytest.mark.parametrize(
    "kind,B,lengths",
    [("lstm", 2, None), ("lstm", 2, [4, 2]), ("gru", 1, None), ("gru", 1, [2]), ("gru", 3, None),
     ("gru", 3, [4, 0, 2])],
    ids=str,
)
def test_small_batch_gradcheck_float64_cpp(kind, B, lengths):
    """gradcheck through the small-batch forward and backward (LSTM without
    biases; GRU with them: b_hh's n part sits inside the reset product)."""
    gradcheck_cpp(kind, 4, B, lengths, lstm_bias=False)


def gradcheck_cpp(kind, T, B, lengths, lstm_bias):
    """torch.autograd.gradcheck of ops.lstm / ops.gru on the cpp backend, float64, I = 3, H = 5."""
    if kind == "lstm":
        args = make_lstm(T, B, 3, 5, 5, torch.float64, "cpu", bias=lstm_bias)[:7 if lstm_bias else 5]

        def run(x, h0, c0, *weights):
            out, (h, c) = lstm(x, (h0, c0), *weights, lengths=lengths)
            return out, h, c
    else:
        args = make_gru(T, B, 3, 5, torch.float64, "cpu")

        def run(*a):
            return gru(*a, lengths=lengths)

    with attnkit.use_backend("cpp"):
        assert torch.autograd.gradcheck(run, args)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("B", [5, 20])
def test_one_step_at_batch_5_and_up_cpp(kind, dtype, B):
    """T = 1 at batch 5+ (nn.GRUCell, a decoder's steps) runs the per-step path without the
    fused team, and its gradients as GEMMs on (copies of) transposed operands (rnn_sequence.h's
    single_step_grads; oneDNN from 16 rows in float32): values and every gradient vs the
    reference, rows of length 0 among them."""
    for lengths in (None, [1, 0] * (B // 2) + [1] * (B % 2)):
        check_cpp_against_reference(kind, 1, B, 7, 19, dtype, lengths, seed=B)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("B", [1, 6])  # batch 1: the one-step backward takes single_step_grads there too
def test_one_step_gradcheck_float64_cpp(kind, B):
    gradcheck_cpp(kind, 1, B, None, lstm_bias=True)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_small_batch_backward_takes_the_reference_forward(kind):
    """The small-batch backward kernel with the reference forward's saved tensors
    (and the other way round) gives the reference gradients: the saved layout is shared."""
    from attnkit.backends.rnn import CppGru, CppLstm, ReferenceGru, ReferenceLstm

    T, B, H = 6, 3, 9
    lengths = torch.tensor([6, 0, 4] if kind == "gru" else [6, 2, 4])
    gen = torch.Generator().manual_seed(0)
    grad_out, grad_hn, grad_cn = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((T, B, H), (B, H), (B, H)))
    if kind == "lstm":
        args = [a.detach() for a in make_lstm(T, B, 4, H, H, torch.float64, "cpu")[:-1]]
        x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
        impls = CppLstm(), ReferenceLstm()

        def forward_backward(fwd, bwd):
            out, _, _, gates, cs, hc = fwd.forward(*args, None, lengths, True)
            return bwd.backward(grad_out, grad_hn, grad_cn, *args, None, lengths, out, gates, cs, hc)[:6]
    else:
        args = [a.detach() for a in make_gru(T, B, 4, H, torch.float64, "cpu")]
        impls = CppGru(), ReferenceGru()

        def forward_backward(fwd, bwd):
            out, _, gates = fwd.forward(*args, lengths, True)
            return bwd.backward(grad_out, grad_hn, *args, lengths, out, gates)

    cpp, ref = impls
    expected = forward_backward(ref, ref)
    for fwd, bwd in ((ref, cpp), (cpp, ref), (cpp, cpp)):
        for g, r in zip(forward_backward(fwd, bwd), expected):
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru"])
def test_packed_rows_backward_matches_reference(kind, dtype):
    """Batch 5+ with sorted lengths, most rows stopped early: the backward's GEMMs after the time
    loop take the running rows only (csrc/include/attnkit/rnn_sequence.h, pack_running). All
    gradients against the reference; float64 runs the generic loop, float32 the fused one."""
    T, B, I, H = 9, 7, 5, 6
    P = 3 if kind == "lstm_proj" else H
    lengths = torch.tensor([9, 8, 5, 3, 2, 1, 0])  # 28 of 63 rows run
    gen = torch.Generator().manual_seed(7)
    gates = 3 if kind == "gru" else 4

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    x, h0, c0 = rand(T, B, I), rand(B, P), rand(B, H)
    w_ih, w_hh, b_ih, b_hh = rand(gates * H, I), rand(gates * H, P), rand(gates * H), rand(gates * H)
    w_hr = rand(P, H) if kind == "lstm_proj" else None
    weight = torch.linspace(0, 1, T * B * P, dtype=dtype).view(T, B, P)
    results = []
    for backend in ("cpp", "reference"):
        with attnkit.use_backend(backend):
            if kind == "gru":
                leaves = [x, h0, w_ih, w_hh, b_ih, b_hh]
                out, h = gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=lengths)
                loss = (out * weight).sum() + (h * h).sum()
            else:
                leaves = [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None]
                out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, lengths=lengths)
                loss = (out * weight).sum() + (h * h).sum() + c.sum()
            results.append(torch.autograd.grad(loss, leaves))
    atol, rtol = (RNN_GRAD_FACTOR * t for t in TOLERANCES[dtype])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
