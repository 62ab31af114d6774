"""Each autotune candidate of the flash attention kernels, timed at one shape.

The autotuner keeps one winner per kernel and says nothing of the rest; this
shows how far apart the candidates are (which ones to keep, which to drop),
the forward's and the backward's kernels launched at candidate i together
(ATTNKIT_TRITON_CONFIG=i; the dK/dV list is shorter and repeats its last entry).
Needs a CUDA GPU.

    python benchmarks/attention_configs.py [--shape B H N D] [--dtype bfloat16] [--causal both] [--ws]

--ws times the opt-in warp-specialized forward's candidates instead (ATTNKIT_TRITON_WS=1,
triton_kernels/flash_attention_ws.py; sm_90), the backward at the general kernels' candidate i.
"""
from __future__ import annotations

import argparse
import os

import torch
import triton
from attention import flops
from triton.runtime.errors import OutOfResources

import attnkit
from attnkit.triton_kernels import flash_attention_launch as launch
from attnkit.triton_kernels.flash_attention import _attn_bwd_dkdv, _attn_bwd_dq
from attnkit.triton_kernels.flash_attention_forward import _attn_fwd
from attnkit.triton_kernels.flash_attention_ws import WS_SHAPES


def describe(index: int, head_dim: int, dtype: torch.dtype, ws: bool = False) -> str:
    names = []
    if ws:
        m, n, w, st = WS_SHAPES[min(index, len(WS_SHAPES) - 1)]
        names.append(f"fwd WS {m}x{n} w{w} s{st}")
    for name, kernel in (("fwd", _attn_fwd), ("dq", _attn_bwd_dq), ("dkdv", _attn_bwd_dkdv))[1 if ws else 0:]:
        configs = launch._configs(launch._block_dim(head_dim), dtype.itemsize, dkdv=kernel is _attn_bwd_dkdv,
                                  tma=launch._tma_device())
        config = configs[min(index, len(configs) - 1)]
        tma = " TMA" if config.kwargs.get("USE_TMA") else ""
        names.append(f"{name} {config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} "
                     f"w{config.num_warps} s{config.num_stages}{tma}")
    return ", ".join(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 16, 4096, 128], metavar=("B", "H", "N", "D"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--causal", default="both", choices=["no", "yes", "both"])
    parser.add_argument("--ws", action="store_true", help="the warp-specialized forward's candidates")
    args = parser.parse_args()
    if args.ws:
        os.environ["ATTNKIT_TRITON_WS"] = "1"
    if not torch.cuda.is_available():
        raise SystemExit("attention_configs: needs a CUDA GPU")
    batch, heads, n, dim = args.shape
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(batch, heads, n, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    print(f"B={batch} H={heads} N={n} D={dim} {args.dtype} on {torch.cuda.get_device_name()}; "
          f"median ms (triton.testing.do_bench), TFLOP/s counting causal work as half")
    count = len(WS_SHAPES) if args.ws else launch.config_count(dim, dtype)
    for causal in {"no": [False], "yes": [True], "both": [False, True]}[args.causal]:
        print(f"\n| causal={causal} | configs | forward ms | TFLOP/s | backward ms | TFLOP/s |\n|---|---|---:|---:|---:|---:|")
        for index in range(count):
            os.environ["ATTNKIT_TRITON_CONFIG"] = str(index)
            try:
                with torch.no_grad():
                    forward = triton.testing.do_bench(lambda: attnkit.ops.flash_attention(q, k, v, causal=causal),
                                                      return_mode="median")
                out = attnkit.ops.flash_attention(q, k, v, causal=causal)
                grad = torch.randn_like(out)
                backward = triton.testing.do_bench(
                    lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), return_mode="median")
            except OutOfResources as exc:
                print(f"| {index} | {describe(index, dim, dtype, args.ws)} | does not fit: {str(exc).splitlines()[0]} | | | |")
                continue
            work = flops(batch, heads, n, dim, causal, "forward")
            print(f"| {index} | {describe(index, dim, dtype, args.ws)} | {forward:.3f} | {work / forward / 1e9:.0f} | "
                  f"{backward:.3f} | {2.5 * work / backward / 1e9:.0f} |", flush=True)
    os.environ.pop("ATTNKIT_TRITON_CONFIG", None)


if __name__ == "__main__":
    main()
