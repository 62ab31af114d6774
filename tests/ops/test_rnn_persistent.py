"""The persistent small-batch CUDA LSTM / GRU forward (backend "cuda_persistent",
csrc/cuda/rnn_persistent.cu). The `gpu` tests force it and compare against the
plain-PyTorch reference in float64 and torch.nn (cuDNN); the others run here:
when and why the dispatcher skips it, and the argument checks before any kernel."""
import pytest
import torch

import attnkit
from attnkit import _dispatch, _extensions, reference
from attnkit.backends.rnn import CLUSTER_ENV, GRU, LSTM, PERSISTENT_ENV
from attnkit.ops import gru, lstm

# Outputs against the float64 reference from the same rounded inputs: fp32 sums of H products
# and fast-math exp/tanh (~1e-6 relative per step); halves round h to 8 / 11 bits every step.
PERSISTENT_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make_inputs(kind, T, B, H, dtype, device, seed=0):
    """x, h0 (and c0), w_ih, w_hh, b_ih, b_hh in `dtype`, weights ~ U(+-1/sqrt(H)) as torch.nn's."""
    gen = torch.Generator().manual_seed(seed)
    G = 4 if kind == "lstm" else 3
    I = H // 2 + 3
    scale = H ** -0.5

    def rand(*shape, s=1.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * s).to(device=device, dtype=dtype)

    states = (rand(B, H), rand(B, H)) if kind == "lstm" else (rand(B, H),)
    return (rand(T, B, I), *states, rand(G * H, I, s=scale), rand(G * H, H, s=scale), rand(G * H, s=scale),
            rand(G * H, s=scale))


def ragged_lengths(T, B):
    """Unsorted lengths in [0, T] with a 0-length row (B > 1) and a full-length one."""
    lengths = [(b * 7 + 3) % (T + 1) for b in range(B)]
    lengths[0] = T
    if B > 1:
        lengths[1] = 0
    return torch.tensor(lengths)


def run_op(kind, args, lengths):
    if kind == "lstm":
        x, h0, c0, *weights = args
        out, (h, c) = lstm(x, (h0, c0), *weights, lengths=lengths)
        return out, h, c
    return gru(*args, lengths=lengths)


def run_reference(kind, args, lengths):
    wide = [a.double() for a in args]
    if kind == "lstm":
        return reference.lstm(*wide, None, lengths)[:3]
    return reference.gru(*wide, lengths)[:2]


def call(**changes):
    """A call description the persistent kernel accepts, but for `changes`."""
    return {"device": torch.device("cuda"), "dtype": torch.float16, "batch": 4, "hidden_size": 256, "proj": False,
            "save": False, **changes}


# ----------------------------------------------------------------------------- on a GPU

needs_gpu = pytest.mark.gpu


def check_persistent(kind, T, B, H, dtype, lengths):
    args = make_inputs(kind, T, B, H, dtype, "cuda")
    with torch.no_grad(), attnkit.use_backend("cuda_persistent", op=kind):
        outs = run_op(kind, args, lengths)
    assert attnkit.last_dispatch(kind).backend == "cuda_persistent"
    tol = PERSISTENT_TOL[dtype]
    for o, r in zip(outs, run_reference(kind, args, lengths)):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r.to(o.device), atol=tol, rtol=tol)
    if lengths is not None:  # stopped rows output exactly zero
        steps = torch.arange(T).view(T, 1)
        assert (outs[0].cpu()[steps >= lengths.view(1, B)] == 0).all()


@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("H", [32, 80, 256])  # 80: units per block not dividing H on most GPUs
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_matches_reference_float32(kind, B, T, H, ragged):
    check_persistent(kind, T, B, H, torch.float32, ragged_lengths(T, B) if ragged else None)


@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,H", [(1, 64, 256), (3, 5, 80), (8, 64, 32), (8, 64, 256)])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_matches_reference_half(kind, dtype, B, T, H, ragged):
    check_persistent(kind, T, B, H, dtype, ragged_lengths(T, B) if ragged else None)


def cluster_plan(kind, B, H, dtype):
    ext = _extensions.load("_C_cuda")[0]
    return ext.rnn_cluster_plan(4 if kind == "lstm" else 3, B, H, dtype, torch.device("cuda"))[:2]


# csrc/cuda/rnn_cluster.cu (ATTNKIT_RNN_CLUSTER=1): its own size, and forced sizes that
# leave blocks a single row tile or none (H = 5 over 4 blocks: 2, 2, 1, 0 units); batch 20
# on three clusters, the last with 4 rows.
@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,H", [(1, 64, 128), (3, 5, 80), (8, 64, 32), (8, 33, 256), (2, 17, 512), (1, 1, 16), (2, 9, 5),
                                   (20, 9, 128)])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("size", [0, 4, 16], ids=["auto", "size4", "size16"])
