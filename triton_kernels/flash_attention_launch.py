"""Launchers of the flash attention kernels: strides, grids, block sizes.

Tensors arrive validated (attnkit.ops): dense q (B, H, Nq, D), k/v (B, H_kv, Nk, D/Dv),
or packed varlen (total, H, D) with int32 cu_seqlens; the last dim contiguous.
Block sizes come from autotune on a GPU and one small fixed config under the
interpreter (autotuning there would only multiply the run time).
"""
import contextlib
import functools
import inspect
from typing import Optional

import torch
import triton
import triton.language as tl

try:  # host tensor descriptors (triton >= 3.3): the forward's TMA candidates
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None
# tl.range(..., warp_specialize=...), which flash_attention_ws needs, came later than descriptors.
_WS_SUPPORTED = "warp_specialize" in inspect.signature(tl.range).parameters

from ._host import cdiv, next_power_of_2, on_tensors_device
from .._dispatch import getenv
from .._dispatch import interpreter_active as _interpreting  # the one TRITON_INTERPRET check, dispatch's too
from .flash_attention import (
    NO_LIMIT, _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _dropout_keep_mask_kernel, _rotary_rows_inplace,
)
from .flash_attention_forward import _attn_fwd

INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)


def _configs(block_d: int, elem_bytes: int, rotary: bool = False, dkdv: bool = False, tma: bool = False,
             look_ahead: bool = False):
    """Autotune candidates, the first one fitting the shared memory of an A100
    (163 KB) for every kernel (checked by compile_check); larger ones are
    skipped by the autotuner where they do not fit.
    - Fused RoPE has its own lists: its kernels pipeline the partner, cos and
      sin tiles too (at D = 128 its dK/dV kernel needed 361 KB at (128, 64, 8, 2)
      on sm_90). Its dK/dV kernel at D = 128, bf16, sm_90: 140 KB and 28 bytes
      spilled at (32, 128, 8, 2); 152 KB, 276 bytes and no wgmma at (64, 32, 4, 2).
    - The dK/dV kernel (dkdv) has its own list: it works on S^T, so BLOCK_N (its
      key block) is the M of its products, at least 64 per 4 warps for wgmma, and
      its dK and dV accumulators fill the registers. Bytes ptxas spills on
      sm_90, bf16, plain / causal: D = 128 8 / 0 at (32, 128, 8, 2), 160 / 176
      at (64, 128, 8, 2); D = 64 0 / 24 at (64, 128, 8, 2); D = 256 92 at
      (32, 64, 8, 2). On P and dS (not transposed) the same kernel spilled
      228 bytes at (128, 64, 8, 2), its config 0 then, and 12 at (64, 32, 4, 2).
    - float32 (IEEE dot) at D = 80 spills 1056 / 836 / 900 bytes (forward, dK/dV,
      dQ) at (32, 32, 4, 2) and 388 / 0 / 380 with 8 warps, hence 8 first.
    - Two programs per SM: with 8 warps (two warpgroups) a program waits at a
      CTA-wide barrier every step of the software pipeline, which may keep one
      warpgroup's softmax from overlapping the other's products (not yet timed);
      two one-warpgroup programs on an SM wait independently. Forward at D = 128, bf16, sm_90:
      (64, 64, 4, 3) takes 112 KB and 168 registers, (64, 64, 4, 2) 80 KB, so two
      fit (228 KB, 64 K registers); dQ at (64, 64, 4, 2) 96 KB, 178 registers.
      (128, 64, 8, 2), at 96 KB, would fit twice but for its 176 registers.
    - tma (where _tma_descriptors gives descriptors): the plain list, then tiles with
      K and V (forward, dQ) or Q and dO (dK/dV) loaded by the tensor-copy engine (TMA):
      no per-thread address arithmetic, and a bare loop with TMA loads had 493
      sm_90 instructions an iteration against 506 with pointers (not timed).
    - look_ahead (the forward's and dQ's list): candidates after the rest that issue one
      product a key block ahead (LOOK_AHEAD: the forward's q k^T, _fwd_run_pipelined;
      dQ's dO V^T, _dq_blocks), 2-byte types at D <= 128 without RoPE, pointers or TMA
      (see _LOOK_AHEAD_SHAPES).
    - Dropped after timing every candidate on an H200 (benchmarks/attention_configs.py,
      BENCHMARKS.md): (128, 128, 8, 3), forward and dQ, pointers and TMA, needs 262 KB at
      D = 128 (over any GPU's shared memory) and was never the fastest at D = 64;
      (64, 128, 8, 2) was the slowest forward at every shape timed (0.44-0.52x the best)."""
    if elem_bytes > 2:  # fp32/fp64: tiles twice or four times the bytes; an IEEE dot is FMAs in registers
        shapes = [(32, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 1)]
    elif rotary:
        shapes = [(32, 128, 8, 2), (16, 128, 8, 2), (64, 32, 4, 2)] if dkdv else [
            (64, 32, 4, 2), (128, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)]
    elif block_d >= 256:
        shapes = [(32, 64, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)] if dkdv else [
            (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)]
    elif dkdv:
        shapes = [(32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 3)]
    else:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 3), (64, 32, 4, 2), (64, 64, 4, 3),
                  (64, 64, 4, 2)]
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in shapes]
    if tma and elem_bytes == 2 and block_d <= 128 and not rotary:
        shapes, hook = (_TMA_DKDV_SHAPES, _tma_query_block_shapes) if dkdv else (_TMA_SHAPES, _tma_block_shapes)
        configs += [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, USE_TMA=True), num_warps=w, num_stages=st,
                                  pre_hook=hook) for m, n, w, st in shapes]
    if look_ahead and elem_bytes == 2 and block_d <= 128 and not rotary:
        configs += [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, LOOK_AHEAD=True, **({"USE_TMA": True} if on_tma else {})),
                                  num_warps=w, num_stages=st, pre_hook=_tma_block_shapes if on_tma else None)
                    for m, n, w, st, on_tma in _LOOK_AHEAD_SHAPES if tma or not on_tma]
    return configs


