"""The C++ kernels where OpenMP grants a parallel region fewer threads than it asked for
(OMP_DYNAMIC=true, or OMP_THREAD_LIMIT below torch's thread count): the fused LSTM/GRU
teams split their work by the team they get, and oneDNN's linear, which assumes the
team it asked for (and then returns garbage, torch's own mkldnn linear too), is not
called. Each setting in a fresh process: libgomp reads those variables once, at load."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("attnkit._C")

# Float64 torch.nn as the reference (torch's float32 LSTM in grad mode runs oneDNN's RNN
# primitive, itself wrong under these settings). Batch 1 and 2 run the small-batch loops,
# 16 the fused teams (T > 1) and the per-step oneDNN GEMMs (T = 1); B = 20 cells and
# linear the oneDNN route, forced so that Intel CPUs (whose default is MKL) take it too.
CHECK = textwrap.dedent("""
    import torch, attnkit
    torch.set_num_threads(4)
    torch.manual_seed(0)
    worst = {}
    def record(name, ours, ref):
        error = (ours.double() - ref).abs().max().item()
        worst[name] = max(worst.get(name, 0.0), error if error == error else float("inf"))  # NaN: inf
    for ours_cls, torch_cls in ((attnkit.nn.LSTM, torch.nn.LSTM), (attnkit.nn.GRU, torch.nn.GRU)):
        ours = ours_cls(64, 256)
        ref = torch_cls(64, 256).double()
        ref.load_state_dict(ours.state_dict())
        for batch, steps in ((1, 20), (2, 20), (16, 1), (16, 20)):
            x = torch.randn(steps, batch, 64)
            x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
            out, out_ref = ours(x_ours)[0], ref(x_ref)[0]
            grad, = torch.autograd.grad(out.square().sum(), x_ours)
            grad_ref, = torch.autograd.grad(out_ref.square().sum(), x_ref)
            record(ours_cls.__name__, out, out_ref)
            record(ours_cls.__name__ + " grad", grad, grad_ref)
    for ours_cls, torch_cls in ((attnkit.nn.LSTMCell, torch.nn.LSTMCell), (attnkit.nn.GRUCell, torch.nn.GRUCell)):
        ours = ours_cls(256, 256)
        ref = torch_cls(256, 256).double()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(20, 256)
        x_ours, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
        out, out_ref = ours(x_ours), ref(x_ref)
        out, out_ref = (out[0], out_ref[0]) if isinstance(out, tuple) else (out, out_ref)
        grad, = torch.autograd.grad(out.square().sum(), x_ours)
        grad_ref, = torch.autograd.grad(out_ref.square().sum(), x_ref)
        record(ours_cls.__name__, out, out_ref)
        record(ours_cls.__name__ + " grad", grad, grad_ref)
    x, w, b = torch.randn(20, 256), torch.randn(1024, 256) / 16, torch.randn(1024)
    record("linear", attnkit.ops.linear(x, w, b), torch.addmm(b.double(), x.double(), w.double().t()))
    print(worst)
    assert max(worst.values()) < 1e-4, worst
""")


@pytest.mark.parametrize("setting", [{}, {"OMP_DYNAMIC": "true"}, {"OMP_THREAD_LIMIT": "1"}])
def test_smaller_openmp_teams_give_the_same_results(setting):
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_DYNAMIC", "OMP_THREAD_LIMIT")}
    env.update(setting, ATTNKIT_CPU_GEMM="onednn")
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
