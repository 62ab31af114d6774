"""Compiles every flash-attention kernel ahead of time for a CUDA target, with no
GPU: `python -m attnkit.triton_kernels.compile_check [--arch 90] [--all-configs]`.

The interpreter runs the kernels' arithmetic on the CPU but not Triton's GPU
compiler, which rejects things the interpreter accepts (non-constexpr globals,
unsupported dot shapes or dtypes, shared memory over the limit). This runs the
real launchers on meta tensors, intercepts each launch and compiles it to a
cubin instead, specialized on its arguments as Triton's launcher does (the
alignment hints decide whether loops are software-pipelined, and so how much
shared memory a kernel needs). Config 0 of each kernel must fit: the GPU test
suite launches it untuned. Must run without TRITON_INTERPRET=1.
"""
import argparse
import contextlib
import inspect
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .._dispatch import interpreter_active
from . import flash_attention_launch as launch
from . import additive_attention, decode, rotary

_POINTER_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}

# (name, dtype, head dim, varlen, options)
COMBOS = [
    ("bf16-d128-every-feature", torch.bfloat16, 128, False,
     dict(window=(64, 0), softcap=30.0, mask="bool", pad=True, dropout_p=0.1, alibi=True)),
    ("fp16-d64-varlen-causal-dropout", torch.float16, 64, True, dict(window=(-1, 0), dropout_p=0.1)),
    ("fp32-d80-float-mask-grad", torch.float32, 80, False, dict(mask="float", mask_grad=True)),
    ("bf16-d256-causal", torch.bfloat16, 256, False, dict(window=(-1, 0))),
    ("fp64-d32-plain", torch.float64, 32, False, dict()),
    # Byte masks in float64: Triton 3.6 aborted on them (on the H200; see _common), 3.8 does not.
    ("fp64-d2-window-padding-bool-mask", torch.float64, 2, False, dict(window=(1, 1), pad=True, mask="bool")),
    ("bf16-d128-fused-rope-causal", torch.bfloat16, 128, False, dict(window=(-1, 0), rotary=(128, False))),
    ("fp16-d80-varlen-fused-rope-interleaved", torch.float16, 80, True, dict(rotary=(64, True), alibi=True)),
    # The TMA candidates of the forward and dQ (tensor descriptors), as on an sm_90 GPU.
    ("bf16-d128-tma-causal", torch.bfloat16, 128, False, dict(window=(-1, 0), tma=True)),
    ("fp16-d80-tma-padding", torch.float16, 80, False, dict(pad=True, tma=True)),
    # The opt-in warp-specialized forward (ATTNKIT_TRITON_WS=1), sm_90 only like the TMA candidates.
    ("bf16-d128-ws-causal", torch.bfloat16, 128, False, dict(window=(-1, 0), tma=True, ws=True)),
    ("fp16-d64-ws", torch.float16, 64, False, dict(tma=True, ws=True)),
    # The forward's and dQ's LOOK_AHEAD candidates (a product issued a block ahead), pointer and TMA loads.
    ("bf16-d128-look-ahead-causal", torch.bfloat16, 128, False, dict(window=(-1, 0), look_ahead=True)),
    ("fp16-d64-look-ahead-tma-padding-dropout", torch.float16, 64, False,
     dict(pad=True, dropout_p=0.1, tma=True, look_ahead=True)),
    # Offsets past 2^31 elements (a per-sample mask's batches, a packed batch's rows): int64 offsets.
    ("bf16-d128-wide-offsets-bool-mask-causal", torch.bfloat16, 128, False, dict(window=(-1, 0), mask="bool", wide=True)),
    ("fp16-d64-varlen-wide-offsets-dropout", torch.float16, 64, True, dict(dropout_p=0.1, wide=True)),
]


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(1 << 31) <= value < (1 << 31) else "i64"
    return "fp32"


