"""Flash attention on the CPU: attnkit's cpp backend (automatic dispatch) vs
SDPA on CPU (PyTorch's own flash kernel) for plain and causal attention, and vs
the materialized reference (attnkit's `reference` backend, O(N^2) memory) for
sliding window, soft-capping and ALiBi, which SDPA cannot fuse; and a learned
additive bias (1, H, N, N), against SDPA with the same bias: detached in the
forward rows (as inference holds it; SDPA's flash kernel then takes it), requiring
grad in the fwd+bwd rows (both sides compute its gradient; SDPA then runs its
unfused math path, the only one with a bias gradient on the CPU). B=4, H=8, D=64.
The fwd+bwd rows' max err covers the gradients of q, k, v (and the bias).

Decoding (forward only): one new query against N cached keys, as a generation step
makes it. flash_attention (what Hugging Face models call through attnkit's attention
interface; B=4, H=8, D=64) and attention_decode on a GQA cache (B=1, H=32, H_kv=8,
D=128, as Llama's), each against SDPA on the same tensors; and flash_attention_varlen
with one query per packed sequence (4 sequences of N, N/2, 3N/4 and N/4 keys, H=8,
D=64) against SDPA called per sequence on views of the same packed tensors.

Peak memory (`*_peak_mb`, vs SDPA for plain attention, vs the reference for
the sliding window) is the rise of the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs) over one forward+backward call, in
a fresh subprocess per measurement so that earlier cases do not hide it.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from timing import gradient_error, max_error, median_pair_ms, rss_rise_mb, rss_rise_mb_in_subprocess

import attnkit
from attnkit.ops import attention_decode, flash_attention, flash_attention_varlen

TITLE = ("Flash attention (CPU): attnkit cpp vs SDPA (plain, causal, learned bias) and vs the materialized reference "
         "(window, softcap, ALiBi)")
BATCH, HEADS, DIM = 4, 8, 64
QUICK_N, FULL_N = [256, 1024], [256, 512, 1024, 2048, 4096]
QUICK_FEATURE_N, FULL_FEATURE_N = [1024], [1024, 2048]  # the reference needs ~10 (N, N) fp32 tensors per head
QUICK_MEMORY_N, FULL_MEMORY_N = [2048], [1024, 2048, 4096, 8192]
QUICK_DECODE_N, FULL_DECODE_N = [1024], [256, 1024, 4096, 16384]
MEMORY_BATCH, MEMORY_HEADS = 1, 2  # keeps the reference's fwd+bwd at N = 8192 within a few GB
FEATURES = {
    "plain": dict(),
    "window 256": dict(causal=True, window_size=(256, 0)),
    "softcap 30": dict(softcap=30.0),
    "alibi": dict(causal=True, alibi=True),
}


def _inputs(batch, heads, n, dtype, grad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, DIM, generator=gen).to(dtype).requires_grad_(grad) for _ in range(3)]


def _kwargs(features: dict, heads: int) -> dict:
    kwargs = {k: v for k, v in features.items() if k != "alibi"}
    if features.get("alibi"):
        kwargs["alibi_slopes"] = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)  # the ALiBi paper's slopes
    return kwargs


def _fwd_bwd(fn):
    def step():
        fn().sum().backward()

    return step


def _attnkit(q, k, v, kwargs, backend=None):
    if backend is None:
        return lambda: flash_attention(q, k, v, **kwargs)

    def call():
        with attnkit.use_backend(backend, op="flash_attention"):
            return flash_attention(q, k, v, **kwargs)

    return call


def _pair(rows, case, shape, backend, ours, theirs, device, leaves, repeats=15, warmup=3, forward=None):
    """Forward and forward+backward rows for one case; the fwd+bwd row's max err covers the
    gradients of `leaves` too. `forward`: other (ours, theirs) calls for the forward row."""
    ours_forward, theirs_forward = forward or (ours, theirs)
    with torch.no_grad():
        error = max_error(ours_forward(), theirs_forward())
        t_ours, t_theirs = median_pair_ms(ours_forward, theirs_forward, device, warmup, repeats)
    rows.append(dict(case=f"{case} forward", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                     max_err=error))
    error = gradient_error(_fwd_bwd(ours), _fwd_bwd(theirs), leaves, forward_error=error)
    t_ours, t_theirs = median_pair_ms(_fwd_bwd(ours), _fwd_bwd(theirs), device, warmup, repeats)
    rows.append(dict(case=f"{case} fwd+bwd", shape=shape, backend=backend, ours_ms=t_ours, baseline_ms=t_theirs,
                     max_err=error))


def _decode_rows(rows, n, dtype, device):
    """One query against n keys: flash_attention and attention_decode (GQA) vs SDPA, forward only."""
    gen = torch.Generator().manual_seed(2)
    for case, (batch, heads, heads_kv, dim) in (("one query vs SDPA", (BATCH, HEADS, HEADS, DIM)),
                                                 ("decode GQA vs SDPA", (1, 32, 8, 128))):
        q = torch.randn(batch, heads, 1, dim, generator=gen).to(dtype)
        k, v = (torch.randn(batch, heads_kv, n, dim, generator=gen).to(dtype) for _ in range(2))
        if heads == heads_kv:
            op, ours = "flash_attention", lambda: flash_attention(q, k, v)  # noqa: E731
        else:
            lengths = torch.full((batch,), n, dtype=torch.int32)
            op, ours = "attention_decode", lambda: attention_decode(q, k, v, lengths)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != heads_kv)  # noqa: E731
        with torch.no_grad():
            error = max_error(ours(), theirs())
            backend = attnkit.last_dispatch(op).backend
            t_ours, t_theirs = median_pair_ms(ours, theirs, device, warmup=3, repeats=max(5, min(50, 50 * 1024 // n)))
        rows.append(dict(case=case, shape=f"B={batch} H={heads}/{heads_kv} N={n} D={dim}", backend=backend,
                         ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    lengths = [n, n // 2, 3 * n // 4, max(1, n // 4)]
    cu_k = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_q = torch.arange(len(lengths) + 1, dtype=torch.int32)
    q = torch.randn(len(lengths), HEADS, DIM, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lengths), HEADS, DIM, generator=gen).to(dtype) for _ in range(2))
    ours = lambda: flash_attention_varlen(q, k, v, cu_q, cu_k, 1, n)  # noqa: E731

    def theirs():  # (1, H, n, D) views of each sequence's rows
        outs = [F.scaled_dot_product_attention(q[b][None, :, None], k[lo:hi].transpose(0, 1)[None],
                                               v[lo:hi].transpose(0, 1)[None])
                for b, (lo, hi) in enumerate(zip(cu_k[:-1].tolist(), cu_k[1:].tolist()))]
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    with torch.no_grad():
        error = max_error(ours(), theirs())
        backend = attnkit.last_dispatch("flash_attention").backend
        t_ours, t_theirs = median_pair_ms(ours, theirs, device, warmup=3, repeats=max(5, min(50, 50 * 1024 // n)))
    rows.append(dict(case="one query per packed sequence vs SDPA per sequence",
                     shape=f"B={len(lengths)} H={HEADS} N={n},{n // 2},{3 * n // 4},{max(1, n // 4)} D={DIM}",
                     backend=backend, ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))


def peak_mb(backend: str, n: int, dtype: torch.dtype, feature: str) -> float:
    """Peak resident-memory rise (MiB) of one forward+backward, measured in a subprocess."""
    return rss_rise_mb_in_subprocess(__file__, dict(backend=backend, n=n, dtype=str(dtype).split(".")[-1],
                                                    feature=feature))


def _measure_peak(spec: dict) -> float:
    dtype = getattr(torch, spec["dtype"])
    kwargs = _kwargs(FEATURES[spec["feature"]], MEMORY_HEADS)
    warm = _inputs(1, MEMORY_HEADS, 64, dtype, grad=True)  # a first small call loads libraries and kernels
    _fwd_bwd(_attnkit(*warm, kwargs, "reference" if spec["backend"] == "sdpa" else spec["backend"]))()
    _fwd_bwd(lambda: F.scaled_dot_product_attention(*warm))()
    q, k, v = _inputs(MEMORY_BATCH, MEMORY_HEADS, spec["n"], dtype, grad=True)
    if spec["backend"] == "sdpa":
        step = _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v))
    else:
        step = _fwd_bwd(_attnkit(q, k, v, kwargs, spec["backend"]))
    return rss_rise_mb(step)


def skip_reason(device: torch.device, dtype: torch.dtype):
    return None if device.type == "cpu" else "skipped: CPU backend; the GPU attention benchmark is `attention`"


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    if device.type != "cpu":
        return []  # the GPU attention benchmark is `attention`
    rows = []
    for n in QUICK_N if quick else FULL_N:
        q, k, v = _inputs(BATCH, HEADS, n, dtype, grad=True)
        shape = f"B={BATCH} H={HEADS} N={n} D={DIM}"
        for causal in (False, True):
            ours = _attnkit(q, k, v, dict(causal=causal))
            ours()
            backend = attnkit.last_dispatch("flash_attention").backend
            theirs = lambda c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
            repeats = max(3, min(15, 15 * 1024 // n))  # a fwd+bwd at N = 4096 takes seconds
            _pair(rows, "causal vs SDPA" if causal else "plain vs SDPA", shape, backend, ours, theirs, device,
                  (q, k, v), repeats=repeats, warmup=1 if n > 1024 else 3)
    for n in QUICK_FEATURE_N if quick else FULL_FEATURE_N:
        q, k, v = _inputs(BATCH, HEADS, n, dtype, grad=True)
        shape = f"B={BATCH} H={HEADS} N={n} D={DIM}"
        for name, features in FEATURES.items():
            if name == "plain":
                continue  # timed against SDPA above
            kwargs = _kwargs(features, HEADS)
            ours = _attnkit(q, k, v, kwargs)
            ours()
            backend = attnkit.last_dispatch("flash_attention").backend
            _pair(rows, f"{name} vs reference", shape, backend, ours, _attnkit(q, k, v, kwargs, "reference"), device,
                  (q, k, v), repeats=3, warmup=1)
        # A learned bias (T5's, Swin's relative position bias): its gradient comes with the backward.
        # The forward row takes it detached, as inference holds it: a bias that requires grad sends
        # SDPA to its unfused math path even under no_grad.
        bias = (0.5 * torch.randn(1, HEADS, n, n, generator=torch.Generator().manual_seed(1))).to(dtype)
        bias.requires_grad_(True)
        ours = _attnkit(q, k, v, dict(attn_mask=bias))
        ours()
        backend = attnkit.last_dispatch("flash_attention").backend
        fixed = bias.detach()
        forward = (_attnkit(q, k, v, dict(attn_mask=fixed)), lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=fixed))
        _pair(rows, "learned bias vs SDPA", shape, backend, ours,
              lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), device, (q, k, v, bias), repeats=5,
              warmup=1, forward=forward)
    for n in QUICK_DECODE_N if quick else FULL_DECODE_N:
        _decode_rows(rows, n, dtype, device)
    for n in QUICK_MEMORY_N if quick else FULL_MEMORY_N:
        for feature, baseline in (("plain", "sdpa"), ("window 256", "reference")):
            ours_mb, base_mb = peak_mb("cpp", n, dtype, feature), peak_mb(baseline, n, dtype, feature)
            rows.append(dict(case=f"{feature} fwd+bwd peak memory vs {baseline}",
                             shape=f"B={MEMORY_BATCH} H={MEMORY_HEADS} N={n} D={DIM}", backend="cpp",
                             ours_ms=float("nan"), baseline_ms=float("nan"), max_err=float("nan"),
                             ours_peak_mb=ours_mb, baseline_peak_mb=base_mb))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        print(_measure_peak(json.loads(sys.argv[2])))
    else:
        sys.exit("usage: python benchmarks/run.py --only attention_cpu  (this module is a benchmark family)")