# The TMA candidates of the forward and dQ: (BLOCK_M, BLOCK_N, warps, stages), D <= 128.
# (128, 128, 8, 2), last so the others keep their ATTNKIT_TRITON_CONFIG indices, is the
# key block FlashAttention-3 takes at D = 128; not yet timed. Compiled for sm_90 (Triton
# 3.8, bf16, D = 128): forward 165 KB of shared memory, 208 (causal 226) registers, no
# spills, 32 wgmma; dQ 198 KB, 255 registers, 8 bytes spilled.
_TMA_SHAPES = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 128, 8, 2)]


# The dK/dV kernel's TMA candidates, Q and dO tiles (its query blocks) through descriptors:
# its pointer list's config 0 and the H200's two winners at D = 128 (BENCHMARKS.md), not yet
# timed. Compiled for sm_90 (Triton 3.8, bf16, D = 128, plain / causal): (32, 128, 8, 2)
# 99 KB, no spills; (64, 64, 4, 2) 99 KB, 92 / 104 bytes spilled (its pointer version wins
# spilling more); (32, 64, 4, 3) 83 KB, no spills. (64, 128, 8, 2-3) spilled 132-224 bytes.
_TMA_DKDV_SHAPES = [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)]


# The forward's and dQ's candidates with LOOK_AHEAD, (BLOCK_M, BLOCK_N, warps, stages, TMA): the
# H200's forward winners at D = 128 (BENCHMARKS.md) with the look-ahead product. Compiled for sm_90
# (Triton 3.8, bf16, D = 128): see BENCHMARKS.md; not yet timed.
_LOOK_AHEAD_SHAPES = [(128, 64, 8, 3, False), (128, 64, 8, 2, False), (64, 64, 4, 2, False), (128, 64, 8, 3, True),
                      (64, 64, 4, 2, True)]


def _set_tiles(first, second, rows: int, blocks) -> None:
    """A descriptor pair's tiles: `rows` rows of BLOCK_D (first: K or Q) and BLOCK_DV (second: V or dO) columns."""
    first.block_shape = [1, 1, rows, blocks["BLOCK_D"]]
    second.block_shape = [1, 1, rows, blocks["BLOCK_DV"]]


def _tma_query_block_shapes(nargs) -> None:
    """The dK/dV kernel's TMA pre-launch hook: the descriptors' tiles are its query block."""
    _set_tiles(nargs["Q_DESC"], nargs["DO_DESC"], nargs["BLOCK_M"], nargs)