def test_cluster_kernel_matches_reference(kind, dtype, B, T, H, ragged, size, monkeypatch):
    monkeypatch.setenv(CLUSTER_ENV, "1")
    if size:
        monkeypatch.setenv("ATTNKIT_RNN_CLUSTER_SIZE", str(size))
    else:
        monkeypatch.delenv("ATTNKIT_RNN_CLUSTER_SIZE", raising=False)
    chosen, why = cluster_plan(kind, B, H, dtype)
    if torch.cuda.get_device_capability()[0] < 9:
        assert chosen == "0" and "sm_90" in why
        pytest.skip(why)
    if size and chosen == "0":  # e.g. W_hh of H = 512 in 2 blocks: over the shared memory
        assert f"ATTNKIT_RNN_CLUSTER_SIZE={size}" in why
        pytest.skip(why)
    assert chosen != "0", why
    assert not size or chosen == str(size)
    check_persistent(kind, T, B, H, dtype, ragged_lengths(T, B) if ragged else None)


@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,H,ragged", [(3, 9, 80, False), (20, 6, 128, True), (64, 5, 512, False), (2, 1, 16, False)])
@pytest.mark.parametrize("on_clusters", ["forward", "backward", "both"])
def test_cluster_training_matches_the_per_step_loops(kind, dtype, B, T, H, ragged, on_clusters, monkeypatch):
    """Training with the cluster kernels (ATTNKIT_RNN_CLUSTER=1) for the forward, the backward
    or both, the rest per step (their saved tensors are the same): outputs and every gradient
    as close to the float64 reference as the per-step loops'."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cluster kernel needs sm_90")
    ext = _extensions.load("_C_cuda")[0]
    assert hasattr(ext, f"{kind}_forward_cluster_save") and hasattr(ext, f"{kind}_backward_cluster")
    monkeypatch.setenv(CLUSTER_ENV, "1")
    chosen, why = cluster_plan(kind, B, H, dtype)
    assert chosen != "0", why
    args = make_inputs(kind, T, B, H, dtype, "cuda")
    lengths = ragged_lengths(T, B) if ragged else None
    weights = None

    def outputs_and_grads(leaves, run, backward_switch=None):
        nonlocal weights
        outs = run(kind, leaves, lengths)
        if weights is None:
            weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                       for i, o in enumerate(outs)]
        loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights))
        if backward_switch is not None:  # the switch is read at each call: the backward's own
            monkeypatch.setenv(CLUSTER_ENV, backward_switch)
        return [t.double() for t in (*outs, *torch.autograd.grad(loss, leaves))]

    def ours(forward_switch, backward_switch):
        monkeypatch.setenv(CLUSTER_ENV, forward_switch)
        with attnkit.use_backend("cuda", op=kind):
            return outputs_and_grads([a.detach().requires_grad_() for a in args], run_op, backward_switch)

    truth = outputs_and_grads([a.detach().double().requires_grad_() for a in args], run_reference_differentiable)
    # Twice the per-step loops' error, plus a few roundings of the tensor's largest value.
    rounding = 2e-3 if dtype == torch.float16 else 1.6e-2
    switches = {"forward": ("1", "0"), "backward": ("0", "1"), "both": ("1", "1")}[on_clusters]
    for i, (cluster, step, r) in enumerate(zip(ours(*switches), ours("0", "0"), truth)):
        r = r.to(cluster.device)
        allowed = 2 * (step - r).abs().max() + rounding * max(1.0, r.abs().max().item())
        assert (cluster - r).abs().max() <= allowed, (i, (cluster - r).abs().max().item(), allowed.item())


def run_reference_differentiable(kind, leaves, lengths):
    if kind == "lstm":
        return reference.lstm(*leaves, None, lengths)[:3]
    return reference.gru(*leaves, lengths)[:2]


@needs_gpu
def test_cluster_kernel_refuses_what_fits_no_cluster():
    # (The dtype and batch refusals are checked without a GPU: tests/test_cuda_build.py.)
    if torch.cuda.get_device_capability()[0] < 9:
        assert "sm_90" in cluster_plan("lstm", 1, 128, torch.float16)[1]
    else:  # W_hh of H = 4096: 8 MB in float16
        assert cluster_plan("lstm", 1, 4096, torch.float16)[1].startswith("no cluster of up to 16 blocks")


@needs_gpu
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_matches_torch_nn(kind):
    T, B, H = 64, 4, 128
    ours = getattr(attnkit.nn, kind)(H, H, device="cuda")
    theirs = getattr(torch.nn, kind)(H, H, device="cuda")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, H, device="cuda")
    hx = torch.randn(1, B, H, device="cuda")
    hx = (hx, torch.randn(1, B, H, device="cuda")) if kind == "LSTM" else hx
    with torch.no_grad(), attnkit.use_backend("cuda_persistent", op=kind.lower()):
        out, state = ours(x, hx)
        assert attnkit.last_dispatch(kind.lower()).backend == "cuda_persistent"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # full fp32 products in cuDNN too
            out_ref, state_ref = theirs(x, hx)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


@needs_gpu
def test_automatic_choice_takes_it_for_inference(monkeypatch):
    args = make_inputs("lstm", 5, 2, 64, torch.float16, "cuda")
    monkeypatch.delenv(PERSISTENT_ENV, raising=False)
    with torch.no_grad():
        run_op("lstm", args, None)
    assert attnkit.last_dispatch("lstm").backend == "cuda_persistent"
    monkeypatch.setenv(PERSISTENT_ENV, "0")
    with torch.no_grad():
        run_op("lstm", args, None)
    decision = attnkit.last_dispatch("lstm")
    assert decision.backend == "cuda" and f"{PERSISTENT_ENV}=0" in "; ".join(decision.skipped["cuda_persistent"])
    monkeypatch.delenv(PERSISTENT_ENV)
    # Training (save=True) never selects it: the backward runs the per-step kernels.
    leaves = [a.detach().requires_grad_() for a in args]
    run_op("lstm", leaves, None)[0].sum().backward()
    decision = attnkit.last_dispatch("lstm")
    assert decision.backend == "cuda" and "inference only" in "; ".join(decision.skipped["cuda_persistent"])


@needs_gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_hidden_size_off_chip_falls_back(kind, monkeypatch):
    # W_hh at H = 4096 in float32 is 200+ MB: no GPU holds that in shared memory.
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    args = make_inputs(kind, 2, 2, 4096, torch.float32, "cuda")
    with torch.no_grad():
        outs = run_op(kind, args, None)
    decision = attnkit.last_dispatch(kind)
    assert decision.backend == "cuda"
    assert "does not fit on chip" in "; ".join(decision.skipped["cuda_persistent"]), decision
    for o, r in zip(outs, run_reference(kind, args, None)):
        torch.testing.assert_close(o.double(), r.to(o.device), atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="'cuda_persistent' was forced .* does not fit on chip"):
        with torch.no_grad(), attnkit.use_backend("cuda_persistent", op=kind):
            run_op(kind, args, None)


# ----------------------------------------------------------------------------- here (no GPU needed)


@pytest.mark.parametrize("op", [LSTM, GRU], ids=["lstm", "gru"])
def test_not_supported_reasons_one_per_condition(op, monkeypatch):
    impl = op.implementations["cuda_persistent"]
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    cases = {
        "float64": (dict(dtype=torch.float64), "takes float16, bfloat16, float32, got float64"),
        "batch 9": (dict(batch=9), "batch 1..8, got 9"),
        "batch 0": (dict(batch=0), "batch 1..8, got 0"),
        "proj": (dict(proj=True), "no proj_size"),
        "training": (dict(save=True), "inference only"),
    }
    for name, (change, message) in cases.items():
        reasons = impl.not_supported_reasons(call(**change))
        assert len(reasons) == 1 and message in reasons[0], (name, reasons)
    monkeypatch.setenv(PERSISTENT_ENV, "0")
    reasons = impl.not_supported_reasons(call())
    assert len(reasons) == 1 and f"{PERSISTENT_ENV}=0 turns the automatic choice" in reasons[0]


class _FakeExtension:
    """Stands in for attnkit._C_cuda's fit check where there is no GPU to ask."""

    def __init__(self, why, entries=("lstm_forward_persistent", "gru_forward_persistent")):
        self.why, self.asked = why, []
        for name in entries:
            setattr(self, name, None)

    def rnn_persistent_unsupported(self, gates, batch, hidden, dtype, device):
        self.asked.append((gates, batch, hidden, dtype, device))
        return self.why


