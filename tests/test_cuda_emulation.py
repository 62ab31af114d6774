"""csrc/cuda's layer-norm LSTM / GRU kernels (rnn_layernorm_kernels.cuh) run on CPU threads
(tests/cuda_emulation/emulate.h: each block's threads std::threads, __syncthreads a barrier,
the warp shuffles an exchange), through the same time loops as attnkit._C, against its CPU
kernels: their indexing, barriers and block reductions checked with no GPU. A child process
builds and runs them, under a timeout (a barrier some thread misses hangs)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import sys
import torch
from torch.utils.cpp_extension import load
from attnkit import _extensions

root, build = sys.argv[1], sys.argv[2]
emulated = load("attnkit_ln_rnn_emulated", [f"{root}/tests/cuda_emulation/ln_rnn.cpp"],
                extra_include_paths=[f"{root}/csrc/include", f"{root}/csrc/cuda", f"{root}/tests/cuda_emulation"],
                extra_cflags=["-std=c++20", "-O1", "-pthread"], extra_ldflags=["-pthread"], build_directory=build)
cpu = _extensions.load("_C")[0]
gen = torch.Generator().manual_seed(0)


def rand(*shape, dtype, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(scale).add(shift).to(dtype)


def close(got, want, dtype, what):
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what} output {i}: {m}")


cases = 0
for cell, gates in (("lstm", 4), ("gru", 3)):
    for dtype in (torch.float64, torch.float32):
        for H, bias in ((6, True), (300, False)):  # fewer units than a block's threads; more (strided loops)
            T, B, I, G = 4, 3, 5, gates * H
            x, h0 = rand(T, B, I, dtype=dtype), rand(B, H, dtype=dtype)
            w_ih, w_hh = rand(G, I, dtype=dtype, scale=0.5), rand(G, H, dtype=dtype, scale=0.5)
            b_ih, b_hh = (rand(G, dtype=dtype, scale=0.3), rand(G, dtype=dtype, scale=0.3)) if bias else (None, None)
            ln = lambda n: (rand(n, dtype=dtype, scale=0.3, shift=1.0), rand(n, dtype=dtype, scale=0.3))
            (g_ih, be_ih), (g_hh, be_hh) = ln(G), ln(G)
            lengths = torch.tensor([T, 0, 2])  # unsorted, one empty row
            zoneout = (torch.rand(T, B, H, generator=gen) < 0.4).to(dtype)
            grad_out, grad_h = rand(T, B, H, dtype=dtype), rand(B, H, dtype=dtype)
            if cell == "lstm":
                c0, (g_c, be_c), grad_c = rand(B, H, dtype=dtype), ln(H), rand(B, H, dtype=dtype)
                args = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, g_c, be_c, lengths, zoneout)
                saved = [ext.ln_lstm_forward(*args, True) for ext in (emulated, cpu)]
                close(saved[0], saved[1], dtype, f"lstm H={H} {dtype} forward")
                grads = [ext.ln_lstm_backward(grad_out, grad_h, grad_c, x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c, be_c,
                                              lengths, zoneout, s[0], *s[3:]) for ext, s in zip((emulated, cpu), saved)]
                inference = [ext.ln_lstm_forward(*args, False)[:3] for ext in (emulated, cpu)]
            else:
                args = (x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, be_ih, g_hh, be_hh, lengths, zoneout)
                saved = [ext.ln_gru_forward(*args, True) for ext in (emulated, cpu)]
                close(saved[0], saved[1], dtype, f"gru H={H} {dtype} forward")
                grads = [ext.ln_gru_backward(grad_out, grad_h, x, h0, w_ih, w_hh, g_ih, g_hh, lengths, zoneout, s[0],
                                             *s[2:]) for ext, s in zip((emulated, cpu), saved)]
                inference = [ext.ln_gru_forward(*args, False)[:2] for ext in (emulated, cpu)]
            close(grads[0], grads[1], dtype, f"{cell} H={H} {dtype} backward")
            close(inference[0], inference[1], dtype, f"{cell} H={H} {dtype} forward without saving")
            close(inference[0], saved[1][:len(inference[0])], dtype, f"{cell} H={H} {dtype} saving or not")
            cases += 1
print(f"ok {cases}")
'''


def test_layer_norm_rnn_kernels_match_the_cpu_kernels_on_emulated_threads(tmp_path):
    import torch

    if torch.cuda.is_available():  # gpu-check: the GPU runs the kernels themselves (tests/ops/test_rnn_layernorm.py)
        pytest.skip("a GPU is here: the kernels run on it instead")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "python"),
                                                                   os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", CHILD, ROOT, str(tmp_path)], capture_output=True, text=True,
                         timeout=900, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok 8"), run.stdout[-3000:] + run.stderr[-6000:]
