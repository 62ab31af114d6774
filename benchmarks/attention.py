"""Flash attention on the GPU: attnkit's Triton kernel vs every SDPA backend
(flash, efficient, cuDNN where available), FlexAttention and the flash-attn
package (FlashAttention-3's `flash_attn_interface` or FlashAttention-2's `flash_attn`,
when installed; a note says so when not), bf16, causal and not, D = 64/128, N = 512..16k: forward, backward and forward+backward TFLOP/s.
Times are medians of synchronized calls, host work included, as for every family; the note
column adds attnkit's TFLOP/s with its calls queued back to back (CUDA events; at the target
shape the baseline's too, and their ratio: the kernels' speeds without the host work), and the
autotuner's picks. At the target shape, on sm_90, the opt-in warp-specialized forward
(ATTNKIT_TRITON_WS=1) is timed against the default forward too.

Needs a CUDA GPU; on a CPU machine it reports that and returns no rows (the
CPU attention benchmark is `attention_cpu`). Plots: `python benchmarks/run.py --only attention`
writes bench-results/attention-*.png when matplotlib is installed.
"""
from __future__ import annotations

import os
from unittest import mock

import torch
import torch.nn.functional as F
from timing import max_error, median_ms, within_budget

import attnkit

TITLE = "Flash attention (GPU; bfloat16 where --dtype is float32): attnkit Triton vs SDPA backends and FlexAttention"
QUICK = [(128, 4096), (64, 1024)]  # (head dim, sequence length); the target shape first, in case time runs out
# Issue 3's target shape first, then the others so that the first few span both head dims and
# the whole length range: gpu_check's budget stops the family between shapes (on the H200 of
# 2026-11-27 it measured only the target), and a cut run should still show the ends of the range.
FULL = [(128, 4096), (64, 4096), (128, 16384), (128, 1024), (64, 16384), (64, 1024), (128, 8192), (128, 2048),
        (128, 512), (64, 8192), (64, 2048), (64, 512)]
TOKENS = 16384  # batch * sequence length, so every size does comparable work