def _tma_block_shapes(nargs) -> None:
    """A TMA config's pre-launch hook: the descriptors' tiles are its key block."""
    _set_tiles(nargs["K_DESC"], nargs["V_DESC"], nargs["BLOCK_N"], nargs)


_tma_forced = False
_look_ahead_forced = False


@contextlib.contextmanager
def look_ahead_forced():
    """Within it the interpreter runs the forward's and dQ's LOOK_AHEAD loops (the GPU
    autotunes them as candidates): for tests, which have no GPU."""
    global _look_ahead_forced
    previous, _look_ahead_forced = _look_ahead_forced, True
    try:
        yield
    finally:
        _look_ahead_forced = previous


@contextlib.contextmanager
def tma_forced():
    """Within it the forward takes the TMA path wherever the inputs allow, on any
    device and under the interpreter: for tests and compile_check, which have no sm_90 GPU."""
    global _tma_forced
    previous, _tma_forced = _tma_forced, True
    try:
        yield
    finally:
        _tma_forced = previous


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)


def _tma_device(device: Optional[torch.device] = None) -> bool:
    """Whether TMA candidates may run on `device` (the current CUDA device if None)."""
    if TensorDescriptor is None:
        return False
    if _tma_forced:
        return True
    if (device is not None and device.type != "cuda") or _interpreting():
        return False
    if device is None and not torch.cuda.is_available():  # a CUDA tensor says it is (0.8 us a call)
        return False
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _capability(index)[0] >= 9


def _tma_descriptors(k: torch.Tensor, v: torch.Tensor, c: dict):
    """(K descriptor, V descriptor) for the forward's and dQ's TMA candidates (or Q's
    and dO's for dK/dV's), or None where they cannot serve: varlen (a descriptor spans
    the packed rows of every sequence), fused RoPE, other than 2-byte types, or strides
    TMA cannot take (each a multiple of 16 bytes, the last dim contiguous)."""
    if c["varlen"] or c["flags"]["ROTARY_DIM"] or k.element_size() != 2 or not _tma_device(k.device):
        return None
    if not (_tma_ready(k) and _tma_ready(v)):
        return None
    flags = c["flags"]
    return (TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, 16, flags["BLOCK_D"]]),
            TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, 16, flags["BLOCK_DV"]]))


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether TMA can take t: the last dim contiguous, the base and every other stride 16-byte aligned."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s > 0 and s * t.element_size() % 16 == 0 for s in t.stride()[:-1])


def ws_eligible(q: torch.Tensor, c: dict, descriptors) -> bool:
    """Whether the warp-specialized forward (flash_attention_ws) serves this call:
    asked for (ATTNKIT_TRITON_WS=1), where the TMA candidates could run, dense
    scores without masks, dropout, ALiBi or soft-cap, no window but the causal
    one, and Dv = D a power of two up to 128."""
    if descriptors is None or not _WS_SUPPORTED or getenv("ATTNKIT_TRITON_WS") != "1":
        return False
    flags, scalars = c["flags"], c["scalars"]
    causal_or_none = scalars["window_left"] == NO_LIMIT and scalars["window_right"] in (0, NO_LIMIT)
    return (flags["RAW_SCORES"] and flags["MASK_KIND"] == 0 and not flags["HAS_PADDING"] and not flags["DROPOUT"]
            and not flags["WIDE_OFFSETS"] and causal_or_none and flags["HEAD_DIM"] == flags["BLOCK_D"] == flags["HEAD_DIM_V"] <= 128
            and _tma_ready(q))


def _described(descriptors, tensors, flags, blocks, queries=False):
    """The K_DESC, V_DESC arguments of a launch (Q_DESC, DO_DESC with `queries`):
    the descriptors, their tiles set when a fixed TMA config launches (no autotuner
    runs its pre_hook then), or the tensors themselves, unused, where there are none."""
    if descriptors is None:
        return tensors
    if blocks.get("USE_TMA"):
        _set_tiles(*descriptors, blocks["BLOCK_M" if queries else "BLOCK_N"], flags)
    return descriptors


