"""The flash attention forward kernel (_attn_fwd) and its block loops: the default
one (_fwd_blocks) and the look-ahead one of the LOOK_AHEAD candidates
(_fwd_run_pipelined). Scores, masks, bounds and loads are flash_attention's,
shared with the backward; its module docstring gives the conventions."""
import triton
import triton.language as tl

from .flash_attention import (
    LOG2E, _block_count, _block_start, _dot, _dropout_keep, _key_blocks, _load_rows, _query_block_longest_first,
    _bh_ptr, _score_scale, _sequence_bounds, _tile_scores, _value_tile, _wide,
)


@triton.jit
def _key_tile(k_base, offs_n, n_start, stride_kn, k_len, rot_off, COS, SIN, stride_rot, K_DESC, b, kvh,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ROTARY_DIM: tl.constexpr,
              INTERLEAVED: tl.constexpr, ACC_DTYPE: tl.constexpr, CHECK_BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """The forward's K tile at keys offs_n (from n_start): through the descriptor
    with USE_TMA (rows past the tensor arrive as zeros), else pointers (rotated with RoPE)."""
    if USE_TMA:
        return K_DESC.load([b, kvh, n_start, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        return _load_rows(k_base, offs_n, stride_kn, offs_n < k_len, offs_n + rot_off, COS, SIN, stride_rot, 1.0,
                          HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED, ACC_DTYPE, CHECK_BOUNDS)


@triton.jit
def _exponents(s, m_i, c):
    """The online softmax's step on a tile of scores s (times c in base 2, see
    _score_scale): (x, m_new, shift) with the tile's probabilities exp2(x) and the
    running sums' rescaling exp2(shift); a row with nothing visible yet keeps 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)  # max commutes with a positive scale
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    return s * c - m_use[:, None], m_new, m_i - m_use


@triton.jit
def _probabilities(x, shift, l_i, queries, keys, seed_bh, max_k, drop_threshold, drop_scale, DROPOUT: tl.constexpr):
    """(p, alpha, l_i): the tile's probabilities as the output takes them (dropped
    ones 0, kept ones scaled), the rescaling of the running sums, and the
    normalizer l_i, which counts every probability."""
    p = tl.exp2(x)
    alpha = tl.exp2(shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # the normalizer l_i counts every probability; only the output is dropped
        keep = _dropout_keep(seed_bh, queries, keys, drop_threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
    return p, alpha, l_i


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, lo, run_lo, run_hi, hi, offs_m, offs_n0, offs_dv, q_len, k_len, diag, rot_off,
    COS, SIN, stride_rot, stride_kn, stride_vn, window_left, window_right, scale, softcap, mask_base, stride_mm,
    stride_mn, pad_base, slope, seed_bh, max_k, drop_threshold, drop_scale, K_DESC, V_DESC, b, kvh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CHECK_BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The online softmax over the checked key blocks of [lo, hi) or the
    unchecked run [run_lo, run_hi): (acc, l_i, m_i) updated. USE_TMA: K and V
    tiles come through their (B, H_kv, N, D) descriptors, K_DESC and V_DESC (the
    tensor-copy engine on sm_90; rows and columns past the tensor arrive as zeros)."""
    count, before = _block_count(lo, run_lo, run_hi, hi, BLOCK_N, CHECK_BOUNDS)
    c = _score_scale(scale, RAW_SCORES)
    for j in range(0, count):
        n_start = _block_start(j, before, lo, run_lo, run_hi, BLOCK_N, CHECK_BOUNDS)
        offs_n = n_start + offs_n0
        k = _key_tile(k_base, offs_n, n_start, stride_kn, k_len, rot_off, COS, SIN, stride_rot, K_DESC, b, kvh,
                      HEAD_DIM, BLOCK_D, BLOCK_N, ROTARY_DIM, INTERLEAVED, ACC_DTYPE, CHECK_BOUNDS, USE_TMA)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        s, _ = _tile_scores(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, diag, window_left, window_right,
                            scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope, USE_WINDOW, SOFTCAP,
                            MASK_KIND, HAS_PADDING, ALIBI, RAW_SCORES, CHECK_BOUNDS)
        x, m_i, shift = _exponents(s, m_i, c)
        p, alpha, l_i = _probabilities(x, shift, l_i, offs_m[:, None], offs_n[None, :], seed_bh, max_k,
                                       drop_threshold, drop_scale, DROPOUT)
        v = _value_tile(v_base, offs_n, n_start, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V, BLOCK_DV,
                        BLOCK_N, CHECK_BOUNDS, USE_TMA)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _pipelined_step(
    qk, j, count, l_i, m_i, q, k_base, run_lo, offs_m, offs_n0, q_len, k_len, diag, stride_kn, window_left,
    window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh, max_k, drop_threshold,
    drop_scale, COS, SIN, K_DESC, b, kvh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr,
    ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Block j of _fwd_run_pipelined: its scores qk become exponents, block j + 1's
    product is issued (the last block's reloads it: a clamped index), then the
    exponentials. Returns (p, alpha, l_i, m_i, the next block's qk)."""
    offs_n = run_lo + j * BLOCK_N + offs_n0
    s, _ = _tile_scores(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, diag, window_left, window_right, scale,
                        softcap, mask_base, stride_mm, stride_mn, pad_base, slope, USE_WINDOW, SOFTCAP, MASK_KIND,
                        HAS_PADDING, ALIBI, RAW_SCORES, False)
    x, m_i, shift = _exponents(s, m_i, _score_scale(scale, RAW_SCORES))
    ahead = run_lo + tl.minimum(j + 1, count - 1) * BLOCK_N
    k = _key_tile(k_base, ahead + offs_n0, ahead, stride_kn, k_len, 0, COS, SIN, 0, K_DESC, b, kvh, HEAD_DIM,
                  BLOCK_D, BLOCK_N, 0, False, ACC_DTYPE, False, USE_TMA)
    qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
    p, alpha, l_i = _probabilities(x, shift, l_i, offs_m[:, None], offs_n[None, :], seed_bh, max_k, drop_threshold,
                                   drop_scale, DROPOUT)
    return p, alpha, l_i, m_i, qk


@triton.jit
def _fwd_run_pipelined(
    acc, l_i, m_i, q, k_base, v_base, run_lo, run_hi, offs_m, offs_n0, offs_dv, q_len, k_len, diag, stride_kn,
    stride_vn, window_left, window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh,
    max_k, drop_threshold, drop_scale, COS, SIN, K_DESC, V_DESC, b, kvh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """_fwd_blocks over the unchecked run [run_lo, run_hi) (no RoPE), each key
    block's q k^T issued one block ahead: block j + 1's product runs on the tensor
    cores while block j's exponentials are computed (FlashAttention-3's overlap
    within a warpgroup). The order is what keeps it on sm_90: Triton leaves a
    product in flight only where its result is first read after another
    product's wait (its WGMMA pipeliner's rule), hence block j - 1's P V opens
    iteration j; and ptxas serializes the tensor cores where a still-running
    product's accumulator is copied at the loop's end, hence block j's scores
    become exponents before block j + 1's product is issued (that product can
    then take the scores' registers). Checked on the compiled sm_90 loop (no
    ptxas C7514 warning; the MUFU.EX2 between the HGMMA issues); not yet timed."""
    count = (run_hi - run_lo) // BLOCK_N  # run_lo and run_hi are multiples of BLOCK_N
    if count > 0:
        k = _key_tile(k_base, run_lo + offs_n0, run_lo, stride_kn, k_len, 0, COS, SIN, 0, K_DESC, b, kvh, HEAD_DIM,
                      BLOCK_D, BLOCK_N, 0, False, ACC_DTYPE, False, USE_TMA)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        p, alpha, l_i, m_i, qk = _pipelined_step(
            qk, 0, count, l_i, m_i, q, k_base, run_lo, offs_m, offs_n0, q_len, k_len, diag, stride_kn, window_left,
            window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh, max_k,
            drop_threshold, drop_scale, COS, SIN, K_DESC, b, kvh, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, ACC_DTYPE,
            DOT_PRECISION, UPCAST, USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, DROPOUT, ALIBI, RAW_SCORES, USE_TMA)
        for j in range(1, count):
            v_start = run_lo + (j - 1) * BLOCK_N
            v = _value_tile(v_base, v_start + offs_n0, v_start, offs_dv, stride_vn, k_len, V_DESC, b, kvh,
                            HEAD_DIM_V, BLOCK_DV, BLOCK_N, False, USE_TMA)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
            p, alpha, l_i, m_i, qk = _pipelined_step(
                qk, j, count, l_i, m_i, q, k_base, run_lo, offs_m, offs_n0, q_len, k_len, diag, stride_kn,
                window_left, window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh,
                max_k, drop_threshold, drop_scale, COS, SIN, K_DESC, b, kvh, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N,
                ACC_DTYPE, DOT_PRECISION, UPCAST, USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, DROPOUT, ALIBI,
                RAW_SCORES, USE_TMA)
        v_start = run_lo + (count - 1) * BLOCK_N
        v = _value_tile(v_base, v_start + offs_n0, v_start, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V,
                        BLOCK_DV, BLOCK_N, False, USE_TMA)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, PAD, SLOPES, COS, SIN, ROT_OFF, CU_Q, CU_K, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_pb, stride_ab, stride_rot,
    H, GROUP, max_q, max_k, scale: tl.float64, softcap: tl.float64, window_left, window_right, seed, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr,
    RAW_SCORES: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, LENGTH_BUCKET,
    WIDE_OFFSETS: tl.constexpr, USE_TMA: tl.constexpr = False, LOOK_AHEAD: tl.constexpr = False,
):
    # float64 parameters: float64 inputs keep every bit of them (float32 cost them 3e-8)
    scale, softcap = tl.full([], scale, ACC_DTYPE), tl.full([], softcap, ACC_DTYPE)
    if WIDE_OFFSETS:  # row offsets too: a mask's Nq * Nk passes 2^31 at 46k, a (B, N, H, D) view's at N * H * D
        stride_mm = tl.cast(stride_mm, tl.int64)
        stride_qm = tl.cast(stride_qm, tl.int64)
        stride_kn = tl.cast(stride_kn, tl.int64)
        stride_vn = tl.cast(stride_vn, tl.int64)
        stride_om = tl.cast(stride_om, tl.int64)
    if USE_TMA:  # descriptors index dense (B, H_kv, N, D) tensors and hold unrotated keys
        tl.static_assert(VARLEN == 0, "USE_TMA takes dense inputs")
        tl.static_assert(ROTARY_DIM == 0, "USE_TMA loads keys as stored, without RoPE")
    pid_m = _query_block_longest_first()
    h = tl.program_id(1)  # heads on grid axis 1 and sequences on 2: each <= 65535 (B * H may not be)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, diag = _sequence_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN, BOTTOM_RIGHT, WIDE_OFFSETS)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rot_off = tl.load(ROT_OFF + b) if ROTARY_DIM > 0 else 0
    q = _load_rows(_bh_ptr(Q, b, h, stride_qb, stride_qh, WIDE_OFFSETS) + q_start * stride_qm, offs_m, stride_qm, offs_m < q_len,
                   offs_m + diag + rot_off, COS, SIN, stride_rot, 1.0, HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED,
                   ACC_DTYPE)
    k_base = _bh_ptr(K, b, kvh, stride_kb, stride_kh, WIDE_OFFSETS) + k_start * stride_kn
    v_base = _bh_ptr(V, b, kvh, stride_vb, stride_vh, WIDE_OFFSETS) + k_start * stride_vn
    mask_base = _bh_ptr(MASK, b, h, stride_mb, stride_mh, WIDE_OFFSETS)
    pad_base = PAD + _wide(b, WIDE_OFFSETS) * stride_pb
    seed_bh = seed + b * H + h
    slope = tl.load(SLOPES + b * stride_ab + h) if ALIBI else 0.0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)
    lo, run_lo, run_hi, hi = _key_blocks(m0, q_len, k_len, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                         USE_WINDOW, ROTARY_DIM)
    for step in tl.static_range(2):
        # The unchecked run, then the checked rest (CHECK_BOUNDS = step); the other way round for the
        # pipelined run: followed by the checked loop, it made ptxas serialize the tensor cores (C7515).
        if LOOK_AHEAD & (ROTARY_DIM == 0) & (step == 1):
            acc, l_i, m_i = _fwd_run_pipelined(
                acc, l_i, m_i, q, k_base, v_base, run_lo, run_hi, offs_m, offs_n0, offs_dv, q_len, k_len, diag,
                stride_kn, stride_vn, window_left, window_right, scale, softcap, mask_base, stride_mm, stride_mn,
                pad_base, slope, seed_bh, max_k, drop_threshold, drop_scale, COS, SIN, K_DESC, V_DESC, b, kvh,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, ACC_DTYPE, DOT_PRECISION, UPCAST,
                USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, DROPOUT, ALIBI, RAW_SCORES, USE_TMA)
        elif (step == 1) | (ROTARY_DIM == 0):  # no unchecked run with RoPE (see _unchecked_range)
            acc, l_i, m_i = _fwd_blocks(
                acc, l_i, m_i, q, k_base, v_base, lo, run_lo, run_hi, hi, offs_m, offs_n0, offs_dv, q_len, k_len,
                diag, rot_off, COS, SIN, stride_rot, stride_kn, stride_vn, window_left, window_right, scale, softcap,
                mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh, max_k, drop_threshold, drop_scale,
                K_DESC, V_DESC, b, kvh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, ACC_DTYPE,
                DOT_PRECISION, UPCAST, USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, DROPOUT, ALIBI, RAW_SCORES,
                ROTARY_DIM, INTERLEAVED, (step == 1) | LOOK_AHEAD, USE_TMA)

    empty = l_i == 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    o_ptrs = _bh_ptr(O, b, h, stride_ob, stride_oh, WIDE_OFFSETS) + (q_start + offs_m[:, None]) * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < HEAD_DIM_V))
    lse_ptrs = _bh_ptr(LSE, b, h, stride_lb, stride_lh, WIDE_OFFSETS) + (q_start + offs_m) * stride_lm
    tl.store(lse_ptrs, lse.to(LSE.dtype.element_ty), mask=offs_m < q_len)