def flops(batch, heads, n, dim, causal, mode):
    forward = 4 * batch * heads * n * n * dim * (0.5 if causal else 1.0)
    return {"forward": forward, "backward": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def _sdpa_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return {name: (lambda backend: (lambda q, k, v, c: _with(sdpa_kernel(backend), q, k, v, c)))(b) for name, b in names.items()}


def _with(context, q, k, v, causal):
    with context:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # The "backward" rows time autograd.grad with retain_graph=True, which a compiled
    # backward holding donated buffers refuses (seen at D=64 on torch 2.11).
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    compiled = torch.compile(flex_attention)
    # One causal block mask per shape, made before timing, as a model would: built on every
    # call, its host and GPU work (not the attention's) was timed as Flex's (the causal rows
    # read 2.7-4.3x in Flex's disfavour against ~1x without a mask, H200, 2026-11-26).
    masks = {}

    def run(q, k, v, causal):
        mask = None
        if causal:
            key = (q.shape[2], k.shape[2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, key[0], key[1], device=key[2])
            mask = masks[key]
        return compiled(q, k, v, block_mask=mask)

    return run


def _flash_attn_package():
    """(name, fn) for the installed flash-attn package, else None. It takes (B, N, H, D):
    the transposed views of our (B, H, N, D) tensors have a unit last stride, which is
    all it asks, so no copy is timed."""
    for module, name in (("flash_attn_interface", "flash-attn 3"), ("flash_attn", "flash-attn 2")):
        try:
            package = __import__(module)
        except ImportError:
            continue

        def run(q, k, v, causal, package=package):
            out = package.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
            out = out[0] if isinstance(out, tuple) else out  # FlashAttention-3 also returns the lse
            return out.transpose(1, 2)

        return name, run
    print("  (flash-attn package not installed: that baseline is skipped; pip install flash-attn to add it)")
    return None


def _step(fn, q, k, v, causal, mode):
    """The call timed for `mode`: forward (no autograd graph), backward alone, or both."""
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(q, k, v, causal)

        return forward
    out = fn(q, k, v, causal)
    grad = torch.randn_like(out)
    if mode == "backward":
        return lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad)


def _time(fn, q, k, v, causal, mode, device):
    return median_ms(_step(fn, q, k, v, causal, mode), device)


def _back_to_back_ms(fn, q, k, v, causal, mode):
    """attnkit's calls queued back to back, timed by CUDA events (triton.testing.do_bench's median):
    the GPU's time without the host work that each synchronized call of median_ms includes, which
    is what a training loop whose Python runs ahead of the GPU sees (1.16 against 1.33 ms for the
    forward at the target shape on the H200)."""
    import triton.testing

    return triton.testing.do_bench(_step(fn, q, k, v, causal, mode), return_mode="median")


def _gpu_dtype(dtype):
    return torch.bfloat16 if dtype == torch.float32 else dtype  # the GPU comparison is in half precision


def prewarm(device: torch.device, dtype: torch.dtype, config: int, quick: bool = True) -> None:
    """Compiles autotune candidate `config` of the kernels this family times, at
    each head dim, causal and not, forward and backward, into Triton's on-disk
    cache. gpu_check runs one such process per candidate beside its build (or tests):
    the autotuner in the timed run then loads its candidates from that cache
    instead of compiling them one after another (minutes of a 10-minute check)."""
    from triton.runtime.errors import OutOfResources

    from attnkit.triton_kernels.flash_attention_launch import config_count
    from attnkit.triton_kernels.flash_attention_ws import WS_SHAPES

    dtype = _gpu_dtype(dtype)
    os.environ["ATTNKIT_TRITON_CONFIG"] = str(config)
    first_length = {}
    for dim, n in QUICK if quick else FULL:
        first_length.setdefault(dim, n)
    for dim, n in first_length.items():
        if config >= config_count(dim, dtype):
            continue
        q, k, v = (torch.randn(max(1, TOKENS // n), 16, n, dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        for causal in (False, True):
            try:
                out = attnkit.ops.flash_attention(q, k, v, causal=causal)
                out.backward(torch.randn_like(out))
            except OutOfResources as exc:  # the autotuner skips this candidate too
                print(f"  candidate {config} at D={dim}{' causal' if causal else ''} does not fit: {exc}")
            if (dim, n) == FULL[0] and config < len(WS_SHAPES):  # run() times the warp-specialized forward here
                try:  # (a plain forward again where it cannot run)
                    with mock.patch.dict(os.environ, ATTNKIT_TRITON_WS="1"), torch.no_grad():
                        attnkit.ops.flash_attention(q, k, v, causal=causal)
                except Exception as exc:  # opt-in and new: its failure is the GPU tests' to report, not the prewarm's
                    print(f"  warp-specialized candidate {config}{' causal' if causal else ''} failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def skip_reason(device: torch.device, dtype: torch.dtype):
    return None if device.type == "cuda" else "skipped: needs a CUDA GPU; the attention_cpu family times the CPU backend"


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    if device.type != "cuda":
        print("  (skipped: needs a CUDA GPU; see the attention_cpu family for the CPU backend)")
        return []
    from attnkit.triton_kernels.flash_attention_launch import last_tuned_configs

    dtype = _gpu_dtype(dtype)
    heads = 16
    baselines = dict(_sdpa_backends())
    flex = _flex()
    if flex is not None:
        baselines["flex"] = flex
    package = _flash_attn_package()
    if package is not None:
        baselines[package[0]] = package[1]
    ours = lambda q, k, v, causal: attnkit.ops.flash_attention(q, k, v, causal=causal)  # noqa: E731
    rows = []
    for dim, n in within_budget(QUICK if quick else FULL, rows, lambda case: f"D={case[0]} N={case[1]}"):
        batch = max(1, TOKENS // n)
        q, k, v = (torch.randn(batch, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        for causal in (False, True):
            first_row = len(rows)
            reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            error = max_error(ours(q, k, v, causal), reference)
            # The backward rows' max err covers dq, dk, dv against SDPA's too.
            grad_out = torch.randn_like(reference)
            gradients = (torch.autograd.grad(ours(q, k, v, causal), (q, k, v), grad_out),
                         torch.autograd.grad(reference, (q, k, v), grad_out))
            errors = dict(forward=error, backward=max(error, max_error(*gradients)))
            del reference, grad_out, gradients
            for mode in ("forward", "backward", "fwd+bwd"):
                t_ours = _time(ours, q, k, v, causal, mode, device)
                work = flops(batch, heads, n, dim, causal, mode)
                b2b_ours = _back_to_back_ms(ours, q, k, v, causal, mode)
                for name, fn in baselines.items():
                    try:
                        t_base = _time(fn, q, k, v, causal, mode, device)
                        queued = f"back to back {work / b2b_ours / 1e9:.0f} TFLOP/s"
                        if (dim, n) == FULL[0]:  # the target shape: the baseline back to back too
                            b2b_base = _back_to_back_ms(fn, q, k, v, causal, mode)
                            queued += f" vs {work / b2b_base / 1e9:.0f} ({b2b_base / b2b_ours:.2f}x)"
                    except RuntimeError as exc:  # a backend that refuses this shape/dtype
                        print(f"  {name} skipped at D={dim} N={n}: {str(exc).splitlines()[0]}")
                        continue
                    rows.append(dict(
                        case=f"{mode}{' causal' if causal else ''} vs {name}",
                        shape=f"B={batch} H={heads} N={n} D={dim} {str(dtype).replace('torch.', '')}",
                        backend=attnkit.last_dispatch("flash_attention").backend, ours_ms=t_ours, baseline_ms=t_base,
                        max_err=errors["forward" if mode == "forward" else "backward"],
                        ours_tflops=work / t_ours / 1e9, baseline_tflops=work / t_base / 1e9,
                        note=queued,
                    ))
            picked = last_tuned_configs()  # after forward and backward ran at this shape: its winners
            for row in rows[first_row:]:
                row["note"] = "; ".join(filter(None, (row["note"], picked)))
            if (dim, n) == FULL[0]:
                rows += _warp_specialized_rows(ours, q, k, v, causal, device)
    return rows


def _warp_specialized_rows(ours, q, k, v, causal, device):
    """The opt-in warp-specialized forward (ATTNKIT_TRITON_WS=1) against the
    default forward at the target shape, where it can run (sm_90, a Triton whose
    tl.range takes warp_specialize): whether it should become the default."""
    from attnkit.triton_kernels import flash_attention_ws
    from attnkit.triton_kernels.flash_attention_launch import _WS_SUPPORTED, _tma_device

    if not (_WS_SUPPORTED and _tma_device(q.device)):
        return []
    taken, real = [], flash_attention_ws.forward
    spy = lambda *args, **kwargs: taken.append(1) or real(*args, **kwargs)  # noqa: E731
    batch, heads, n, dim = q.shape
    shape = f"B={batch} H={heads} N={n} D={dim} {str(q.dtype).replace('torch.', '')}"
    case = f"forward{' causal' if causal else ''}, warp-specialized vs default"
    try:
        with mock.patch.dict(os.environ, ATTNKIT_TRITON_WS="1"), mock.patch.object(flash_attention_ws, "forward", spy):
            error = max_error(ours(q, k, v, causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            if not taken:  # not eligible after all: nothing to compare
                return []
            t_ws = _time(ours, q, k, v, causal, "forward", device)
            b2b_ws = _back_to_back_ms(ours, q, k, v, causal, "forward")
    except Exception as exc:  # opt-in and new: a failure here costs its row, not the family's table
        nan = float("nan")
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return [dict(case=f"{case}: failed", shape=shape, backend="triton", ours_ms=nan, baseline_ms=nan, max_err=nan,
                     note=reason[:200])]
    t_default = _time(ours, q, k, v, causal, "forward", device)
    b2b_default = _back_to_back_ms(ours, q, k, v, causal, "forward")
    work = flops(batch, heads, n, dim, causal, "forward")
    return [dict(case=case, backend="triton", shape=shape, ours_ms=t_ws, baseline_ms=t_default, max_err=error,
                 ours_tflops=work / t_ws / 1e9, baseline_tflops=work / t_default / 1e9,
                 note=f"back to back {work / b2b_ws / 1e9:.0f} vs {work / b2b_default / 1e9:.0f} TFLOP/s")]