@pytest.mark.parametrize("op,gates", [(LSTM, 4), (GRU, 3)], ids=["lstm", "gru"])
def test_fit_check_is_asked_last_and_reported(op, gates, monkeypatch):
    impl = op.implementations["cuda_persistent"]
    fake = _FakeExtension("W_hh does not fit on chip: 32 units per block need 2 MB")
    monkeypatch.setattr(impl, "_ext", lambda: fake)
    monkeypatch.setenv(PERSISTENT_ENV, "0")
    with attnkit.use_backend("cuda_persistent", op=op.name):  # forcing overrides ATTNKIT_RNN_PERSISTENT=0
        assert impl.not_supported_reasons(call(batch=9)) != [] and fake.asked == []  # cheap reasons first
        assert impl.not_supported_reasons(call()) == [fake.why]
        assert fake.asked == [(gates, 4, 256, torch.float16, torch.device("cuda"))]
        fake.why = ""
        assert impl.not_supported_reasons(call()) == []
        monkeypatch.setattr(impl, "_ext", lambda: _FakeExtension("", entries=()))
        assert "built without" in impl.not_supported_reasons(call())[0]


@pytest.mark.parametrize("op,gates", [(LSTM, 4), (GRU, 3)], ids=["lstm", "gru"])
def test_cluster_switch_lifts_the_batch_limit_for_halves_only(op, gates, monkeypatch):
    impl = op.implementations["cuda_persistent"]
    fake = _FakeExtension("")
    monkeypatch.setattr(impl, "_ext", lambda: fake)
    monkeypatch.setenv(PERSISTENT_ENV, "1")
    monkeypatch.setenv(CLUSTER_ENV, "1")
    assert impl.not_supported_reasons(call(batch=64)) == []  # the extension decides, at batch 64
    assert fake.asked == [(gates, 64, 256, torch.float16, torch.device("cuda"))]
    assert "batch 1..8, got 64" in impl.not_supported_reasons(call(batch=64, dtype=torch.float32))[0]
    assert "batch 1..8, got 0" in impl.not_supported_reasons(call(batch=0))[0]
    monkeypatch.setenv(CLUSTER_ENV, "0")
    assert "batch 1..8, got 64" in impl.not_supported_reasons(call(batch=64))[0]


