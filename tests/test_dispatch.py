"""Backend dispatch: automatic choice, forcing (set_backend, use_backend,
ATTNKIT_BACKEND), errors with reasons, explain and last_dispatch."""
import logging
import os

import pytest
import torch

import attnkit
from attnkit import _dispatch
from attnkit.ops import lstm_cell


def test_available_backends_gives_the_thread_count_of_now():
    threads = torch.get_num_threads()
    try:
        attnkit.available_backends()  # probed (and cached) at the first count
        torch.set_num_threads(1 if threads > 1 else 2)
        assert attnkit.available_backends()["cpp"].reason.endswith(f", {torch.get_num_threads()} threads")
    finally:
        torch.set_num_threads(threads)


def test_available_backends_lists_every_backend_with_a_reason():
    status = attnkit.available_backends()
    assert list(status) == list(attnkit.BACKENDS)
    assert status["reference"].available
    assert status["cpp"].available, status["cpp"].reason  # built by the install
    for s in status.values():
        assert isinstance(s, attnkit.BackendStatus) and s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        assert "GPU" in status["cuda"].reason or "not built" in status["cuda"].reason


def test_automatic_choice_on_cpu_is_cpp_and_explained(cell_args):
    lstm_cell(*cell_args)
    decision = attnkit.last_dispatch("lstm_cell")
    assert decision.backend == "cpp" and decision.forced_by is None
    assert set(decision.skipped) == {"reference", "triton", "cuda_persistent", "cuda"}
    assert decision.skipped["triton"] and decision.skipped["cuda"] and decision.skipped["cuda_persistent"]
    assert "cpp comes first" in decision.skipped["reference"][0]
    explained = attnkit.explain("lstm_cell", *cell_args)
    assert explained.backend == "cpp"
    assert "lstm_cell: cpp (automatic)" in str(explained)


def test_set_backend_forces_and_resets(cell_args):
    attnkit.set_backend("reference")
    lstm_cell(*cell_args)
    assert attnkit.last_dispatch("lstm_cell").backend == "reference"
    assert attnkit.last_dispatch("lstm_cell").forced_by == "set_backend"
    attnkit.set_backend(None)
    lstm_cell(*cell_args)
    assert attnkit.last_dispatch("lstm_cell").backend == "cpp"


def test_set_backend_for_one_op_only(cell_args):
    attnkit.set_backend("reference", op="lstm_cell")
    assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    attnkit.set_backend("cpp", op="linear")
    assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    attnkit.set_backend(None, op="linear")


def test_unknown_op_names_are_errors_and_public_names_are_aliases(monkeypatch, cell_args):
    """A typo used to force nothing, silently; apply_rotary is dispatched as rotary."""
    for call in (lambda: attnkit.set_backend("reference", op="linaer"),
                 lambda: attnkit.use_backend("reference", op="linaer").__enter__(),
                 lambda: attnkit.last_dispatch("linaer"),
                 lambda: attnkit.explain("linaer")):
        with pytest.raises(ValueError, match=r"unknown op 'linaer'; known ops: additive_attention, .*lstm_cell"):
            call()
    q, cos = torch.randn(1, 4, 2, 8), torch.randn(4, 4)
    with attnkit.use_backend("reference", op="apply_rotary"):
        attnkit.ops.apply_rotary(q, cos, cos)
    assert attnkit.last_dispatch("apply_rotary").forced_by == "use_backend"
    monkeypatch.setenv("ATTNKIT_BACKEND", "linaer=reference")
    with pytest.raises(ValueError, match="ATTNKIT_BACKEND='linaer=reference'.*unknown op 'linaer'"):
        lstm_cell(*cell_args)
    monkeypatch.setenv("ATTNKIT_BACKEND", " lstm_cell = reference ")  # spaces around '=' either side
    assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    with pytest.raises(TypeError, match=r"attnkit.explain\('linear', ...\): these are not linear's arguments"):
        attnkit.explain("linear", torch.randn(2, 8))