# Shared memory one block may use: sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Compiler:
    """Compiles each intercepted launch. By default it walks an autotuned
    kernel's configs in order and keeps the first that fits the target's shared
    memory (the autotuner skips the ones that do not); `all_configs` compiles every one."""

    def __init__(self, arch: int, all_configs: bool):
        self.target = GPUTarget("cuda", arch, 32)
        self.limit = SHARED_LIMIT.get(arch, 1 << 30)
        self.all_configs = all_configs
        self.compiled = []
        self.warned = False

    def _specialized(self, kernel, args, keyword_values):
        """The source a real launch compiles: Triton's own binder marks the
        pointers and ints divisible by 16 (and makes ints equal to 1 constants).
        Without those hints no load is 16-byte aligned, the software pipeliner
        leaves every loop single-buffered, and the shared memory reported here
        was under what a GPU launch uses. None where this Triton's binder API
        differs (then the plain signature)."""
        try:
            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            backend = make_backend(self.target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, _ = binder(*args, **keyword_values)
            # What JITFunction.run makes of the specialization (triton 3.3-3.8), for flat arguments:
            # (type, value) for a constexpr, (type, hint string or None) for the rest.
            values = list(bound.values())
            signature = {param.name: kind for param, (kind, _) in zip(kernel.params, specialization)}
            constexprs = {(i,): values[i] for i, (kind, _) in enumerate(specialization) if kind == "constexpr"}
            attrs = {(i,): backend.parse_attr(hint) for i, (kind, hint) in enumerate(specialization)
                     if kind != "constexpr" and isinstance(hint, str)}
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            if not self.warned:
                print(f"compile_check: no launch specialization with this Triton ({error!r}); compiling without "
                      "alignment hints, so shared memory is under-reported", file=sys.stderr)
                self.warned = True
            return None
        return ASTSource(kernel, signature, constexprs, attrs)

    def __call__(self, kernel, grid, args, kwargs):
        configs = [None]
        if isinstance(kernel, triton.runtime.Autotuner):
            configs = kernel.configs
            kernel = kernel.fn
        kwargs = dict(kwargs)
        # Launch options given with the call (an ATTNKIT_TRITON_CONFIG launch) are options, not arguments.
        launch_options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages") if name in kwargs}
        names = list(inspect.signature(kernel.fn).parameters)
        for index, config in enumerate(configs):
            keyword_values = dict(kwargs, **(config.kwargs if config else {}))
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config else launch_options
            if config is not None and config.pre_hook is not None:  # as the autotuner does (TMA tile shapes)
                config.pre_hook(dict(zip(names, args), **keyword_values))
            source = self._specialized(kernel, args, keyword_values)
            source = source or _unspecialized(kernel, args, keyword_values)
            compiled = triton.compile(source, target=self.target, options=options)
            if kernel.fn.__name__ == "_attn_fwd_ws" and "ttg.warp_specialize" not in compiled.asm["ttgir"]:
                # Triton leaves a loop it cannot specialize as it is, silently: say so (the test looks).
                print(f"  _attn_fwd_ws config {index}: NOT WARP-SPECIALIZED")
            shared = compiled.metadata.shared
            fits = shared <= self.limit
            if self.all_configs or fits or config is configs[-1]:
                self.compiled.append((kernel.fn.__name__, index, keyword_values.get("BLOCK_M"),
                                      keyword_values.get("BLOCK_N"), shared, bool(keyword_values.get("USE_TMA"))))
            if fits and not self.all_configs:
                return


def _unspecialized(kernel, args, keyword_values):
    """The source from the bare signature: what compile_check did before, and its fallback."""
    names = list(inspect.signature(kernel.fn).parameters)
    is_constexpr = {param.name: param.is_constexpr for param in kernel.params}
    constexprs = {n: value for n, value in keyword_values.items() if is_constexpr[n]}
    values = dict(zip(names, args), **keyword_values)
    signature = {n: "constexpr" if n in constexprs else _type_of(values[n]) for n in names}
    return ASTSource(kernel, signature, constexprs)


def _inputs(dtype, dim, varlen, options):
    meta = dict(device="meta", dtype=dtype)
    batch, heads, heads_kv, n = 2, 4, 2, 512
    if varlen:
        q, k, v = (torch.empty(batch * n, h, dim, **meta) for h in (heads, heads_kv, heads_kv))
        cu = torch.empty(batch + 1, device="meta", dtype=torch.int32)
    else:
        q, k, v = (torch.empty(batch, h, n, dim, **meta) for h in (heads, heads_kv, heads_kv))
        cu = None
    if varlen and options.get("wide"):  # rows 2^22 elements apart: the last starts past 2^31
        q = torch.empty_strided(q.shape, (1 << 22, dim, 1), **meta)
    mask = None
    if options.get("mask") == "bool" and options.get("wide"):  # batches 2^31 elements apart
        mask = torch.empty_strided((batch, 1, n, n), (1 << 31, n * n, n, 1), device="meta", dtype=torch.uint8)
        mask = mask.expand(batch, heads, n, n)
    elif options.get("mask") == "bool":
        mask = torch.empty(n, n, device="meta", dtype=torch.uint8).expand(batch, heads, n, n)
    elif options.get("mask") == "float":
        mask = torch.empty(batch, 1, n, n, device="meta", dtype=dtype).expand(batch, heads, n, n)
    pad = torch.empty(batch, n, device="meta", dtype=torch.uint8) if options.get("pad") else None
    slopes = torch.empty(batch, heads, device="meta", dtype=torch.float32) if options.get("alibi") else None
    rotary = None
    if options.get("rotary"):
        rotary_dim, interleaved = options["rotary"]
        table = torch.empty(4 * n, rotary_dim // 2, device="meta", dtype=torch.float32)
        rotary = (table, table, torch.empty(batch, device="meta", dtype=torch.int32), interleaved)
    kwargs = dict(rotary=rotary, cu_q=cu, cu_k=cu, max_q=n, max_k=n, mask=mask, pad=pad, bottom_right=True,
                  window=options.get("window", (-1, -1)), softcap=options.get("softcap", 0.0), scale=dim**-0.5,
                  dropout_p=options.get("dropout_p", 0.0), seed=1 << 20, alibi_slopes=slopes)
    return q, k, v, kwargs


@contextlib.contextmanager
def _environment(name, value):
    """os.environ[name] = value inside the block (None: unchanged), restored after."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _candidates(dtype, dim, all_configs, options):
    """tma: the forward and dQ with tensor descriptors, as on an sm_90 GPU; without
    all_configs, launched at their first TMA candidate (config 0 is a pointer one;
    dK/dV, with no TMA candidates, at its last config). ws: the forward through
    flash_attention_ws, as ATTNKIT_TRITON_WS=1 there (its candidates walked as autotuned).
    look_ahead: the forward and dQ at their first LOOK_AHEAD candidate (with TMA loads
    under tma; dK/dV at its last config)."""
    tma, look_ahead = bool(options.get("tma")), bool(options.get("look_ahead"))
    if not (tma or look_ahead):
        yield
        return
    block = launch._block_dim(dim)
    first = len(launch._configs(block, dtype.itemsize))  # the first TMA candidate
    if look_ahead:
        forward = launch._configs(block, dtype.itemsize, tma=tma, look_ahead=True)
        first = next(i for i, c in enumerate(forward)
                     if c.kwargs.get("LOOK_AHEAD") and bool(c.kwargs.get("USE_TMA")) == tma)
    fixed = None if all_configs or options.get("ws") else str(first)
    with _environment("ATTNKIT_TRITON_CONFIG", fixed), \
            _environment("ATTNKIT_TRITON_WS", "1" if options.get("ws") else "0"), \
            (launch.tma_forced() if tma else contextlib.nullcontext()):
        yield


def check(arch: int = 90, all_configs: bool = False, verbose: bool = True) -> list:
    if interpreter_active():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the interpreter replaces the compiler")
    compiler = Compiler(arch, all_configs)
    for name, dtype, dim, varlen, options in COMBOS:
        if options.get("tma") and arch < 90:
            continue  # the tensor-copy engine is sm_90's; the launcher offers TMA candidates there only
        start = time.time()
        q, k, v, kwargs = _inputs(dtype, dim, varlen, options)
        with _candidates(dtype, dim, all_configs, options):
            out, lse = launch.forward(q, k, v, **kwargs, launch=compiler)
            launch.backward(torch.empty_like(out), q, k, v, out, lse, **kwargs,
                            mask_grad=options.get("mask_grad", False), launch=compiler)
        if verbose:
            print(f"sm_{arch} {name}: ok in {time.time() - start:.1f} s")
    check_rotary(compiler, verbose)
    check_decode(compiler, verbose)
    check_additive(compiler, verbose)
    return compiler.compiled


# (name, x dtype, cos/sin dtype, head dim, rotary dim, interleaved, per-sequence offsets, in place, varlen)
ROTARY_COMBOS = [
    ("bf16-d128-halves", torch.bfloat16, torch.bfloat16, 128, 128, False, False, False, False),
    ("fp16-d80-r64-interleaved-offsets", torch.float16, torch.float32, 80, 64, True, True, False, False),
    ("fp32-d64-r32-inplace-varlen", torch.float32, torch.float32, 64, 32, False, True, True, True),
    ("fp64-d256-interleaved", torch.float64, torch.float64, 256, 256, True, False, False, False),
]


def check_rotary(compiler: "Compiler", verbose: bool = True) -> None:
    """The rotary kernel (forward and conjugate/backward) for each combo; printed as
    'compiled', not 'ok', so the attention combos keep their own count."""
    for name, dtype, table_dtype, dim, rotary_dim, interleaved, per_sequence, inplace, varlen in ROTARY_COMBOS:
        start = time.time()
        x = torch.empty(*((1024,) if varlen else (2, 512)), 8, dim, device="meta", dtype=dtype)
        cu = torch.empty(3, device="meta", dtype=torch.int32) if varlen else None
        cos, sin = (torch.empty(1024, rotary_dim // 2, device="meta", dtype=table_dtype) for _ in range(2))
        offsets = torch.empty(2, device="meta", dtype=torch.int32) if per_sequence else None
        for conjugate in (False, True):
            out = x if inplace else torch.empty_like(x)
            rotary.rotary(x, cos, sin, offsets, 0, interleaved, conjugate, out, cu, 512, launch=compiler)
        if verbose:
            print(f"sm_{compiler.target.arch} rotary {name}: compiled in {time.time() - start:.1f} s")


# (name, dtype, heads, kv heads, new tokens, head dim, options)
DECODE_COMBOS = [
    ("bf16-gqa8-d128", torch.bfloat16, 32, 4, 1, 128, dict()),
    ("fp16-mqa-d64-3tokens-window-alibi-softcap", torch.float16, 16, 1, 3, 64, dict(window_left=256, alibi=True, softcap=30.0)),
    ("fp32-d80", torch.float32, 8, 8, 1, 80, dict()),
]


def check_decode(compiler: "Compiler", verbose: bool = True) -> None:
    """The split-K decoding kernels; printed as 'compiled', like the rotary ones."""
    for name, dtype, heads, heads_kv, n_q, dim, options in DECODE_COMBOS:
        start = time.time()
        q = torch.empty(4, heads, n_q, dim, device="meta", dtype=dtype)
        cache = torch.empty(4, heads_kv, 8192, dim, device="meta", dtype=dtype)
        slopes = torch.empty(4, heads, device="meta", dtype=torch.float32) if options.get("alibi") else None
        decode.decode(q, cache, cache, torch.empty(4, device="meta", dtype=torch.int32), scale=dim**-0.5,
                      softcap=options.get("softcap", 0.0), window_left=options.get("window_left", -1),
                      alibi_slopes=slopes, splits=16, launch=compiler)
        if verbose:
            print(f"sm_{compiler.target.arch} decode {name}: compiled in {time.time() - start:.1f} s")


# (name, dtype, hidden size A, value dim, mask, weights asked for)
ADDITIVE_COMBOS = [
    ("bf16-a256-dv256-mask-weights", torch.bfloat16, 256, 256, True, True),
    ("fp32-a80-dv48", torch.float32, 80, 48, False, False),
    ("fp16-a96-dv128-mask", torch.float16, 96, 128, True, False),
]


def check_additive(compiler: "Compiler", verbose: bool = True) -> None:
    """The additive-attention forward and backward kernels; printed as 'compiled'."""
    for name, dtype, hidden, d_v, masked, weights in ADDITIVE_COMBOS:
        start = time.time()
        qp = torch.empty(4, 300, hidden, device="meta", dtype=dtype)
        kp = torch.empty(4, 200, hidden, device="meta", dtype=dtype)
        values = torch.empty(4, 200, d_v, device="meta", dtype=dtype)
        v_a = torch.empty(hidden, device="meta", dtype=dtype)
        mask = torch.empty(4, 200, device="meta", dtype=torch.bool) if masked else None
        out, lse, w = additive_attention.forward(qp, kp, values, v_a, mask, weights, launch=compiler)
        additive_attention.backward(torch.empty_like(out), w, torch.empty_like(lse), qp, kp, values, v_a, mask, lse,
                                    launch=compiler)
        if verbose:
            print(f"sm_{compiler.target.arch} additive attention {name}: compiled in {time.time() - start:.1f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    args = parser.parse_args(argv)
    limit = SHARED_LIMIT.get(args.arch)
    over = 0
    for kernel, index, block_m, block_n, shared, tma in check(args.arch, args.all_configs):
        fits = limit is None or shared <= limit
        # Config 0 must fit everywhere: the GPU test suite launches it untuned (ATTNKIT_TRITON_CONFIG=0).
        note = "" if fits else "  OVER THE LIMIT"
        if fits and index > 0 and not args.all_configs:
            fits, note = False, "  (config 0 OVER THE LIMIT)"
        over += not fits
        loads = " USE_TMA" if tma else ""
        print(f"  {kernel:18s} config {index} BLOCK_M={block_m} BLOCK_N={block_n}{loads} shared={shared} B{note}")
    return 1 if over and not args.all_configs else 0


if __name__ == "__main__":
    sys.exit(main())