def test_forcing_for_one_op_leaves_the_other_switched_off(monkeypatch):
    monkeypatch.setenv(PERSISTENT_ENV, "0")
    with attnkit.use_backend("cuda_persistent", op="lstm"):
        assert f"{PERSISTENT_ENV}=0" in GRU.implementations["cuda_persistent"].not_supported_reasons(call())[0]


def test_skipped_on_cpu_tensors_and_cannot_be_forced_there():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_inputs("lstm", 3, 2, 8, torch.float32, "cpu")
    decision = attnkit.explain("lstm", x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    assert decision.backend != "cuda_persistent" and decision.skipped["cuda_persistent"]
    with pytest.raises(RuntimeError, match="'cuda_persistent' was forced .* for lstm"):
        with attnkit.use_backend("cuda_persistent", op="lstm"):
            lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    if not torch.cuda.is_available():
        assert "GPU" in decision.skipped["cuda_persistent"][0] or "not built" in decision.skipped["cuda_persistent"][0]


def test_calls_describe_batch_hidden_projection_and_training():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_inputs("lstm", 3, 2, 8, torch.float32, "cpu")
    described = _dispatch._DESCRIBERS["lstm"](x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    assert {k: described[k] for k in ("batch", "hidden_size", "proj", "save")} == dict(
        batch=2, hidden_size=8, proj=False, save=False)
    w_hr = torch.randn(5, 8)
    described = _dispatch._DESCRIBERS["lstm"](x, (h0[:, :5], c0), w_ih, w_hh[:, :5], b_ih, b_hh,
                                              w_hr=w_hr.requires_grad_())
    assert described["proj"] and described["save"]
    x, h0, w_ih, w_hh, b_ih, b_hh = make_inputs("gru", 3, 5, 6, torch.float32, "cpu")
    described = _dispatch._DESCRIBERS["gru"](x, h0, w_ih, w_hh.requires_grad_(), b_ih, b_hh)
    assert (described["batch"], described["hidden_size"], described["save"]) == (5, 6, True)


@pytest.mark.parametrize("op", [LSTM, GRU], ids=["lstm", "gru"])
def test_training_and_backward_are_refused(op):
    impl = op.implementations["cuda_persistent"]
    x = torch.zeros(2, 1, 4)
    args = (x, x[0], x[0], x, x, None, None, None, None, True) if op is LSTM else (x, x[0], x, x, None, None, None, True)
    with pytest.raises(NotImplementedError, match="inference only"):
        impl.forward(*args)
    with pytest.raises(NotImplementedError, match="no backward"):
        impl.backward(x)
    if op is LSTM:
        with pytest.raises(NotImplementedError, match="no proj_size"):
            impl.forward(x, x[0], x[0], x, x, None, None, x[0], None, False)


def test_env_backend_name_is_known(monkeypatch):
    monkeypatch.setenv("ATTNKIT_BACKEND", "lstm=cuda_persistent")
    assert _dispatch.forced_backend("lstm") == ("cuda_persistent", "ATTNKIT_BACKEND")
    assert _dispatch.forced_backend("gru") is None


class _FakeTrainingExtension:
    """attnkit._C_cuda's training entries, recording which one ran; the cluster ones
    answer `cluster_result` ([] = not taken)."""

    def __init__(self, cluster_result):
        self.cluster_result, self.ran = cluster_result, []

    def lstm_forward_cluster_save(self, *args):
        self.ran.append("cluster")
        return self.cluster_result

    gru_forward_cluster_save = lstm_forward_cluster_save

    def lstm_forward(self, *args):
        self.ran.append("per-step")
        return ["per-step"] * 6

    def gru_forward(self, *args):
        self.ran.append("per-step")
        return ["per-step"] * 3

    def lstm_backward_cluster(self, *args):
        self.ran.append("cluster backward")
        return self.cluster_result[:6]

    gru_backward_cluster = lstm_backward_cluster

    def lstm_backward(self, *args):
        self.ran.append("per-step backward")
        return ["per-step backward"] * 7

    def gru_backward(self, *args):
        self.ran.append("per-step backward")
        return ["per-step backward"] * 6


@pytest.mark.parametrize("op", [LSTM, GRU], ids=["lstm", "gru"])
def test_training_forward_tries_the_cluster_kernel_when_switched_on(op, monkeypatch):
    impl = op.implementations["cuda"]
    x = torch.zeros(2, 1, 3, dtype=torch.float16)
    args = (x, x[0], x[0], x, x, None, None, None) if op is LSTM else (x, x[0], x, x, None, None)

    def forward(ext, save=True, dtype=torch.float16, w_hr=None):
        monkeypatch.setattr(impl, "_ext", lambda: ext)
        call = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
        if op is LSTM:
            call[7] = w_hr
        return impl.forward(*call, None, save)

    monkeypatch.setenv(CLUSTER_ENV, "1")
    taken = _FakeTrainingExtension(["cluster"] * (5 if op is LSTM else 3))
    result = forward(taken)
    assert taken.ran == ["cluster"] and result[:3] == ("cluster",) * 3
    if op is LSTM:
        assert len(result) == 6 and result[5].numel() == 0  # hc: none without a projection
    refused = _FakeTrainingExtension([])
    assert forward(refused)[0] == "per-step" and refused.ran == ["cluster", "per-step"]
    for changes in (dict(save=False), dict(dtype=torch.float32)) + ((dict(w_hr=x[0]),) if op is LSTM else ()):
        other = _FakeTrainingExtension(["cluster"] * 5)
        forward(other, **changes)
        assert other.ran == ["per-step"], changes
    monkeypatch.setenv(CLUSTER_ENV, "0")
    off = _FakeTrainingExtension(["cluster"] * 5)
    forward(off)
    assert off.ran == ["per-step"]


@pytest.mark.parametrize("op", [LSTM, GRU], ids=["lstm", "gru"])
def test_backward_tries_the_cluster_kernel_when_switched_on(op, monkeypatch):
    impl = op.implementations["cuda"]
    x = torch.zeros(2, 1, 3, dtype=torch.float16)
    # (grad_output, grad_hn[, grad_cn], x, h0[, c0], w_ih, w_hh, b_ih, b_hh[, w_hr], lengths, output, gates[, cs, hc])
    args = [x, x[0], x[0], x, x[0], x[0], x, x, None, None, None, None, x, x, x, x] if op is LSTM else \
        [x, x[0], x, x[0], x, x, None, None, None, x, x]

    def backward(ext, dtype=torch.float16, w_hr=None):
        monkeypatch.setattr(impl, "_ext", lambda: ext)
        call = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args]
        if op is LSTM:
            call[10] = w_hr
        return impl.backward(*call)

    monkeypatch.setenv(CLUSTER_ENV, "1")
    taken = _FakeTrainingExtension(["cluster backward"] * 6)
    grads = backward(taken)
    assert taken.ran == ["cluster backward"] and grads[0] == "cluster backward"
    assert len(grads) == (7 if op is LSTM else 6)
    refused = _FakeTrainingExtension([])
    assert backward(refused)[0] == "per-step backward" and refused.ran == ["cluster backward", "per-step backward"]
    for changes in (dict(dtype=torch.float32),) + ((dict(w_hr=x[0]),) if op is LSTM else ()):
        other = _FakeTrainingExtension(["cluster backward"] * 6)
        backward(other, **changes)
        assert other.ran == ["per-step backward"], changes
