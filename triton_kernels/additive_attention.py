"""Fused additive (Bahdanau) attention on the projections qp = query W_q^T
(B, Tq, A) and kp = keys W_k^T (B, Tk, A): score[b, i, j] = v_a . tanh(qp_i + kp_j).

Forward: one program per (block of queries, batch element) walks the keys tile
by tile; a tile's scores are summed over A in chunks of BLOCK_A (a
(BLOCK_M, BLOCK_N, BLOCK_A) tanh tile at a time, never the (Tq, Tk, A) tensor),
then an online softmax and context += p @ values, as flash attention; it saves
the log-sum-exp, and the raw scores only when the weights are asked for.

Backward: one program per (block of keys, batch element) owns that block's
d_kp, d_values and its slice of d_v_a; for each query tile it recomputes the
scores (first pass over A), dS = p (dP - delta), then recomputes tanh (second
pass) for d_qp (fp32 atomics: several key blocks add into one query row),
d_kp and d_v_a.

tanh is 2 sigmoid(2x) - 1: tl has no tanh in every Triton version. fp16/bf16
inputs are upcast in the kernel; statistics and accumulation in fp32.
"""
import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from .flash_attention_launch import _interpreting, _run

BLOCK_M, BLOCK_N, BLOCK_A = 32, 32, 8
# 8 warps, not Triton's default 4: with 4, ptxas (sm_90) spilled 1.8 KB (forward) and 2.5 KB
# (backward) a thread at A = D_v = 256, 0.3-0.9 KB at A = 96, D_v = 128; with 8, 0.3 KB and none.
NUM_WARPS = 8
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    x = tl.minimum(tl.maximum(x, -15.0), 15.0)  # tanh(15) rounds to 1; exp(-2x) stays finite
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _scores(qp_base, kp_base, VA, offs_m, offs_n, n_q, n_k, A, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_A: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores v_a . tanh(qp_i + kp_j), summed over A chunk by chunk."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for a0 in range(0, A, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        in_a = offs_a < A
        q = tl.load(qp_base + offs_m[:, None] * A + offs_a[None, :], mask=(offs_m[:, None] < n_q) & in_a[None, :],
                    other=0).to(tl.float32)
        k = tl.load(kp_base + offs_n[:, None] * A + offs_a[None, :], mask=(offs_n[:, None] < n_k) & in_a[None, :],
                    other=0).to(tl.float32)
        va = tl.load(VA + offs_a, mask=in_a, other=0).to(tl.float32)
        t = _tanh(q[:, None, :] + k[None, :, :])
        s += tl.sum(t * va[None, None, :], axis=2)
    return s


@triton.jit
def _live(MASK, b, offs_n, n_k, HAS_MASK: tl.constexpr):
    live = offs_n < n_k
    if HAS_MASK:
        live = live & (tl.load(MASK + b * n_k + offs_n, mask=live, other=0) != 0)
    return live


@triton.jit
def _forward(
    QP, KP, V, VA, MASK, OUT, LSE, S, n_q, n_k, A, DV,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_SCORES: tl.constexpr,
):
    pid_m = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64)  # on axis 0 (limit 2^31 - 1, not 65535); b * n_k * A may pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    qp_base = QP + b * n_q * A
    kp_base = KP + b * n_k * A
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, n_k, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _scores(qp_base, kp_base, VA, offs_m, offs_n, n_q, n_k, A, BLOCK_M, BLOCK_N, BLOCK_A)
        live = _live(MASK, b, offs_n, n_k, HAS_MASK)
        s = tl.where(live[None, :], s, float("-inf"))
        if STORE_SCORES:
            tl.store(S + (b * n_q + offs_m[:, None]) * n_k + offs_n[None, :], s,
                     mask=(offs_m[:, None] < n_q) & (offs_n[None, :] < n_k))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live key yet: keep p = 0, not NaN
        p = tl.exp2((s - m_use[:, None]) * LOG2E)
        alpha = tl.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + (b * n_k + offs_n[:, None]) * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < n_k) & (offs_dv[None, :] < DV), other=0).to(tl.float32)
        acc = tl.dot(p, v, acc=acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    empty = l_i == 0  # every key masked: context 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    row_ok = offs_m < n_q
    tl.store(OUT + (b * n_q + offs_m[:, None]) * DV + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b * n_q + offs_m, lse, mask=row_ok)


@triton.jit
def _backward(
    QP, KP, V, VA, MASK, LSE, DELTA, DO, DW, DQP, DKP, DV_OUT, DVA, n_q, n_k, A, DV, n_key_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DW: tl.constexpr,
):
    pid_n = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64)  # as _forward's
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_n = offs_n < n_k
    live = _live(MASK, b, offs_n, n_k, HAS_MASK)
    qp_base = QP + b * n_q * A
    kp_base = KP + b * n_k * A
    v = tl.load(V + (b * n_k + offs_n[:, None]) * DV + offs_dv[None, :],
                mask=in_n[:, None] & (offs_dv[None, :] < DV), other=0).to(tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dva_base = DVA + (b * n_key_blocks + pid_n) * A  # this program's slice of d_v_a, summed on the host
    for m0 in range(0, n_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < n_q
        s = _scores(qp_base, kp_base, VA, offs_m, offs_n, n_q, n_k, A, BLOCK_M, BLOCK_N, BLOCK_A)
        lse = tl.load(LSE + b * n_q + offs_m, mask=in_m, other=float("-inf"))
        delta = tl.load(DELTA + b * n_q + offs_m, mask=in_m, other=0)
        ok = (lse != float("-inf"))[:, None] & live[None, :]
        p = tl.where(ok, tl.exp2((s - tl.where(ok, lse[:, None], 0.0)) * LOG2E), 0.0)
        do = tl.load(DO + (b * n_q + offs_m[:, None]) * DV + offs_dv[None, :],
                     mask=in_m[:, None] & (offs_dv[None, :] < DV), other=0).to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if HAS_DW:
            dp += tl.load(DW + (b * n_q + offs_m[:, None]) * n_k + offs_n[None, :], mask=in_m[:, None] & in_n[None, :],
                          other=0).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dv_acc = tl.dot(tl.trans(p), do, acc=dv_acc, input_precision="ieee")
        for a0 in range(0, A, BLOCK_A):
            offs_a = a0 + tl.arange(0, BLOCK_A)
            in_a = offs_a < A
            q = tl.load(qp_base + offs_m[:, None] * A + offs_a[None, :], mask=in_m[:, None] & in_a[None, :],
                        other=0).to(tl.float32)
            k = tl.load(kp_base + offs_n[:, None] * A + offs_a[None, :], mask=in_n[:, None] & in_a[None, :],
                        other=0).to(tl.float32)
            va = tl.load(VA + offs_a, mask=in_a, other=0).to(tl.float32)
            t = _tanh(q[:, None, :] + k[None, :, :])
            g = ds[:, :, None] * (1 - t * t) * va[None, None, :]  # d loss / d (qp_i + kp_j)
            tl.atomic_add(DQP + (b * n_q + offs_m[:, None]) * A + offs_a[None, :], tl.sum(g, 1),
                          mask=in_m[:, None] & in_a[None, :])
            dk_ptr = DKP + (b * n_k + offs_n[:, None]) * A + offs_a[None, :]
            dk_ok = in_n[:, None] & in_a[None, :]
            tl.store(dk_ptr, tl.load(dk_ptr, mask=dk_ok, other=0) + tl.sum(g, 0), mask=dk_ok)
            dva = tl.sum(tl.sum(ds[:, :, None] * t, 0), 0)
            tl.store(dva_base + offs_a, tl.load(dva_base + offs_a, mask=in_a, other=0) + dva, mask=in_a)
    tl.store(DV_OUT + (b * n_k + offs_n[:, None]) * DV + offs_dv[None, :], dv_acc,
             mask=in_n[:, None] & (offs_dv[None, :] < DV))


def _block_dv(dv: int) -> int:
    return max(16, next_power_of_2(dv))


def _mask_bytes(mask):
    return None if mask is None else mask.to(torch.uint8).contiguous()


def forward(qp, kp, values, v_a, mask, return_weights, launch=None):
    """(context in values' dtype, lse fp32 (B, Tq), weights (B, Tq, Tk) or None)."""
    batch, n_q, hidden = qp.shape
    n_k, d_v = kp.shape[1], values.shape[2]
    out = values.new_empty((batch, n_q, d_v))
    lse = qp.new_empty((batch, n_q), dtype=torch.float32)
    scores = qp.new_empty((batch, n_q, n_k), dtype=torch.float32) if return_weights else lse
    mask8 = _mask_bytes(mask)
    grid = (batch, cdiv(n_q, BLOCK_M))
    args = (qp, kp, values, v_a, mask8 if mask8 is not None else lse, out, lse, scores, n_q, n_k, hidden, d_v)
    kwargs = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_A=BLOCK_A, BLOCK_DV=_block_dv(d_v), HAS_MASK=mask is not None,
                  STORE_SCORES=return_weights, num_warps=NUM_WARPS)
    _run(_forward, grid, args, kwargs, launch)
    weights = None
    if return_weights:  # exp(s - lse); masked scores are -inf (weight 0); a row with no live key is all 0
        weights = torch.exp(scores - lse[:, :, None]).masked_fill_(torch.isneginf(lse)[:, :, None], 0.0)
        weights = weights.to(values.dtype)
    return out, lse, weights


def backward(grad_context, grad_weights, delta, qp, kp, values, v_a, mask, lse, launch=None):
    """(d_qp, d_kp, d_values, d_v_a) in the inputs' dtypes."""
    batch, n_q, hidden = qp.shape
    n_k, d_v = kp.shape[1], values.shape[2]
    n_key_blocks = cdiv(n_k, BLOCK_N)
    f32 = dict(dtype=torch.float32, device=qp.device)
    d_qp = torch.zeros((batch, n_q, hidden), **f32)
    d_kp = torch.zeros((batch, n_k, hidden), **f32)
    d_values = torch.empty((batch, n_k, d_v), **f32)
    d_va = torch.zeros((batch, n_key_blocks, hidden), **f32)
    mask8 = _mask_bytes(mask)
    grid = (batch, n_key_blocks)
    args = (qp, kp, values, v_a, mask8 if mask8 is not None else lse, lse, delta.to(torch.float32).contiguous(),
            grad_context, grad_weights if grad_weights is not None else lse, d_qp, d_kp, d_values, d_va, n_q, n_k,
            hidden, d_v, n_key_blocks)
    kwargs = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_A=BLOCK_A, BLOCK_DV=_block_dv(d_v), HAS_MASK=mask is not None,
                  HAS_DW=grad_weights is not None, num_warps=NUM_WARPS)
    _run(_backward, grid, args, kwargs, launch)
    return d_qp.to(qp.dtype), d_kp.to(kp.dtype), d_values.to(values.dtype), d_va.sum((0, 1)).to(v_a.dtype)
