"""The fused-step LSTM / GRU time loops of csrc/cpu/rnn_fused.cpp (float32, batch 5+,
no projection: one OpenMP team, per-chunk GEMM + gate math, one barrier per
step) and the brgemm weight-gradient GEMM, against the plain-PyTorch reference
and torch.nn.LSTM / GRU: values and every gradient, sizes off the 16-unit chunks, 64-column
panels and vector widths, lengths stopping rows, one and two threads."""
import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES, num_threads
from test_rnn import check_against, make_gru, make_lstm, weighted_loss
from torch.nn.utils.rnn import pack_padded_sequence

import attnkit
from attnkit import _extensions, reference
from attnkit.backends.rnn import _bf16_brgemm
from attnkit.ops import gru, lstm


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    with num_threads(request.param):
        yield request.param


def lengths_for(kind, T, B):
    if kind is None:
        return None
    gen = torch.Generator().manual_seed(B)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[B // 2] = T
    return lengths.sort(descending=True).values if kind == "sorted" else lengths


@pytest.mark.parametrize(
    "shape", [(4, 33, 7, 80), (3, 6, 5, 70), (2, 7, 3, 40), (1, 9, 3, 16), (5, 8, 12, 1)], ids=str
)
@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted"], ids=str)
def test_lstm_fused_matches_reference(shape, lengths, threads):
    """(T, B, I, H) against the 16-unit forward chunks (16-lane vectors) and 64-column backward panels:
    H = 80 ends in a 16-column panel, 70 in a 6-unit chunk (scalar tail), 40 in an 8-unit one (8 lanes),
    H = 1 is all tail; T = 1."""
    T, B, I, H = shape
    lengths = lengths_for(lengths, T, B)
    args = make_lstm(T, B, I, H, H, torch.float32, "cpu")[:-1]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    with attnkit.use_backend("cpp"):
        out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, lengths=lengths)
    ref = reference.lstm(*args, None, lengths)[:3]
    check_against((out, h, c), ref, args, torch.float32)


def gru_lengths(kind, T, B):
    """lengths_for, with row 1 at 0 steps (never runs) where lengths stop rows; "none_run": every row at 0."""
    if kind == "none_run":
        return torch.zeros(B, dtype=torch.long)
    lengths = lengths_for(kind, T, B)
    if lengths is not None:
        lengths[1] = 0
        if kind == "sorted":
            lengths = lengths.sort(descending=True).values
    return lengths


@pytest.mark.parametrize(
    "shape",
    [(17, 5, 7, 20), (1, 6, 5, 37), (17, 9, 3, 64), (4, 6, 16, 70), (3, 5, 4, 1), (4, 33, 7, 80), (3, 12, 5, 150)],
    ids=str,
)
@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted", "none_run"], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gru_fused_matches_float64_reference(shape, lengths, bias, threads):
    """(T, B, I, H), float32 through the fused loops against the reference run in float64 on the same
    (float32) values, to float32's tolerance: H = 20 ends in a 4-unit chunk (scalar tail), 37 in a 5-unit
    one, 64 is whole 16-lane chunks and one 64-column panel, 70 a 6-unit chunk and a 6-column panel, 1 all
    tail; T = 1; h0 given; lengths stopping rows (one never runs; "none_run": none does). B H^2 of the
    last two is large enough for a team of 2 (rnn_fused.cpp team_size): 5 / 10 chunks and 2 / 3 panels split."""
    T, B, I, H = shape
    lengths = gru_lengths(lengths, T, B)
    args = make_gru(T, B, I, H, torch.float32, "cpu", bias=bias)
    with attnkit.use_backend("cpp"):
        out, h = gru(*args, lengths=lengths)
    args64 = [None if a is None else a.detach().double().requires_grad_(True) for a in args]
    ref = reference.gru(*args64, lengths)[:2]
    atol, rtol = TOLERANCES[torch.float32]
    for o, r in zip((out, h), ref):
        torch.testing.assert_close(o.double(), r, atol=atol, rtol=rtol)
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad(weighted_loss((out, h)), leaves)
    grads_ref = torch.autograd.grad(weighted_loss(ref), [a for a in args64 if a is not None])
    for g, r in zip(grads, grads_ref):
        # Gradients sum over T * B products of the recurrence: relative to their largest entry.
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double(), r, atol=atol * RNN_GRAD_FACTOR * scale, rtol=rtol * RNN_GRAD_FACTOR)