# Keyed on a power-of-two length bucket, not the exact lengths: varlen batches
# change max_seqlen every step, and re-tuning each time would cost more than it saves.
# The feature flags that change a kernel's body (and so its registers) are part of the key: a
# config tuned without soft-capping or a mask gradient is not the best one with them. The
# autotuner skips names a kernel does not take (MASK_GRAD is dK/dV's).
_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "LENGTH_BUCKET", "MASK_KIND", "USE_WINDOW", "DROPOUT", "VARLEN", "SOFTCAP",
             "ALIBI", "HAS_PADDING", "ROTARY_DIM", "MASK_GRAD", "WIDE_OFFSETS"]
_tuned = {}


def _fixed_config() -> Optional[int]:
    """ATTNKIT_TRITON_CONFIG=i launches candidate i of _configs untuned. The GPU
    test suite sets it: autotuning each of its feature combinations would
    compile every kernel seven times over (tens of minutes); one test runs
    each candidate in turn instead."""
    value = getenv("ATTNKIT_TRITON_CONFIG")
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"ATTNKIT_TRITON_CONFIG must be a config index (0, 1, ...), got {value!r}")
    return int(value)


def config_count(head_dim: int, dtype: torch.dtype, rotary: bool = False) -> int:
    """How many candidates ATTNKIT_TRITON_CONFIG can pick from at this head dim and
    dtype: the longest of the kernels' lists (a shorter one uses its last entry
    for the indices past its end), the forward's TMA ones included where this
    machine could run them."""
    return _config_count(_block_dim(head_dim), dtype.itemsize, rotary, _tma_device())


def _config_count(block_d: int, elem_bytes: int, rotary: bool, tma: bool = False) -> int:
    return max(len(_configs(block_d, elem_bytes, rotary, dkdv, tma, look_ahead=not dkdv)) for dkdv in (False, True))


def _kernel(kernel, block_d: int, elem_bytes: int, rotary: bool = False, tma: bool = False):
    """The kernel as launched here: autotuned on a GPU, fixed under the
    interpreter or by ATTNKIT_TRITON_CONFIG. tma: the forward with descriptors
    (see _tma_descriptors); the interpreter then takes the TMA path too."""
    look_ahead = kernel is _attn_fwd or kernel is _attn_bwd_dq
    if _interpreting():
        return kernel, dict(INTERPRETER_BLOCKS, **(dict(USE_TMA=True) if tma else {}),
                            **(dict(LOOK_AHEAD=True) if look_ahead and _look_ahead_forced else {}))
    dkdv = kernel is _attn_bwd_dkdv
    fixed = _fixed_config()
    if fixed is not None:
        count = _config_count(block_d, elem_bytes, rotary, _tma_device())  # what config_count reports
        if fixed >= count:
            raise ValueError(f"ATTNKIT_TRITON_CONFIG={fixed}: only {count} configs at this head dim and dtype")
        configs = _configs(block_d, elem_bytes, rotary, dkdv=dkdv, tma=tma, look_ahead=look_ahead)
        config = configs[min(fixed, len(configs) - 1)]
        return kernel, dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    key = (kernel, block_d >= 256, elem_bytes > 2, rotary, tma)
    tuner = _tuned.get(key)
    if tuner is None:  # the candidates are built once per key: building them took 5 us of every launch
        configs = _configs(block_d, elem_bytes, rotary, dkdv=dkdv, tma=tma, look_ahead=look_ahead)
        tuner = _tuned[key] = triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)
    return tuner, {}


def last_tuned_configs() -> str:
    """The config each autotuned kernel launched with last, e.g. "fwd 128x64 w8 s2"
    ("... TMA" for a tensor-descriptor candidate, "... ahead" for LOOK_AHEAD):
    the benchmark notes them beside its timings, so a GPU run shows which
    candidates win."""
    names = {_attn_fwd: "fwd", _attn_bwd_dkdv: "dkdv", _attn_bwd_dq: "dq"}
    picked = []
    for (kernel, *_), tuner in _tuned.items():
        config = getattr(tuner, "best_config", None)
        if config is not None:
            blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
            loads = " TMA" if config.kwargs.get("USE_TMA") else ""
            loads += " ahead" if config.kwargs.get("LOOK_AHEAD") else ""
            picked.append(f"{names.get(kernel, kernel)} {blocks} w{config.num_warps} s{config.num_stages}{loads}")
    return "; ".join(picked)


