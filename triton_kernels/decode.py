"""Split-K ("flash-decoding") attention of a few new query tokens against a long
KV cache, for generation.

With one query token the query-block parallelism of flash attention is gone;
the keys are split into chunks instead, each program reduces one chunk for
every query head of a GQA group (so K/V are read once per group), and a second
kernel merges the per-chunk softmax statistics.

Conventions: q (B, H, Nq, D); caches (B, H_kv, N_max, D) of which the first
cache_seqlens[b] positions are valid; query i sits at position
cache_seqlens[b] - Nq + i and sees valid keys j <= that position (causal over
the new tokens), and j >= position - window_left when a window is set. ALiBi
and soft-capping as in flash_attention. A length outside [0, N_max] counts as
the nearest bound: attnkit.ops.attention_decode does not read CUDA lengths on
the host (that would synchronize with the GPU once per layer and token), so a
bad one must not make the kernel read past the cache.
"""
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2
from .flash_attention import LOG2E, _dot, _tanh
from .flash_attention_launch import _interpreting, _run


@triton.jit
def _decode_partial(
    Q, K, V, SEQLENS, SLOPES, PART_O, PART_M, PART_L,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ab, H_KV, n_q, n_max, chunk, scale: tl.float64, softcap: tl.float64, window_left,
    GROUP: tl.constexpr, SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # float64 parameters, as flash attention's: float64 inputs keep every bit of them
    scale, softcap = tl.full([], scale, ACC_DTYPE), tl.full([], softcap, ACC_DTYPE)
    pid_bkv = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bkv // H_KV).to(tl.int64)  # b * stride may pass 2^31 elements (a long cache of many rows)
    kvh = pid_bkv % H_KV
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), n_max)
    # Rows of the tile: (group head g, query i) pairs of this KV head.
    rows = tl.arange(0, BLOCK_M)
    g = rows // n_q
    i = rows % n_q
    row_ok = g < GROUP
    h = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0)
    position = seqlen - n_q + i
    slope = tl.load(SLOPES + b * stride_ab + h, mask=row_ok, other=0.0) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seqlen)
    k_base = K + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kvh.to(tl.int64) * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                    mask=(offs_n[None, :] < hi) & (offs_d[:, None] < HEAD_DIM), other=0)
        s = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST) * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        rel = offs_n[None, :] - position[:, None]
        if ALIBI:
            s = s - slope[:, None] * tl.abs(rel).to(s.dtype)
        visible = row_ok[:, None] & (offs_n[None, :] < hi) & (rel <= 0)
        if USE_WINDOW:
            visible = visible & (rel >= -window_left)
        s = tl.where(visible, s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=(offs_n[:, None] < hi) & (offs_dv[None, :] < HEAD_DIM_V), other=0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new
    # Partials, unnormalized, indexed (b, h, i, split).
    slot = ((b * H_KV * GROUP + h) * n_q + i) * SPLITS + split
    tl.store(PART_M + slot, m_i, mask=row_ok)
    tl.store(PART_L + slot, l_i, mask=row_ok)
    tl.store(PART_O + slot[:, None] * HEAD_DIM_V + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _decode_combine(
    PART_O, PART_M, PART_L, O, LSE, stride_ob, stride_oh, stride_om, H, n_q,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merges the per-chunk (max, sum, output) of one query row."""
    row = tl.program_id(0)  # (b * H + h) * n_q + i
    b = (row // (H * n_q)).to(tl.int64)
    h = (row // n_q) % H
    i = row % n_q
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    m = tl.load(PART_M + row * SPLITS + splits, mask=splits < SPLITS, other=float("-inf"))
    l_part = tl.load(PART_L + row * SPLITS + splits, mask=splits < SPLITS, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_use)
    total = tl.sum(l_part * weight, 0)
    parts = tl.load(PART_O + (row * SPLITS + splits[:, None]) * HEAD_DIM_V + offs_dv[None, :],
                    mask=(splits[:, None] < SPLITS) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + i * stride_om + offs_dv, out.to(O.dtype.element_ty),
             mask=offs_dv < HEAD_DIM_V)
    lse = tl.where(total == 0, float("-inf"), (m_use + tl.log2(tl.where(total == 0, 1.0, total))) / LOG2E)
    tl.store(LSE + row, lse)


MAX_ROWS = 128  # query rows (GQA group x new tokens) one program holds


def decode(q, k_cache, v_cache, cache_seqlens, *, scale: float, softcap: float, window_left: int, alibi_slopes=None,
           splits=None, launch=None):
    """Returns (out (B, H, Nq, Dv), lse (B, H, Nq) fp32). `launch(kernel, grid, args, kwargs)`
    replaces launching (compile_check)."""
    import torch

    batch, heads, n_q, dim = q.shape
    heads_kv, n_max, dim_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    group = heads // heads_kv
    block_n = 16 if _interpreting() else 64
    if splits is None:
        if _interpreting():
            splits = min(3, cdiv(max(n_max, 1), block_n))
        else:  # about two programs per SM, never chunks shorter than a key block
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
            splits = max(1, min(cdiv(2 * sms, batch * heads_kv), cdiv(max(n_max, 1), block_n), 64))
    chunk = cdiv(cdiv(max(n_max, 1), splits), block_n) * block_n
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    part_o = torch.empty((batch, heads, n_q, splits, dim_v), dtype=acc, device=q.device)
    part_m = torch.empty((batch, heads, n_q, splits), dtype=acc, device=q.device)
    part_l = torch.empty_like(part_m)
    out = torch.empty((batch, heads, n_q, dim_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=acc, device=q.device)
    slopes = alibi_slopes if alibi_slopes is not None else part_m
    block_d, block_dv = max(16, next_power_of_2(dim)), max(16, next_power_of_2(dim_v))
    partial_args = (
        q, k_cache, v_cache, cache_seqlens, slopes, part_o, part_m, part_l, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        alibi_slopes.stride(0) if alibi_slopes is not None else 0, heads_kv, n_q, n_max, chunk, scale, softcap,
        max(window_left, 0),
    )
    partial_kwargs = dict(
        GROUP=group, SPLITS=splits, HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_M=max(16, next_power_of_2(group * n_q)), BLOCK_N=block_n,
        ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32, SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None, USE_WINDOW=window_left >= 0,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
    )
    _run(_decode_partial, (batch * heads_kv, splits), partial_args, partial_kwargs, launch)
    combine_args = (part_o, part_m, part_l, out, lse, out.stride(0), out.stride(1), out.stride(2), heads, n_q)
    combine_kwargs = dict(SPLITS=splits, BLOCK_S=max(2, next_power_of_2(splits)), HEAD_DIM_V=dim_v,
                          BLOCK_DV=block_dv)
    _run(_decode_combine, (batch * heads * n_q,), combine_args, combine_kwargs, launch)
    return out, lse