@pytest.mark.parametrize("lengths", [None, "unsorted"], ids=str)
def test_gru_fused_saved_tensors_shared_with_the_reference(lengths, threads):
    """The fused backward with the reference forward's saved gates (and the other way round) gives the
    reference gradients: gates r, z, n, hn laid out as rnn_sequence.h's loop and the reference save them.
    Inference (save=False) gives the training outputs."""
    from attnkit.backends.rnn import CppGru, ReferenceGru

    T, B, H = 7, 6, 37
    lengths = gru_lengths(lengths, T, B)
    args = [a.detach() for a in make_gru(T, B, 5, H, torch.float32, "cpu")]
    gen = torch.Generator().manual_seed(0)
    grad_out, grad_hn = torch.randn(T, B, H, generator=gen), torch.randn(B, H, generator=gen)

    def forward_backward(fwd, bwd):
        out, _, gates = fwd.forward(*args, lengths, True)
        return bwd.backward(grad_out, grad_hn, *args, lengths, out, gates)

    cpp, ref = CppGru(), ReferenceGru()
    expected = forward_backward(ref, ref)
    for fwd, bwd in ((ref, cpp), (cpp, ref), (cpp, cpp)):
        for g, r in zip(forward_backward(fwd, bwd), expected):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    out, h, gates = cpp.forward(*args, lengths, False)
    assert gates.numel() == 0
    torch.testing.assert_close((out, h), cpp.forward(*args, lengths, True)[:2], atol=0, rtol=0)


@pytest.mark.parametrize("route", ["onednn", "aten"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("lengths", [None, "unsorted"], ids=str)
def test_weight_gradients_on_either_gemm_route(lengths, kind, route, threads, monkeypatch):
    """The weight gradients' GEMM (K = T * B past one 256 block, M and N off the 64-wide tiles) on
    both routes the CPU's vendor picks between: the brgemm tiles ("onednn") and at::mm (MKL on Intel)."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", route)
    T, B, I, H = 9, 70, 67, 45
    lengths = lengths_for(lengths, T, B)
    if kind == "GRU":
        args = make_gru(T, B, I, H, torch.float32, "cpu")
        with attnkit.use_backend("cpp"):
            outputs = gru(*args, lengths=lengths)
        ref = reference.gru(*args, lengths)[:2]
    else:
        args = make_lstm(T, B, I, H, H, torch.float32, "cpu")[:-1]
        with attnkit.use_backend("cpp"):
            out, (h, c) = lstm(*args[:1], tuple(args[1:3]), *args[3:], lengths=lengths)
        outputs = (out, h, c)
        ref = reference.lstm(*args, None, lengths)[:3]
    check_against(outputs, ref, args, torch.float32)


@pytest.mark.parametrize("route", ["onednn", "aten"])
def test_unfused_projections_on_either_gemm_route(route, monkeypatch):
    """The GEMMs outside the fused loops at 16+ rows (a GRU step at T = 1: nn.GRUCell's path; an LSTM
    with proj_size, whose input projection is one (T B, I) GEMM) on oneDNN and on at::addmm."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", route)
    args = make_gru(1, 20, 11, 13, torch.float32, "cpu")
    with attnkit.use_backend("cpp"):
        outputs = gru(*args)
    check_against(outputs, reference.gru(*args, None)[:2], args, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = make_lstm(3, 20, 11, 13, 5, torch.float32, "cpu")
    with attnkit.use_backend("cpp"):
        out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr)
    ref = reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None)[:3]
    check_against((out, h, c), ref, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), torch.float32)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed_unsorted"])