def _run(kernel, grid, args, kwargs, launch):
    """Launches, or hands the launch to `launch(kernel, grid, args, kwargs)`
    (compile_check uses that to compile every kernel ahead of time)."""
    if launch is None:
        with on_tensors_device(args):
            kernel[grid](*args, **kwargs)
    else:
        launch(kernel, grid, args, kwargs)


def _block_dim(d: int) -> int:
    return max(16, next_power_of_2(d))


_INT32_OFFSETS = 2**31 - 1


def _wide_offsets(*tensors) -> bool:
    """Whether an element of one of `tensors` (None skipped) lies 2^31 or more elements past its
    start: the kernels then compute their offsets in int64 (WIDE_OFFSETS), else in int32.
    Every element lies in the tensor's storage, so a storage of fewer elements settles it in one
    call; the sum over shape and strides (~1 us a tensor, a dozen tensors a training step) is
    left for the large ones."""
    for t in tensors:
        if t is None or t.untyped_storage().nbytes() <= _INT32_OFFSETS * t.element_size():
            continue
        if t.numel() and sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= _INT32_OFFSETS:
            return True
    return False


class _Layout:
    """Strides (batch, head, row) of a dense (B, H, N, D) or packed (total, H, D) tensor."""

    @staticmethod
    def of(t: torch.Tensor, varlen: bool):
        strides = t.stride()  # one call: each stride(i) is a call into torch (~0.3 us; ~20 a launch)
        return (0, strides[1], strides[0]) if varlen else strides[:3]


def _stat_strides(stat: torch.Tensor, varlen: bool):
    # Dense statistics are (B, H, Nq); varlen ones (H, total_q).
    strides = stat.stride()
    return (0, *strides) if varlen else strides


def _common(q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, bottom_right, window, softcap, scale, dropout_p, seed,
            alibi_slopes, rotary):
    varlen = cu_q is not None
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    heads = q.shape[1] if varlen else q.shape[1]
    heads_kv = k.shape[1]
    window_left, window_right = window
    use_window = window_left >= 0 or window_right >= 0
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.uint8 else 2)
    if q.dtype == torch.float64:
        # Triton before 3.8 gives an fp64 dot operand the layout of the narrowest load it depends on
        # (kWidth 4 from a byte mask), which its fp64 MMA cannot take: the compile aborts. 32-bit
        # masks keep that layout at 1. float64 is for gradcheck; the copies cost nothing there.
        mask = mask.to(torch.int32) if mask_kind == 1 else mask
        pad = pad.to(torch.int32) if pad is not None else None
    dummy = q
    scalars = dict(
        scale=scale, softcap=softcap,
        window_left=NO_LIMIT if window_left < 0 else window_left,
        window_right=NO_LIMIT if window_right < 0 else window_right,
        seed=seed, drop_threshold=int(round(dropout_p * (1 << 24))),
        drop_scale=1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
    )
    flags = dict(
        HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], BLOCK_D=_block_dim(q.shape[-1]), BLOCK_DV=_block_dim(v.shape[-1]),
        ACC_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        VARLEN=varlen, BOTTOM_RIGHT=bottom_right, USE_WINDOW=use_window, SOFTCAP=softcap > 0,
        MASK_KIND=mask_kind, HAS_PADDING=pad is not None, DROPOUT=dropout_p > 0, ALIBI=alibi_slopes is not None,
        RAW_SCORES=softcap <= 0 and alibi_slopes is None and mask_kind != 2 and scale > 0,
        ROTARY_DIM=2 * rotary[0].shape[1] if rotary else 0, INTERLEAVED=bool(rotary and rotary[3]),
        LENGTH_BUCKET=min(max(next_power_of_2(max(max_q, max_k, 1)), 128), 16384),
        WIDE_OFFSETS=_wide_offsets(q, k, v, mask, pad),
    )
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    pad_stride = pad.stride(0) if pad is not None else 0
    slopes_stride = alibi_slopes.stride(0) if alibi_slopes is not None else 0
    cu_q = cu_q if varlen else dummy
    cu_k = cu_k if varlen else dummy
    return dict(
        varlen=varlen, batch=batch, heads=heads, heads_kv=heads_kv, group=heads // heads_kv, scalars=scalars,
        flags=flags, mask=mask if mask is not None else dummy, pad=pad if pad is not None else dummy,
        slopes=alibi_slopes if alibi_slopes is not None else dummy,
        rotary=(rotary[0], rotary[1], rotary[2]) if rotary else (dummy, dummy, dummy),
        rot_stride=rotary[0].stride(0) if rotary else 0,
        mask_strides=mask_strides, pad_stride=pad_stride, slopes_stride=slopes_stride, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
    )