def test_the_innermost_use_backend_wins(cell_args):
    with attnkit.use_backend("cpp", op="lstm_cell"):
        with attnkit.use_backend("reference"):  # for every op, so for lstm_cell too
            assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
            with attnkit.use_backend("cpp", op="lstm_cell"):
                assert attnkit.explain("lstm_cell", *cell_args).backend == "cpp"
        assert attnkit.explain("lstm_cell", *cell_args).backend == "cpp"


def test_context_manager_overrides_set_backend_and_restores(cell_args):
    attnkit.set_backend("cpp")
    with attnkit.use_backend("reference"):
        assert attnkit.explain("lstm_cell", *cell_args).forced_by == "use_backend"
        assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    assert attnkit.explain("lstm_cell", *cell_args).backend == "cpp"


def test_environment_variable(monkeypatch, cell_args):
    monkeypatch.setenv("ATTNKIT_BACKEND", "reference")
    decision = attnkit.explain("lstm_cell", *cell_args)
    assert (decision.backend, decision.forced_by) == ("reference", "ATTNKIT_BACKEND")
    monkeypatch.setenv("ATTNKIT_BACKEND", "flash_attention=triton, lstm_cell=reference")
    assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    monkeypatch.setenv("ATTNKIT_BACKEND", "flash_attention=triton")
    assert attnkit.explain("lstm_cell", *cell_args).backend == "cpp"
    attnkit.set_backend("cpp")  # set_backend beats the environment
    monkeypatch.setenv("ATTNKIT_BACKEND", "reference")
    assert attnkit.explain("lstm_cell", *cell_args).backend == "cpp"


def test_environment_variable_unknown_backend(monkeypatch, cell_args):
    monkeypatch.setenv("ATTNKIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="ATTNKIT_BACKEND='fastest' names unknown backend 'fastest'"):
        lstm_cell(*cell_args)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; expected one of triton, cuda_persistent, cuda, cpp, reference"):
        attnkit.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with attnkit.use_backend("nope"):
            pass


def test_forcing_a_backend_that_cannot_serve_raises_with_reasons(cell_args):
    with attnkit.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"backend 'cuda' was forced \(by use_backend\) for lstm_cell") as info:
            lstm_cell(*cell_args)
    assert "cuda" in str(info.value)
    with attnkit.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"backend 'triton' was forced .* for lstm_cell but cannot run this call"):
            lstm_cell(*cell_args)


def test_forced_backend_not_built(monkeypatch, cell_args):
    """A backend whose extension is missing reports the build's reason."""
    missing = attnkit.BackendStatus("cpp", False, "attnkit._C is not built (test)")
    monkeypatch.setitem(_dispatch._PROBES, "cpp", lambda: missing)
    _dispatch.refresh()
    try:
        assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
        attnkit.set_backend("cpp")
        with pytest.raises(RuntimeError, match=r"attnkit._C is not built \(test\)"):
            lstm_cell(*cell_args)
    finally:
        monkeypatch.undo()
        _dispatch.refresh()


def test_debug_log_names_the_backend(caplog, cell_args):
    with caplog.at_level(logging.DEBUG, logger="attnkit.dispatch"):
        lstm_cell(*cell_args)
    assert "lstm_cell: cpp (automatic)" in caplog.text


def test_explain_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'flash'"):
        attnkit.explain("flash")


def test_explain_validates_arguments(cell_args):
    args = list(cell_args)
    args[0] = args[0][None]
    with pytest.raises(ValueError, match="input must be 2-D"):
        attnkit.explain("lstm_cell", *args)


