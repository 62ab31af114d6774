"""An opt-in forward for Hopper with Triton's automatic warp specialization
(ATTNKIT_TRITON_WS=1; flash_attention_launch.ws_eligible says which calls).

Triton splits an attention loop into producer and consumer warps only in a plain
form (checked by compiling for sm_90 under Triton 3.6 and 3.8, BENCHMARKS.md):
Q, K and V through tensor descriptors, one warpgroup per program (BLOCK_M = 64,
4 warps), a single key loop, no early return and no branch inside the loop. The
general forward (_attn_fwd) fails the pass, and so does splitting this loop into
an unmasked run and a masked tail: here every block is masked (key < Nk, and the
causal diagonal), which costs some ALU work a score that the producer warps may
win back. So this kernel serves the common case alone: dense inputs, no masks,
dropout, ALiBi, soft-cap or RoPE, causal or not (either alignment), GQA,
Dv = D a power of two. Timed on an H200 (Triton 3.6, 2026-11-27, BENCHMARKS.md) at
B=4 H=16 N=4096 D=128 bf16: 0.62x the default forward's speed, 0.81x causal; it
stays opt-in.
"""
import triton
import triton.language as tl

from ._host import cdiv
from .flash_attention import LOG2E, _dot


@triton.jit
def _attn_fwd_ws(
    Q_DESC, K_DESC, V_DESC, O, LSE, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm,
    H, GROUP, max_q, max_k, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, UPCAST: tl.constexpr, LENGTH_BUCKET,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest first, as _attn_fwd
    h = tl.program_id(1)  # heads on grid axis 1 and sequences on 2: each <= 65535 (B * H may not be)
    b = tl.program_id(2)
    kvh = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    diag = max_k - max_q if BOTTOM_RIGHT else 0
    c = scale * LOG2E
    q = Q_DESC.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)  # rows past the sequence arrive as zeros

    hi = max_k
    if CAUSAL:  # up to the last row's diagonal
        hi = tl.maximum(tl.minimum(max_k, m0 + BLOCK_M + diag), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n_start in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = K_DESC.load([b, kvh, n_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), "tf32", UPCAST)
        offs_n = n_start + offs_n0
        keep = offs_n[None, :] < max_k
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + diag)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.exp2(s * c - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = V_DESC.load([b, kvh, n_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = _dot(p.to(v.dtype), v, acc, "tf32", UPCAST)
        m_i = m_new

    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < max_q)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=offs_m < max_q)


# (BLOCK_M, BLOCK_N, warps, stages): one warpgroup a program, as the pass needs (see above).
# Not (64, 64, 4, 3): on the H200 under Triton 3.6 it wrote NaN (D=128, and D=64 causal, at
# Nq=300 Nk=333), where the same blocks with two stages and the other shapes matched SDPA.
WS_SHAPES = [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2)]
_tuned = {}


def _block_shapes(nargs) -> None:
    """A config's pre-launch hook: the descriptors' tiles are its blocks."""
    nargs["Q_DESC"].block_shape = [1, 1, nargs["BLOCK_M"], nargs["HEAD_DIM"]]
    for name in ("K_DESC", "V_DESC"):
        nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


def _kernel():
    """(kernel, fixed blocks): autotuned over WS_SHAPES on a GPU, one candidate under
    ATTNKIT_TRITON_CONFIG (its last for larger indices), small blocks under the interpreter."""
    from .flash_attention_launch import INTERPRETER_BLOCKS, _fixed_config, _interpreting

    if _interpreting():
        return _attn_fwd_ws, dict(INTERPRETER_BLOCKS)
    fixed = _fixed_config()
    if fixed is not None:
        m, n, w, st = WS_SHAPES[min(fixed, len(WS_SHAPES) - 1)]
        return _attn_fwd_ws, dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
    if "tuner" not in _tuned:
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st, pre_hook=_block_shapes)
                   for m, n, w, st in WS_SHAPES]
        _tuned["tuner"] = triton.autotune(configs=configs, key=["HEAD_DIM", "CAUSAL", "LENGTH_BUCKET"])(_attn_fwd_ws)
    return _tuned["tuner"], {}


def forward(q, k, v, out, lse, c, kv_descriptors, causal: bool, bottom_right: bool, scale: float, launch=None):
    """Fills out and lse (dense (B, H, N, D) tensors, flash_attention_launch.ws_eligible);
    kv_descriptors: K's and V's, from flash_attention_launch._tma_descriptors."""
    from .flash_attention_launch import TensorDescriptor, _run

    dim = q.shape[-1]
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), [1, 1, 16, dim])
    k_desc, v_desc = kv_descriptors
    kernel, blocks = _kernel()
    if blocks:  # no autotuner runs the pre_hook
        _block_shapes(dict(Q_DESC=q_desc, K_DESC=k_desc, V_DESC=v_desc, HEAD_DIM=dim, **blocks))
    batch, heads, max_q, _ = q.shape
    max_k = k.shape[2]
    grid = lambda meta: (cdiv(max_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    args = (q_desc, k_desc, v_desc, out, lse, *out.stride()[:3], *lse.stride(), heads, heads // k.shape[1], max_q, max_k,
            scale)
    flags = dict(HEAD_DIM=dim, CAUSAL=causal, BOTTOM_RIGHT=bottom_right, UPCAST=c["flags"]["UPCAST"],
                 LENGTH_BUCKET=c["flags"]["LENGTH_BUCKET"])
    _run(kernel, grid, args, dict(**flags, **blocks), launch)
