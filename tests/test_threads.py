"""Ops called from 4 Python threads at once give the serial results (forward and
gradients), and backend forcing by `use_backend` stays in its thread (a
contextvar), while `set_backend` is process-wide, as documented."""
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import attnkit
from attnkit import ops

THREADS, CALLS = 4, 8


def _randn(*shape, seed, grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def _attention(seed):
    q, k, v = _randn(2, 4, 9, 8, seed=seed), _randn(2, 2, 11, 8, seed=seed + 1), _randn(2, 2, 11, 8, seed=seed + 2)
    return lambda: ops.flash_attention(q, k, v, causal=True), (q, k, v)


def _varlen(seed):
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q, k, v = (_randn(10, 2, 8, seed=seed + i) for i in range(3))
    return lambda: ops.flash_attention_varlen(q, k, v, cu, cu, 7, 7), (q, k, v)


def _decode(seed):
    q, kc, vc = _randn(2, 4, 1, 8, seed=seed, grad=False), _randn(2, 2, 9, 8, seed=seed + 1, grad=False), \
        _randn(2, 2, 9, 8, seed=seed + 2, grad=False)
    return lambda: ops.attention_decode(q, kc, vc, torch.tensor([5, 9], dtype=torch.int32)), ()


def _rotary(seed):
    x, cos, sin = _randn(2, 6, 3, 8, seed=seed), _randn(8, 4, seed=1, grad=False), _randn(8, 4, seed=2, grad=False)
    return lambda: ops.apply_rotary(x, cos, sin, seqlen_offsets=1), (x,)


def _rnn(op, gates, seed):
    x, h = _randn(5, 3, 4, seed=seed), _randn(3, 6, seed=seed + 1)
    w = (_randn(gates * 6, 4, seed=seed + 2), _randn(gates * 6, 6, seed=seed + 3), _randn(gates * 6, seed=seed + 4))
    if op == "gru":
        return lambda: ops.gru(x, h, *w), (x, h, *w)
    c = _randn(3, 6, seed=seed + 5)
    if op == "lstm":
        return lambda: ops.lstm(x, (h, c), *w, lengths=[5, 2, 4]), (x, h, c, *w)
    return lambda: ops.lstm_cell(x[0], (h, c), *w), (x, h, c, *w)


CALLS_BY_OP = {
    "flash_attention": _attention,
    "flash_attention_varlen": _varlen,
    "attention_decode": _decode,
    "apply_rotary": _rotary,
    "lstm": lambda seed: _rnn("lstm", 4, seed),
    "gru": lambda seed: _rnn("gru", 3, seed),
    "lstm_cell": lambda seed: _rnn("lstm_cell", 4, seed),
}
if hasattr(ops, "additive_attention"):
    def _additive(seed):
        q, k, v = _randn(2, 3, 4, seed=seed), _randn(2, 5, 4, seed=seed + 1), _randn(2, 5, 6, seed=seed + 2)
        w_q, w_k, v_a = _randn(8, 4, seed=seed + 3), _randn(8, 4, seed=seed + 4), _randn(8, seed=seed + 5)
        return lambda: ops.additive_attention(q, k, v, w_q, w_k, v_a), (q, k, v, w_q, w_k, v_a)

    CALLS_BY_OP["additive_attention"] = _additive
DISPATCH = {"flash_attention_varlen": "flash_attention", "apply_rotary": "rotary"}
needs_cpp = pytest.mark.skipif(not attnkit.available_backends()["cpp"].available, reason="attnkit._C is not built")


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


def _outputs_and_grads(backend, op, call):
    fn, leaves = call
    with attnkit.use_backend(backend, op=DISPATCH.get(op, op)):  # per thread: use_backend is a contextvar
        outputs = _flat(fn())
        grads = []
        if leaves:
            grads = torch.autograd.grad(sum((o * o).sum() for o in outputs), [t for t in leaves if t.requires_grad],
                                        allow_unused=True)
    return [o.detach() for o in outputs] + [g for g in grads if g is not None]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", list(CALLS_BY_OP))
def test_concurrent_calls_match_serial(op, backend):
    if backend not in attnkit._dispatch._OPS[DISPATCH.get(op, op)].implementations:
        pytest.skip(f"no {op} implementation in the {backend} backend")
    calls = [CALLS_BY_OP[op](100 * i) for i in range(CALLS)]
    serial = [_outputs_and_grads(backend, op, call) for call in calls]
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(lambda call: _outputs_and_grads(backend, op, call), calls))
    for i, (got, want) in enumerate(zip(concurrent, serial)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"call {i}: concurrent result differs from the serial one"
    assert len({tuple(r[0].flatten()[:4].tolist()) for r in serial}) == CALLS  # the calls really differ


@needs_cpp
def test_use_backend_does_not_leak_into_other_threads():
    q = torch.randn(1, 2, 4, 8)
    inside, outside = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def forcing():
        with attnkit.use_backend("reference"):
            seen["forcing"] = attnkit.explain("flash_attention", q, q, q).backend
            inside.wait()  # the other thread decides while this one is inside the block
            outside.wait()

    def automatic():
        inside.wait()
        seen["automatic"] = attnkit.explain("flash_attention", q, q, q)
        outside.wait()

    threads = [threading.Thread(target=forcing), threading.Thread(target=automatic)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["forcing"] == "reference"
    assert seen["automatic"].forced_by is None and seen["automatic"].backend == "cpp"


@needs_cpp
def test_use_backend_reaches_a_worker_thread_only_through_its_context():
    """A new thread starts with an empty context: run it in a copy to carry the forcing."""
    q = torch.randn(1, 2, 4, 8)
    decide = lambda: attnkit.explain("flash_attention", q, q, q).backend  # noqa: E731
    with attnkit.use_backend("reference"), ThreadPoolExecutor(1) as pool:
        assert pool.submit(decide).result() == "cpp"
        assert pool.submit(contextvars.copy_context().run, decide).result() == "reference"


def test_set_backend_is_process_wide():
    q = torch.randn(1, 2, 4, 8)
    attnkit.set_backend("reference", op="flash_attention")
    try:
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(lambda: attnkit.explain("flash_attention", q, q, q).backend).result() == "reference"
    finally:
        attnkit.set_backend(None, op="flash_attention")
