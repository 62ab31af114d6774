"""CUDA kernels run on CPU threads (tests/cuda_emulation/emulate.h: each block's threads
std::threads, __syncthreads a barrier, the warp shuffles an exchange; a cluster's blocks at
once, with its barrier, distributed shared memory and mma.sync): their indexing, barriers and
fragment layouts checked with no GPU. A child process builds and runs them, under a timeout
(a barrier some thread misses hangs).
- csrc/cuda's layer-norm LSTM / GRU kernels (rnn_layernorm_kernels.cuh), through the same time
  loops as attnkit._C, against its CPU kernels;
- the persistent kernels: the grid forward (rnn_persistent_kernel.cuh) and the opt-in
  (ATTNKIT_RNN_CLUSTER=1) cluster forward (rnn_cluster_kernel.cuh) against a plain PyTorch
  recurrence with the same roundings to float16 / bfloat16, the cluster backward
  (rnn_cluster_backward_kernel.cuh) from the forward's saved values against attnkit._C's
  backward on the same values."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each child: builds tests/cuda_emulation/<source>.cpp as `emulated`, loads attnkit._C as `cpu`.
PREAMBLE = r'''
import sys
import torch
from torch.utils.cpp_extension import load
from attnkit import _extensions

root, build, source = sys.argv[1:4]
emulated = load(f"attnkit_{source}_emulated", [f"{root}/tests/cuda_emulation/{source}.cpp"],
                extra_include_paths=[f"{root}/csrc/include", f"{root}/csrc/cuda", f"{root}/tests/cuda_emulation"],
                extra_cflags=["-std=c++20", "-O1", "-pthread"], extra_ldflags=["-pthread"], build_directory=build)
cpu = _extensions.load("_C")[0]
gen = torch.Generator().manual_seed(0)
'''

LN_CHILD = r'''


def rand(*shape, dtype, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(scale).add(shift).to(dtype)


def close(got, want, dtype, what):
    # atol scaled by the output's magnitude (as helpers.ATTENTION_TOL): float32 gradients summed
    # over the rows differ in their last bits between the kernels' tanh and reduction orders.
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    for i, (g, w) in enumerate(zip(got, want)):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what} output {i}: {m}")


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


def _run_child(source: str, code: str, tmp_path, expected: str) -> None:
    import torch

    if torch.cuda.is_available():  # gpu-check: the GPU runs the kernels themselves (tests/ops)
        pytest.skip("a GPU is here: the kernels run on it instead")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "python"),
                                                                   os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-c", PREAMBLE + code, ROOT, str(tmp_path), source], capture_output=True,
                         text=True, timeout=900, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith(expected), run.stdout[-3000:] + run.stderr[-6000:]


def test_layer_norm_rnn_kernels_match_the_cpu_kernels_on_emulated_threads(tmp_path):
    _run_child("ln_rnn", LN_CHILD, tmp_path, "ok 8")


PERSISTENT_CHILD = r'''


def rand(*shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def recurrence(gates, pre, w_hh, b_hh, h0, c0, lengths):
    """The kernel's arithmetic in plain PyTorch: float products and gates on the stored
    (rounded) inputs, h rounded to the storage type each step, c kept in float; a row
    past its length keeps its state and outputs 0. Returns out, h_T, c_T, saved gates
    (LSTM i, f, g, o / GRU r, z, n, W_hn h + b_hn) and, LSTM, the saved cell states."""
    S, (T, B, _), H = pre.dtype, pre.shape, w_hh.shape[1]
    h, c, outs, saved, cells = h0.clone(), c0, [], [], []
    for t in range(T):
        gh, p, running = h.float() @ w_hh.float().T, pre[t].float(), (t < lengths).view(B, 1)
        if gates == 4:
            i, f, g, o = (p + gh).chunk(4, 1)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c_new = f * c + i * g
            h_new = o * c_new.tanh()
            saved.append(torch.cat([i, f, g, o], 1))
            c = torch.where(running, c_new, c)
            cells.append(c)
        else:
            hr, hz, hn = (gh + (0 if b_hh is None else b_hh.float())).chunk(3, 1)
            pr, pz, pn = p.chunk(3, 1)
            r, z = (pr + hr).sigmoid(), (pz + hz).sigmoid()
            n = (pn + r * hn).tanh()
            h_new = (1 - z) * n + z * h.float()
            saved.append(torch.cat([r, z, n, hn], 1))
        outs.append(torch.where(running, h_new.to(S), torch.zeros((), dtype=S)))
        h = torch.where(running, h_new.to(S), h)
    return torch.stack(outs), h, c, torch.stack(saved).to(S), torch.stack(cells).to(S) if cells else None


def close(named, tol, what):
    for name, g, w in named:
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()), msg=lambda m: f"{what} {name}: {m}")


cases = 0
# (gates, T, B, H, dtype, forced cluster size or 0 for the plan's, GRU b_hh): clusters of 1,
# 2 and 4 blocks; H off the 16-row tiles; k split 1 and 4; two clusters of batch rows
# (B = 9), the second with one row; a GRU without b_hh.
for gates, T, B, H, dtype, forced, bias in (
    (4, 5, 3, 64, torch.float16, 0, True), (4, 4, 9, 100, torch.bfloat16, 0, True),
    (4, 3, 1, 24, torch.float16, 0, True), (4, 3, 2, 40, torch.bfloat16, 4, True),
    (3, 5, 3, 70, torch.float16, 0, True), (3, 3, 2, 16, torch.bfloat16, 2, True),
    (3, 4, 9, 48, torch.bfloat16, 0, False),
):
    cluster, I = emulated.plan(gates, B, H, forced)[0], 7
    x, w_ih = rand(T, B, I).to(dtype), rand(gates * H, I, scale=I ** -0.5).to(dtype)
    w_hh = rand(gates * H, H, scale=H ** -0.5).to(dtype)
    pre = (x.float() @ w_ih.float().T + rand(gates * H, scale=0.3)).to(dtype)  # biases folded in, as run() does
    b_hh = rand(gates * H, scale=0.3).to(dtype) if gates == 3 and bias else None
    h0, c0 = rand(B, H).to(dtype), (rand(B, H).to(dtype) if gates == 4 else None)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0], lengths[-1] = T, 0  # unsorted, an empty row
    h = torch.zeros(2, B, H, dtype=dtype)
    h[0] = h0
    c = c0.float() if gates == 4 else None
    out = torch.empty(T, B, H, dtype=dtype)
    saved = torch.full((T, B, 4 * H), float("nan"), dtype=dtype)
    cells = torch.full((T, B, H), float("nan"), dtype=dtype) if gates == 4 else None
    emulated.forward(gates, forced, w_hh, pre, b_hh, h, c, out, lengths, saved, cells)
    want = recurrence(gates, pre, w_hh, b_hh, h0, c0.float() if gates == 4 else None, lengths)
    what = f"gates={gates} T={T} B={B} H={H} {dtype} cluster={cluster}"
    running = torch.arange(T).view(T, 1) < lengths.view(1, B)  # the backward reads only these steps' saved values
    got = [("out", out, want[0]), ("h_T", h[T & 1], want[1]), ("saved gates", saved[running], want[3][running])]
    if gates == 4:
        got += [("c_T", c, want[2]), ("saved cells", cells[running], want[4][running])]
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, g, w in got:
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"{what} forward {name}: {m}")

    # The backward from those saved values, against attnkit._C's in float32 on the same values
    # (the cluster kernel rounds each step's gate gradients to the storage type).
    grad_out, grad_hn = rand(T, B, H).to(dtype), rand(B, H).to(dtype)
    grad_cn = rand(B, H).to(dtype) if gates == 4 else None
    dpre, dgh, dh0, dc0 = emulated.backward(gates, forced, w_hh, saved, cells, c0, h0, out, grad_out, grad_hn, grad_cn,
                                            lengths)
    f = lambda t: None if t is None else t.float()
    if gates == 4:
        ref = cpu.lstm_backward(f(grad_out), f(grad_hn), f(grad_cn), f(x), f(h0), f(c0), f(w_ih), f(w_hh), None,
                                lengths, f(out), f(saved), f(cells), torch.empty(0))
        dgh = dpre
    else:
        ref = cpu.gru_backward(f(grad_out), f(grad_hn), f(x), f(h0), f(w_ih), f(w_hh), lengths, f(out), f(saved))
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]]).float().view(T * B, H)
    dgi2, dgh2 = dpre.float().view(T * B, -1), dgh.float().view(T * B, -1)
    grads = [("dx", (dgi2 @ w_ih.float()).view(T, B, I)), ("dh0", dh0.float())]
    grads += [("dc0", dc0.float())] if gates == 4 else []
    grads += [("dw_ih", dgi2.T @ x.float().view(T * B, I)), ("dw_hh", dgh2.T @ h_prev), ("db_ih", dgi2.sum(0))]
    grads += [] if gates == 4 else [("db_hh", dgh2.sum(0))]
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    close([(name, g, w) for (name, g), w in zip(grads, ref)], tol, f"{what} backward")
    cases += 1

# The grid kernel (rnn_persistent_kernel.cuh: the default persistent inference path, its
# input projections loaded before each step's product) on a grid of a few blocks: 5, 16, 1
# and 8 units a block (the last block short), batch 1, 3, 5 and 8, every storage type.
for gates, T, B, H, dtype, units in ((4, 4, 3, 12, torch.float32, 5), (4, 3, 8, 20, torch.float16, 16),
                                     (3, 5, 1, 9, torch.bfloat16, 1), (3, 4, 5, 33, torch.float32, 8)):
    w_hh = rand(gates * H, H, scale=H ** -0.5).to(dtype)
    pre = rand(T, B, gates * H).to(dtype)
    b_hh = rand(gates * H, scale=0.3).to(dtype) if gates == 3 else None
    h0, c0 = rand(B, H).to(dtype), (rand(B, H) if gates == 4 else None)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T
    if B > 1:
        lengths[-1] = 0
    h = torch.zeros(2, B, H, dtype=dtype)
    h[0] = h0
    c = c0.clone() if gates == 4 else None
    out = torch.empty(T, B, H, dtype=dtype)
    emulated.grid_forward(gates, units, w_hh, pre, b_hh, h, c, out, lengths)
    want = recurrence(gates, pre, w_hh, b_hh, h0, c0, lengths)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    got = [("out", out, want[0]), ("h_T", h[T & 1], want[1])] + ([("c_T", c, want[2])] if gates == 4 else [])
    for name, g, w in got:
        torch.testing.assert_close(g, w, rtol=tol, atol=tol,
                                   msg=lambda m: f"grid gates={gates} B={B} H={H} {dtype} units={units} {name}: {m}")
    cases += 1
print(f"ok {cases}")
'''


def test_persistent_rnn_kernels_match_the_recurrence_and_cpu_backward_on_emulated_threads(tmp_path):
    _run_child("persistent_rnn", PERSISTENT_CHILD, tmp_path, "ok 11")