def test_decisions_are_cached_per_description_forcing_and_environment(cell_args, monkeypatch):
    first = attnkit.explain("lstm_cell", *cell_args)
    assert attnkit.explain("lstm_cell", *cell_args) is first  # the same description: the kept decision
    with attnkit.use_backend("reference", op="lstm_cell"):
        assert attnkit.explain("lstm_cell", *cell_args).backend == "reference"
    monkeypatch.setenv("ATTNKIT_BACKEND", "lstm_cell=reference")
    assert attnkit.explain("lstm_cell", *cell_args).forced_by == "ATTNKIT_BACKEND"
    monkeypatch.delenv("ATTNKIT_BACKEND")
    assert attnkit.explain("lstm_cell", *cell_args) is first
    # TRITON_INTERPRET decides whether Triton may take CPU tensors: part of the key
    # (where the probe found Triton usable, i.e. under the interpreter or on a GPU).
    if _dispatch.available_backends()["triton"].available:
        q = torch.randn(1, 1, 4, 16)
        before = attnkit.explain("flash_attention", q, q, q).skipped["triton"]
        monkeypatch.setenv("TRITON_INTERPRET", "0" if _dispatch.interpreter_active() else "1")
        assert attnkit.explain("flash_attention", q, q, q).skipped["triton"] != before
    _dispatch.refresh()  # forgets the decisions with the probes
    assert not _dispatch._OPS["lstm_cell"].decisions


def test_getenv_reads_what_os_environ_holds(monkeypatch):
    name = "ATTNKIT_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert _dispatch.getenv(name) is None
    for value in ("cpp", "", "lstm_cell=reference, flash_attention=triton", "\u00e9t\u00e9"):
        monkeypatch.setenv(name, value)
        assert _dispatch.getenv(name) == os.environ.get(name) == value
    os.environ.pop(name)
    assert _dispatch.getenv(name) is None



def _backward_backend(op, run, inputs, backward_block=None):
    """The backend of `op`'s backward when the forward ran under use_backend('reference') and
    loss.backward() outside it, as in a training loop (or the forward ran automatic and the
    backward under `backward_block`)."""
    if backward_block is None:
        with attnkit.use_backend("reference", op=op):
            out = run(*inputs)
        assert attnkit.last_dispatch(op).backend == "reference"
        out.sum().backward()
    else:
        out = run(*inputs)
        assert attnkit.last_dispatch(op).backend == "cpp"
        with attnkit.use_backend(backward_block, op=op):
            out.sum().backward()
    return attnkit.last_dispatch(op).backend


def _op_call(op):
    torch.manual_seed(0)
    if op == "flash_attention":
        q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
        return op, lambda q: attnkit.ops.flash_attention(q, q, q, causal=True), [q]
    if op in ("lstm", "gru"):
        module = getattr(attnkit.nn, op.upper())(4, 3).double()
        return op, lambda x: module(x)[0], [torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)]
    if op.startswith("rotary"):
        cos, sin = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        inplace = op == "rotary_inplace"
        x = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
        return "rotary", lambda x: attnkit.ops.apply_rotary(x * 1, cos, sin, inplace=inplace), [x]
    layer = attnkit.nn.BahdanauAttention(4, 4, 6).double()
    query = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    return op, lambda q, k: layer(q, k)[0], [query, keys]


_FORCED_OPS = ["flash_attention", "lstm", "gru", "rotary", "rotary_inplace", "additive_attention"]


@pytest.mark.parametrize("op", _FORCED_OPS)
def test_backward_runs_on_the_backend_forced_around_its_forward(op):
    assert _backward_backend(*_op_call(op)) == "reference"


@pytest.mark.parametrize("op", _FORCED_OPS)
def test_backward_block_holds_where_the_forward_had_none(op):
    assert _backward_backend(*_op_call(op), backward_block="reference") == "reference"