def forward(q, k, v, *, cu_q: Optional[torch.Tensor], cu_k: Optional[torch.Tensor], max_q: int, max_k: int,
            mask, pad, bottom_right: bool, window, softcap: float, scale: float, dropout_p: float, seed: int,
            alibi_slopes=None, rotary=None, launch=None):
    """Returns (out, lse); lse is fp32 (fp64 for fp64 inputs), (B, H, Nq) or varlen (H, total_q).
    rotary: None or (cos, sin, offsets (B,) int32, interleaved)."""
    c = _common(q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, bottom_right, window, softcap, scale, dropout_p, seed,
                alibi_slopes, rotary)
    varlen = c["varlen"]
    out_shape = q.shape[:-1] + (v.shape[-1],)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    stat_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty((q.shape[1], q.shape[0]) if varlen else q.shape[:-1], dtype=stat_dtype, device=q.device)
    c["flags"]["WIDE_OFFSETS"] |= _wide_offsets(out, lse)
    descriptors = _tma_descriptors(k, v, c)
    if ws_eligible(q, c, descriptors):
        from . import flash_attention_ws

        causal = c["scalars"]["window_right"] == 0
        flash_attention_ws.forward(q, k, v, out, lse, c, descriptors, causal, bottom_right, scale, launch)
        return out, lse
    kernel, blocks = _kernel(_attn_fwd, c["flags"]["BLOCK_D"], q.element_size(), c["flags"]["ROTARY_DIM"] > 0,
                             tma=descriptors is not None)
    descriptors = _described(descriptors, (k, v), c["flags"], blocks)
    grid = lambda meta: (cdiv(max_q, meta["BLOCK_M"]), c["heads"], c["batch"])  # noqa: E731
    args = (
        q, k, v, out, lse, c["mask"], c["pad"], c["slopes"], *c["rotary"], c["cu_q"], c["cu_k"], *descriptors,
        *_Layout.of(q, varlen), *_Layout.of(k, varlen), *_Layout.of(v, varlen), *_Layout.of(out, varlen),
        *_stat_strides(lse, varlen), *c["mask_strides"], c["pad_stride"], c["slopes_stride"], c["rot_stride"],
        c["heads"], c["group"], max_q, max_k, *c["scalars"].values(),
    )
    _run(kernel, grid, args, dict(**c["flags"], **blocks), launch)
    return out, lse