def test_module_matches_torch_nn(kind, packed, threads):
    """attnkit.nn.LSTM / GRU (2 layers, bidirectional) vs torch.nn's on the same weights: outputs, states and
    all gradients."""
    torch.manual_seed(0)
    T, B, H = 6, 11, 40
    ours = getattr(attnkit.nn, kind)(24, H, num_layers=2, bidirectional=True)
    theirs = getattr(torch.nn, kind)(24, H, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, 24)
    lengths = torch.tensor([3, 6, 1, 5, 6, 2, 4, 6, 3, 5, 1])
    state = [torch.randn(4, B, H) for _ in range(2 if kind == "LSTM" else 1)]  # h0 (and c0)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
        hs = [s.clone().requires_grad_(True) for s in state]
        out, final = module(inp, tuple(hs) if kind == "LSTM" else hs[0])
        final = final if kind == "LSTM" else (final,)
        out = out.data if packed else out
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + final[0].pow(2).sum()
        loss = loss + sum(c.sin().sum() for c in final[1:])
        grads = torch.autograd.grad(loss, [xi, *hs, *module.parameters()])
        results.append((out, *final, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_projection_and_double_leave_the_fused_loop():
    """proj_size and float64 take rnn_sequence.h's per-step loop: still equal to the reference."""
    for P, dtype in ((5, torch.float32), (9, torch.float64)):
        args = make_lstm(4, 10, 6, 9, P, dtype, "cpu")
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        with attnkit.use_backend("cpp"):
            out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr=w_hr)
        ref = reference.lstm(*args, None)[:3]
        check_against((out, h, c), ref, [a for a in args if a is not None], dtype)


def test_backward_workspace_reuse_gives_the_same_gradients():
    """The backward's internal buffers are reused from call to call on a thread (rnn_fused.cpp workspace):
    two backward passes over one graph (retain_graph), then a larger layer in between, give equal gradients."""
    args = make_lstm(5, 12, 6, 20, 20, torch.float32, "cpu")[:-1]
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = args
    with attnkit.use_backend("cpp"):
        out, (h, c) = lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
        first = torch.autograd.grad(out.sum() + h.sum(), args, retain_graph=True)
        big = make_lstm(7, 16, 9, 40, 40, torch.float32, "cpu")[:-1]
        lstm(big[0], (big[1], big[2]), *big[3:])[0].sum().backward()
        second = torch.autograd.grad(out.sum() + h.sum(), args)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _spy_on_bf16_forward(monkeypatch, entry="rnn_forward_bf16"):
    """A list that gets, for each call of attnkit._C's `entry` (rnn_forward_bf16 or
    rnn_backward_bf16), whether it was taken."""
    ext = _extensions.load("_C")[0]
    taken = []
    if hasattr(ext, entry):
        real = getattr(ext, entry)
        monkeypatch.setattr(ext, entry, lambda *a: taken.append(bool(result := real(*a))) or result)
    return taken


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize(
    "shape", [(7, 6, 20, 40), (5, 9, 8, 70), (1, 5, 2, 2), (9, 32, 64, 48)], ids=str
)  # (T, B, I, H): a 16-unit chunk tail (40, 70: 8 and 6 units), H = 2, T = 1, two threads' worth of chunks
@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted"], ids=str)
def test_bfloat16_inference_runs_bfloat16_gemms(monkeypatch, kind, shape, lengths, threads):
    """bfloat16 inference at batch 5+ (csrc/cpu/rnn_fused.cpp rnn_forward_bf16): x, the VNNI-packed
    weights and each step's h in bfloat16 through oneDNN's brgemm, the state and gate math in float:
    against the float32 reference on the same (rounded) inputs, within bfloat16's rounding of h."""
    if not _bf16_brgemm():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    taken = _spy_on_bf16_forward(monkeypatch)
    T, B, I, H = shape
    lengths = lengths_for(lengths, T, B)
    if kind == "LSTM":
        wide = [t.detach().bfloat16().float() for t in make_lstm(T, B, I, H, H, torch.float32, "cpu")[:-1]]
        low = [t.bfloat16() for t in wide]
        with torch.no_grad():
            out, (h, c) = lstm(low[0], (low[1], low[2]), *low[3:], lengths=lengths)
        outs, refs = (out, h, c), reference.lstm(*wide, None, lengths)[:3]
    else:
        wide = [t.detach().bfloat16().float() for t in make_gru(T, B, I, H, torch.float32, "cpu")]
        low = [t.bfloat16() for t in wide]
        with torch.no_grad():
            out, h = gru(*low, lengths=lengths)
        outs, refs = (out, h), reference.gru(*wide, lengths)[:2]
    assert taken == [True] and attnkit.last_dispatch(kind.lower()).backend == "cpp"
    for o, r in zip(outs, refs):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), r, atol=3e-2, rtol=3e-2)


