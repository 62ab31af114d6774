"""attnkit/backends/cuda_graphs.py: the per-step cuda LSTM/GRU calls through CUDA graphs
(ATTNKIT_RNN_CUDA_GRAPHS=1). Here, without a GPU, its bookkeeping on CPU calls with a
stand-in capture whose replay recomputes the outputs from the input buffers, as a graph
would; the `gpu` tests run the real capture against the eager calls."""
import pytest
import torch

import attnkit
from attnkit.backends import cuda_graphs
from attnkit.ops import gru, lstm


class Recorder:
    """Stands in for cuda_graphs._capture; counts captures, can refuse them."""

    def __init__(self, refuse=False):
        self.captures, self.refuse = 0, refuse

    def __call__(self, fn, args):
        if self.refuse:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        inputs = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
        call_args = [i if i is not None else a for i, a in zip(inputs, args)]
        outputs = tuple(t.clone() for t in fn(*call_args))

        def replay():
            for out, new in zip(outputs, fn(*call_args)):
                out.copy_(new)

        return cuda_graphs._Graph(inputs, outputs, replay)


@pytest.fixture
def on_cpu(monkeypatch):
    cuda_graphs.clear()
    recorder = Recorder()
    monkeypatch.setattr(cuda_graphs, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graphs, "_capturing", lambda: False)
    monkeypatch.setattr(cuda_graphs, "_capture", recorder)
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "1")
    for switch in cuda_graphs._LOOP_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    yield recorder
    cuda_graphs.clear()


def affine(x, w, flag):
    return (x @ w + (1.0 if flag else 0.0), x.sum(0))


def test_replays_with_each_calls_values_and_returns_copies(on_cpu):
    w = torch.randn(3, 2)
    for seed in range(3):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))
        out = cuda_graphs.call("affine", affine, (x, w, True))
        for o, r in zip(out, affine(x, w, True)):
            torch.testing.assert_close(o, r)
    assert on_cpu.captures == 1
    out[0].zero_()  # a returned tensor is the caller's: the next replay does not see it, nor it the replay
    again = cuda_graphs.call("affine", affine, (x, w, True))
    torch.testing.assert_close(again[0], affine(x, w, True)[0])
    assert out[0].abs().sum() == 0


def test_one_graph_per_shape_flag_and_loop_switch_the_oldest_dropped(on_cpu, monkeypatch):
    w = torch.randn(3, 2)
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, False))
    cuda_graphs.call("affine", affine, (torch.randn(5, 3), w, True))
    cuda_graphs.call("affine", affine, (torch.randn(4, 3).t().contiguous().t(), w, True))  # other strides
    monkeypatch.setenv("ATTNKIT_RNN_CUDA_DIRECT_GEMM", "1")
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))
    assert on_cpu.captures == 5
    for rows in range(6, 6 + cuda_graphs.MAX_GRAPHS):
        cuda_graphs.call("affine", affine, (torch.randn(rows, 3), w, True))
    assert len(cuda_graphs._graphs) == cuda_graphs.MAX_GRAPHS
    captures = on_cpu.captures
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))  # the first, dropped: captured again
    assert on_cpu.captures == captures + 1


def test_off_by_default_and_where_a_graph_cannot_serve(on_cpu, monkeypatch):
    w = torch.randn(3, 2)
    monkeypatch.delenv(cuda_graphs.GRAPHS_ENV)
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))
    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "1")
    monkeypatch.setattr(cuda_graphs, "_DEVICE_TYPE", "cuda")  # CPU tensors (lengths): as they are
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))
    monkeypatch.setattr(cuda_graphs, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graphs, "_capturing", lambda: True)  # inside someone else's capture
    cuda_graphs.call("affine", affine, (torch.randn(4, 3), w, True))
    assert on_cpu.captures == 0 and not cuda_graphs._graphs


def test_a_refused_capture_warns_once_and_runs_as_it_is(on_cpu, monkeypatch):
    refusing = Recorder(refuse=True)
    monkeypatch.setattr(cuda_graphs, "_capture", refusing)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    with pytest.warns(UserWarning, match="affine could not be captured in a CUDA graph"):
        out = cuda_graphs.call("affine", affine, (x, w, True))
    torch.testing.assert_close(out[0], affine(x, w, True)[0])
    refusing.refuse = False
    cuda_graphs.call("affine", affine, (x, w, True))  # not tried again
    assert refusing.captures == 0


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_graphed_calls_match_eager_ones(kind, dtype, monkeypatch):
    """Three calls of one shape (one capture, two replays) with new inputs and weights each
    time: outputs and every gradient equal to the same calls without graphs."""
    cuda_graphs.clear()
    T, B, I, H = 7, 3, 10, 24
    G = 4 if kind == "lstm" else 3

    def run(seed, graphs):
        if graphs:
            monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, "1")
        else:
            monkeypatch.delenv(cuda_graphs.GRAPHS_ENV, raising=False)
        gen = torch.Generator().manual_seed(seed)
        shapes = [(T, B, I), (B, H)] + ([(B, H)] if kind == "lstm" else []) + [(G * H, I), (G * H, H), (G * H,), (G * H,)]
        args = [(torch.randn(*s, generator=gen) * 0.3).to("cuda", dtype).requires_grad_() for s in shapes]
        with attnkit.use_backend("cuda", op=kind):
            if kind == "lstm":
                out, (h, c) = lstm(args[0], (args[1], args[2]), *args[3:])
                outs = (out, h, c)
            else:
                outs = gru(*args)
            assert attnkit.last_dispatch(kind).backend == "cuda"
        grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)), args)
        return outs, grads

    tol = 1e-5 if dtype == torch.float32 else 2e-3  # the same kernels; cuBLAS may pick others in a capture
    for seed in range(3):
        graphed, eager = run(seed, True), run(seed, False)
        for a, b in zip(graphed[0] + graphed[1], eager[0] + eager[1]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert len(cuda_graphs._graphs) == 2  # one forward, one backward
    cuda_graphs.clear()