def test_explain_takes_the_alias_ops_with_their_own_arguments():
    """explain refused apply_rotary, flash_attention_varlen and scaled_dot_product_attention,
    which use_backend and last_dispatch take: a varlen call could not be explained."""
    q = torch.randn(5, 3, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert attnkit.explain("flash_attention_varlen", q, q, q, cu, cu, 3, 3, causal=True).backend == "cpp"
    assert attnkit.explain("scaled_dot_product_attention", q[None], q[None], q[None], is_causal=True).backend == "cpp"
    assert attnkit.explain("apply_rotary", torch.randn(1, 5, 2, 8), torch.randn(5, 4), torch.randn(5, 4)).backend == "cpp"
    with pytest.raises(TypeError, match="these are not flash_attention_varlen's arguments"):
        attnkit.explain("flash_attention_varlen", q, q, q)


def test_linear_forced_to_cpp_runs_past_its_row_limit_and_explain_sees_autocast():
    """Past 16 rows cpp is skipped for speed only, which forcing overrides (as for the RNNs);
    it raised. Under autocast explain named cpp for a float32 x the op casts to bfloat16."""
    x, w = torch.randn(40, 8), torch.randn(5, 8)
    with attnkit.use_backend("cpp"):
        y = attnkit.ops.linear(x, w)
    assert attnkit.last_dispatch("linear").backend == "cpp"
    torch.testing.assert_close(y, x @ w.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attnkit.explain("linear", x[:2], w).backend == "reference"
        attnkit.ops.linear(x[:2], w)
        assert attnkit.last_dispatch("linear").backend == "reference"


def test_explain_checks_what_the_op_checks():
    """explain answered "cpp" for attention_decode calls the op refuses (ZeroDivisionError at 0
    key/value heads) and took any keyword for flash_attention (a misspelt casual=True too)."""
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(TypeError, match="these are not flash_attention's arguments: .*'casual'"):
        attnkit.explain("flash_attention", q, q, q, casual=True)
    lengths = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="must be a multiple of k_cache/v_cache heads"):
        attnkit.explain("attention_decode", q[:, :, :1], torch.randn(1, 0, 3, 8), torch.randn(1, 0, 3, 8), lengths)
    with pytest.raises(ValueError, match=r"cache_seqlens must be within \[0, 3\]"):
        attnkit.explain("attention_decode", q[:, :, :1], q, q, lengths + 6)
    assert attnkit.explain("attention_decode", q[:, :, :1], q, q, lengths).backend == "cpp"


def test_triton_before_3_5_is_not_chosen_for_float64_attention(monkeypatch):
    """tl.dot takes float64 from triton 3.5 on: an older one failed inside the kernel."""
    from attnkit import backends

    monkeypatch.setattr(backends, "_triton_version", lambda: (3, 2))
    call = {"device": torch.device("cpu"), "dtype": torch.float64, "head_dim": 16, "head_dim_v": 16}
    for op in ("flash_attention", "attention_decode"):
        reasons = _dispatch._OPS[op].implementations["triton"].not_supported_reasons(call)
        assert any("tl.dot takes float64 from triton 3.5 on, this is triton 3.2" in r for r in reasons), (op, reasons)
        assert not any("float64" in r for r in _dispatch._OPS[op].implementations["triton"].not_supported_reasons(dict(call, dtype=torch.float32)))
    monkeypatch.setattr(backends, "_triton_version", lambda: (3, 5))
    assert not any("float64" in r for r in _dispatch._OPS["flash_attention"].implementations["triton"].not_supported_reasons(call))


def test_keep_backend_forcing_carries_a_block_into_checkpoint_recomputation():
    """torch.utils.checkpoint recomputes the forward inside loss.backward(), outside the block:
    the recomputation (and its backward) chose the default backend. keep_backend_forcing, as
    the checkpoint's context_fn, runs it under the blocks around the checkpointed call."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    # sin after: its backward unpacks first, and starts the recomputation outside the op's backward
    attend = lambda q, k, v: attnkit.ops.flash_attention(q.sin(), k, v, causal=True).sin()  # noqa: E731
    grad_out = torch.randn(1, 2, 9, 8)
    with attnkit.use_backend("reference"):
        want = torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)
    seen = []
    original = _dispatch.Op.select

    def recording(self, call):
        chosen = original(self, call)
        seen.append(chosen.backend)
        return chosen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_dispatch.Op, "select", recording)
        with attnkit.use_backend("reference"):
            out = torch.utils.checkpoint.checkpoint(attend, q, k, v, use_reentrant=False,
                                                    context_fn=attnkit.keep_backend_forcing)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert seen and set(seen) == {"reference"}, seen
    for g, w in zip(got, want):
        assert torch.equal(g, w)