def test_bfloat16_leaves_odd_sizes_and_small_batches_to_float32(monkeypatch):
    """Odd input sizes (VNNI pairs rows) and batch <= 4 (the small-batch loops) run the float32
    kernels on converted tensors: same values within rounding. The backward at batch <= 4 too."""
    calls = _spy_on_bf16_forward(monkeypatch)
    backward_calls = _spy_on_bf16_forward(monkeypatch, "rnn_backward_bf16")
    for T, B, I, H, grad in ((8, 8, 7, 20, False), (8, 8, 7, 20, True), (8, 3, 8, 20, False), (8, 3, 8, 20, True)):
        wide = [t.detach().bfloat16().float() for t in make_gru(T, B, I, H, torch.float32, "cpu")]
        low = [t.bfloat16().requires_grad_(grad) for t in wide]
        with torch.set_grad_enabled(grad):
            out, _ = gru(*low)
            if grad:
                out.float().sum().backward()
        assert attnkit.last_dispatch("gru").backend == "cpp"
        torch.testing.assert_close(out.float(), reference.gru(*wide)[0], atol=3e-2, rtol=3e-2)
    assert not any(calls)  # asked at most for the odd size, and not taken
    assert backward_calls == ([True] if _bf16_brgemm() else [])  # batch 8's (odd input size); none at batch 3


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("shape", [(7, 6, 10, 20), (1, 5, 4, 18), (9, 9, 7, 34)], ids=str)  # T = 1; odd I (from 8 steps: cpp)
@pytest.mark.parametrize("lengths", [None, "sorted", "unsorted"], ids=str)
def test_bfloat16_training_on_bfloat16_gemms(monkeypatch, kind, shape, lengths, threads):
    """Training in bfloat16 at batch 5+: the forward on bf16 GEMMs (even sizes) saves float gates
    (rounded to bfloat16 like the float32 path's); the backward (rnn_backward_bf16) walks time in
    float32, then dx and the weight gradients are bfloat16 GEMMs. Values and every gradient against
    the float32 reference on the same rounded inputs."""
    if not _bf16_brgemm():
        pytest.skip("no bfloat16 brgemm (AMX / AVX512-BF16) on this CPU or torch")
    taken = _spy_on_bf16_forward(monkeypatch)
    backward_taken = _spy_on_bf16_forward(monkeypatch, "rnn_backward_bf16")
    T, B, I, H = shape
    lengths = lengths_for(lengths, T, B)
    make = (lambda: make_lstm(T, B, I, H, H, torch.float32, "cpu")[:-1]) if kind == "LSTM" else (
        lambda: make_gru(T, B, I, H, torch.float32, "cpu"))
    wide = [t.detach().bfloat16().float().requires_grad_() for t in make()]
    low = [t.detach().bfloat16().requires_grad_() for t in wide]
    if kind == "LSTM":
        out, (h, c) = lstm(low[0], (low[1], low[2]), *low[3:], lengths=lengths)
        outs, refs = (out, h, c), reference.lstm(*wide, None, lengths)[:3]
    else:
        outs, refs = gru(*low, lengths=lengths), reference.gru(*wide, lengths)[:2]
    assert taken == ([True] if I % 2 == 0 else [])  # odd sizes: the float32 forward, not asked
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.float(), r, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(weighted_loss([o.float() for o in outs]), low)
    grads_ref = torch.autograd.grad(weighted_loss(refs), wide)
    assert backward_taken == [True]
    for g, r in zip(grads, grads_ref):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, atol=8e-2, rtol=8e-2)