def backward(do, q, k, v, out, lse, *, cu_q, cu_k, max_q: int, max_k: int, mask, pad, bottom_right: bool, window,
             softcap: float, scale: float, dropout_p: float, seed: int, alibi_slopes=None, rotary=None,
             mask_grad: bool = False, launch=None):
    """Returns (dq, dk, dv, d_mask); deterministic (no atomics). d_mask: None, or with
    mask_grad (an additive mask, dense call) its gradient (B, H, Nq, Nk) in lse's dtype."""
    c = _common(q, k, v, cu_q, cu_k, max_q, max_k, mask, pad, bottom_right, window, softcap, scale, dropout_p, seed,
                alibi_slopes, rotary)
    varlen, flags = c["varlen"], c["flags"]
    flags["WIDE_OFFSETS"] |= _wide_offsets(do, out, lse)
    delta = torch.empty_like(lse)
    delta_blocks = 16 if _interpreting() else 64
    _run(
        _attn_bwd_delta, (cdiv(max_q, delta_blocks), c["heads"], c["batch"]),
        (out, do, delta, c["cu_q"], c["cu_k"], *_Layout.of(out, varlen), *_Layout.of(do, varlen),
         *_stat_strides(lse, varlen), c["heads"], max_q, max_k),
        dict(HEAD_DIM_V=flags["HEAD_DIM_V"], BLOCK_DV=flags["BLOCK_DV"], BLOCK_M=delta_blocks,
             ACC_DTYPE=flags["ACC_DTYPE"], VARLEN=varlen, WIDE_OFFSETS=flags["WIDE_OFFSETS"]),
        launch,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if mask_grad and (varlen or flags["MASK_KIND"] != 2):
        raise ValueError("flash attention backward: mask_grad needs an additive (float) mask on a dense call")
    d_mask = torch.zeros((c["batch"], c["heads"], max_q, max_k), dtype=lse.dtype, device=q.device) if mask_grad else None
    shared = (*c["mask_strides"], c["pad_stride"], c["slopes_stride"], c["rot_stride"])
    descriptors = _tma_descriptors(q, do, c)
    kernel, blocks = _kernel(_attn_bwd_dkdv, flags["BLOCK_D"], q.element_size(), flags["ROTARY_DIM"] > 0,
                             tma=descriptors is not None)
    descriptors = _described(descriptors, (q, do), flags, blocks, queries=True)
    grid = lambda meta: (cdiv(max_k, meta["BLOCK_N"]), c["heads_kv"], c["batch"])  # noqa: E731
    args = (
        q, k, v, do, lse, delta, dk, dv, d_mask if mask_grad else q, c["mask"], c["pad"], c["slopes"], *c["rotary"],
        c["cu_q"], c["cu_k"], *descriptors,
        *_Layout.of(q, varlen), *_Layout.of(k, varlen), *_Layout.of(v, varlen), *_Layout.of(do, varlen),
        *_stat_strides(lse, varlen), *_Layout.of(dk, varlen), *_Layout.of(dv, varlen), *shared,
        c["heads_kv"], c["group"], max_q, max_k, *c["scalars"].values(),
    )
    _run(kernel, grid, args, dict(**flags, **blocks, MASK_GRAD=mask_grad), launch)
    descriptors = _tma_descriptors(k, v, c)
    kernel, blocks = _kernel(_attn_bwd_dq, flags["BLOCK_D"], q.element_size(), flags["ROTARY_DIM"] > 0,
                             tma=descriptors is not None)
    descriptors = _described(descriptors, (k, v), flags, blocks)
    grid = lambda meta: (cdiv(max_q, meta["BLOCK_M"]), c["heads"], c["batch"])  # noqa: E731
    args = (
        q, k, v, do, lse, delta, dq, c["mask"], c["pad"], c["slopes"], *c["rotary"], c["cu_q"], c["cu_k"], *descriptors,
        *_Layout.of(q, varlen), *_Layout.of(k, varlen), *_Layout.of(v, varlen), *_Layout.of(do, varlen),
        *_stat_strides(lse, varlen), *_Layout.of(dq, varlen), *shared,
        c["heads"], c["group"], max_q, max_k, *c["scalars"].values(),
    )
    _run(kernel, grid, args, dict(**flags, **blocks), launch)
    if flags["ROTARY_DIM"]:  # the kernels produced gradients of the rotated q and k
        for grad, heads, queries in ((dq, c["heads"], True), (dk, c["heads_kv"], False)):
            rows = 16 if _interpreting() else 64
            _run(
                _rotary_rows_inplace, (cdiv(max_q if queries else max_k, rows), heads, c["batch"]),
                (grad, *c["rotary"], c["cu_q"], c["cu_k"], *_Layout.of(grad, varlen), c["rot_stride"], heads, max_q, max_k),
                dict(HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], BLOCK_M=rows, ROTARY_DIM=flags["ROTARY_DIM"],
                     INTERLEAVED=flags["INTERLEAVED"], ACC_DTYPE=flags["ACC_DTYPE"], VARLEN=varlen,
                     BOTTOM_RIGHT=flags["BOTTOM_RIGHT"], QUERIES=queries, WIDE_OFFSETS=flags["WIDE_OFFSETS"]),
                launch,
            )
    return dq, dk, dv, d_mask


def dropout_keep_mask(batch: int, heads: int, max_q: int, max_k: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep mask (B, H, max_q, max_k) the kernels use for this seed (bool)."""
    out = torch.empty((batch, heads, max_q, max_k), dtype=torch.uint8, device=device)
    grid = (cdiv(max_q, 16), cdiv(max_k, 16), batch * heads)
    _dropout_keep_mask_kernel[grid](out, heads, max_q, max_k, seed, int(round(dropout_p * (1 << 24))), BLOCK_M=16, BLOCK_N=16)
    return out.bool()