def test_bfloat16_backward_checks_its_arguments():
    """rnn_backward_bf16's TORCH_CHECKs: the gate count, the LSTM-only tensors, the dtype, shapes."""
    ext = _extensions.load("_C")[0]
    T, B, I, H = 3, 6, 4, 8
    bf = dict(dtype=torch.bfloat16)
    x, out, go = torch.randn(T, B, I, **bf), torch.randn(T, B, H, **bf), torch.randn(T, B, H, **bf)
    h0, w_ih, w_hh = torch.zeros(B, H, **bf), torch.randn(4 * H, I, **bf), torch.randn(4 * H, H, **bf)
    gates, cs = torch.randn(T, B, 4 * H, **bf), torch.randn(T, B, H, **bf)
    lstm_args = (go, h0, h0, x, h0, h0, w_ih, w_hh, None, out, gates, cs)
    with pytest.raises(RuntimeError, match="gates must be 4"):
        ext.rnn_backward_bf16(5, *lstm_args)
    with pytest.raises(RuntimeError, match="for the LSTM"):
        ext.rnn_backward_bf16(4, go, h0, None, x, h0, h0, w_ih, w_hh, None, out, gates, cs)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        ext.rnn_backward_bf16(4, *[t.float() if isinstance(t, torch.Tensor) else t for t in lstm_args])
    with pytest.raises(RuntimeError, match="gates must have shape"):
        ext.rnn_backward_bf16(4, go, h0, h0, x, h0, h0, w_ih, w_hh, None, out, gates[:, :, :H].contiguous(), cs)
    with pytest.raises(RuntimeError, match="w_ih must have shape"):
        ext.rnn_backward_bf16(3, go, h0, None, x, h0, None, w_ih, w_hh[: 3 * H], None, out, gates, None)


def test_unknown_gemm_route_is_refused(monkeypatch):
    """A typo in ATTNKIT_CPU_GEMM selected oneDNN silently (an A/B run compared one route with itself)."""
    monkeypatch.setenv("ATTNKIT_CPU_GEMM", "mkl")
    args = make_gru(1, 20, 11, 13, torch.float32, "cpu")
    with attnkit.use_backend("cpp"), pytest.raises(RuntimeError, match="ATTNKIT_CPU_GEMM must be 'aten' or 'onednn'"):
        gru(*args)


@pytest.mark.parametrize("kind,H", [("LSTM", 520), ("GRU", 700)], ids=str)
@pytest.mark.parametrize("lengths", [None, [3, 3, 2, 2, 1, 0], [1, 3, 0, 2, 3, 2]], ids=["full", "sorted", "unsorted"])
def test_dh_product_in_k_blocks_matches_float64_reference(kind, H, lengths, threads):
    """G H past 2048 (rnn_fused.cpp's kDhLongK): the backward's dh product runs in K blocks of 512,
    LSTM 4 x 520 = 2080 as four and one of 32, GRU 3 x 700 = 2100 as four and one of 52; the last
    panels 8 and 60 columns wide. Weights scaled 1 / sqrt(H), so that the gates do not saturate and
    dh carries the gradients; float32 against the reference in float64 (dropping the last K block
    puts the gradients 5e-2..2e-1 off)."""
    T, B, I = 3, 6, 5
    gates = 4 if kind == "LSTM" else 3
    gen = torch.Generator().manual_seed(H)
    scale = H**-0.5
    values = [torch.randn(T, B, I, generator=gen, dtype=torch.float64)]
    values += [torch.randn(B, H, generator=gen, dtype=torch.float64) for _ in range(2 if kind == "LSTM" else 1)]
    values += [torch.randn(gates * H, n, generator=gen, dtype=torch.float64) * scale for n in (I, H)]
    values += [torch.randn(gates * H, generator=gen, dtype=torch.float64) * scale for _ in range(2)]
    lengths = None if lengths is None else torch.tensor(lengths)

    def run(dtype, backend):
        leaves = [v.to(dtype).requires_grad_(True) for v in values]
        with attnkit.use_backend(backend):
            if kind == "LSTM":
                out, (h, c) = lstm(leaves[0], (leaves[1], leaves[2]), *leaves[3:], lengths=lengths)
                outs = (out, h, c)
            else:
                outs = gru(leaves[0], leaves[1], *leaves[2:], lengths=lengths)
        return outs, torch.autograd.grad(weighted_loss(outs), leaves)

    outs, grads = run(torch.float32, "cpp")
    outs_ref, grads_ref = run(torch.float64, "reference")
    atol, rtol = TOLERANCES[torch.float32]
    for o, r in zip(outs, outs_ref):
        torch.testing.assert_close(o.double(), r, atol=atol, rtol=rtol)
    for g, r in zip(grads, grads_ref):
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g.double(), r, atol=atol * RNN_GRAD_FACTOR * scale, rtol=rtol * RNN_GRAD_FACTOR)
