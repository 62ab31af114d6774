"""Flash attention in Triton: forward and backward, tiled, online softmax. This
module holds what the kernels share (scores, masks, bounds, loads) and the
backward; the forward kernel is in flash_attention_forward.py.

One kernel family serves dense (B, H, N, D) and packed variable-length
(total, H, D) inputs: a varlen call reads each sequence's start from
cu_seqlens and passes a zero batch stride, a dense call starts every sequence
at 0. Scores of a tile are made by one helper, `_tile_scores`, shared by the
forward and both backward kernels, so masking, windows, soft-capping and
dropout are defined once. Each kernel walks its blocks in two loops: the run
of tiles inside both sequences and the window for every pair (causal: all but
the diagonal), which skips the bounds and window arithmetic, then the rest.

Conventions (shared with the reference and every backend):
- `diag` aligns query i with key i + diag: Nk - Nq for bottom-right causal
  (FlashAttention's), 0 for top-left (SDPA's is_causal). Key j is inside the
  window of query i iff -left <= j - (i + diag) <= right; causal is right = 0.
- ALiBi adds -slope[b, h] * |j - (i + diag)| to the score, after soft-capping.
- RoPE (rotary_dim > 0) rotates q row i at position i + diag + offset[b] and k row j at
  j + offset[b] as tiles are loaded (cos/sin tables (positions, rotary_dim / 2)); the
  backward rotates dQ and dK back afterwards.
- Softmax statistics accumulate in fp32 (fp64 for fp64 inputs); the forward
  stores the natural-log log-sum-exp, -inf for a row with no visible key,
  whose output and gradients are 0.
- Dropout keeps probability (i, j) of head stream s = seed + b * H + h iff
  philox(s, c0 = j, c1 = i) >> 8 >= threshold (24-bit), see
  attnkit.reference.attention.dropout_keep_mask.
- The forward may load K and V tiles through host tensor descriptors (USE_TMA,
  an autotune candidate on sm_90 for dense inputs without RoPE), else pointers.
- Backward: dK/dV in one kernel (a program per key block, looping over the
  query heads of its GQA group and the query blocks), dQ in another (a program
  per query block): no atomics, so it is deterministic.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MIN_FINITE_SCORE = tl.constexpr(-2.0e38)  # times LOG2E still a float32
NO_LIMIT = 1 << 30  # a window side of -1 (unbounded) becomes this


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc. UPCAST (interpreter + bf16 only): Triton's interpreter
    computes bf16 dots wrongly, so its operands go through fp32 there.
    out_dtype is the accumulator's: Triton before 3.8 assumes float32 and
    rejects a float64 accumulator when compiling (the interpreter does not)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _tanh(x):
    """tanh to about 1e-7 relative, portable across Triton versions: 2 * sigmoid(2x) - 1
    cancels for small |x| (a softcap of 1e4 was off by 4e-4, one of 1e8 zeroed every score),
    so there a series takes over (its first dropped term is < 2e-10 relative at 1/8)."""
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    return tl.where(tl.abs(x) < 0.125, series, 2 * tl.sigmoid(2 * x) - 1)


@triton.jit
def _tile_scores(
    qk, queries, keys, q_len, k_len, diag, window_left, window_right, scale, softcap,
    mask_base, stride_mask_m, stride_mask_n, pad_base, slope,
    USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, HAS_PADDING: tl.constexpr,
    ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr, CHECK_BOUNDS: tl.constexpr,
):
    """Scaled, soft-capped, masked scores of one (BLOCK_M, BLOCK_N) tile in
    base-2 units (natural-log scores times log2(e), for exp2; -inf where
    masked), and tanh of the soft-cap argument (for its derivative; 0 without
    soft-capping). Plain scores take one multiply, by scale * log2(e), or none with RAW_SCORES
    (below). CHECK_BOUNDS=False is for
    tiles inside both sequences and inside the window for every (query, key)
    pair (see _unchecked_range): those skip the bounds and window arithmetic,
    which costs about as much as the tile's matrix products on tensor cores.
    RAW_SCORES (no soft-cap, ALiBi or additive mask, and scale > 0): s is qk
    itself, masked, and the caller multiplies by _score_scale's factor inside
    its exp2 argument; the masks' -inf survive a positive factor.
    queries / keys: the tile's query and key positions as a column and a row
    ((M, 1) and (1, N)), or a row and a column for a transposed tile (the dK/dV
    kernel works on S^T, so that P^T and dS^T feed its products from registers)."""
    rel = keys - (queries + diag)  # key position relative to the query's diagonal
    mask_ptrs = mask_base + queries * stride_mask_m + keys * stride_mask_n
    valid = (queries < q_len) & (keys < k_len)
    if USE_WINDOW:
        valid = valid & (rel <= window_right) & (rel >= -window_left)
    t = qk * 0
    if SOFTCAP or ALIBI or MASK_KIND == 2:  # natural units first, then base 2
        s = qk * scale
        if SOFTCAP:
            t = _tanh(s / softcap)
            s = softcap * t
        if ALIBI:  # after soft-capping: the bias is not capped
            s = s - slope * tl.abs(rel).to(s.dtype)
        if MASK_KIND == 2:  # additive
            if CHECK_BOUNDS:
                s = s + tl.load(mask_ptrs, mask=valid, other=0).to(s.dtype)
            else:
                s = s + tl.load(mask_ptrs).to(s.dtype)
            # A finite score below -2e38 (transformers' finfo(dtype).min padding) would overflow
            # to -inf in base 2 and pass for a hidden key; -inf stays hidden.
            s = tl.where((s < MIN_FINITE_SCORE) & (s > float("-inf")), MIN_FINITE_SCORE, s)
            if s.dtype == tl.float32:  # and one above 2e38 to +inf, then NaN (inf - inf) in the softmax
                s = tl.where((s > -MIN_FINITE_SCORE) & (s < float("inf")), -MIN_FINITE_SCORE, s)  # inf, NaN kept
        s = s * LOG2E
    elif RAW_SCORES:  # the caller scales inside its exponent's FMA (see _score_scale)
        s = qk
    else:
        s = qk * (scale * LOG2E)
    if CHECK_BOUNDS:
        if MASK_KIND == 1:  # boolean, True (nonzero) = attend
            valid = valid & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
        if HAS_PADDING:  # True (nonzero) = padding, ignored
            valid = valid & (tl.load(pad_base + keys, mask=keys < k_len, other=1) == 0)
        s = tl.where(valid, s, float("-inf"))
    else:  # inside both sequences and the window: only the masks the caller gave
        if MASK_KIND == 1:
            s = tl.where(tl.load(mask_ptrs) != 0, s, float("-inf"))
        if HAS_PADDING:
            s = tl.where(tl.load(pad_base + keys) == 0, s, float("-inf"))
    return s, t


@triton.jit
def _score_scale(scale, RAW_SCORES: tl.constexpr):
    """What _tile_scores' scores still need multiplying by, inside the caller's
    exp2 argument: scale * log2(e) for raw scores (one FMA a score instead of a
    multiply and a subtraction), else 1."""
    if RAW_SCORES:
        return scale * LOG2E
    else:
        return 1.0


@triton.jit
def _unchecked_range(lo, hi, first_ok, end_ok, BLOCK: tl.constexpr):
    """[run_lo, run_hi) inside [lo, hi) (lo a multiple of BLOCK): the blocks that
    start at or after first_ok and end by end_ok, whose tiles need no bounds or
    window check. The rest, [lo, run_lo) and [run_hi, hi), is checked. With
    fused RoPE there is no run (end_ok = 0): a second copy of the tile loop
    made those kernels compile in minutes instead of seconds (sm_90, 2026-11-26)."""
    run_lo = tl.minimum((tl.maximum(first_ok, lo) + BLOCK - 1) // BLOCK * BLOCK, hi)
    run_hi = tl.maximum(tl.minimum(tl.maximum(end_ok, 0) // BLOCK * BLOCK, hi), run_lo)
    return run_lo, run_hi


@triton.jit
def _key_blocks(m0, q_len, k_len, diag, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                USE_WINDOW: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """(lo, run_lo, run_hi, hi): the key range [lo, hi) that the query block at m0
    can see (the forward's and dQ's loops) and its unchecked run."""
    lo = 0
    hi = k_len
    first_ok = 0
    end_ok = k_len
    if USE_WINDOW:  # skip key blocks that no query of this block can see
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(m0 + BLOCK_M + diag + window_right, k_len)
        first_ok = m0 + BLOCK_M - 1 + diag - window_left  # the last query's window starts here
        end_ok = tl.minimum(end_ok, m0 + diag + window_right + 1)  # the first query's ends here
    # A partial query block, or RoPE: all checked. (The constexpr apart from the tensor
    # condition: triton 3.2's interpreter cannot make an int1 tensor of a constexpr bool.)
    if ROTARY_DIM > 0:
        end_ok = 0
    else:
        end_ok = tl.where(m0 + BLOCK_M > q_len, 0, end_ok)
    run_lo, run_hi = _unchecked_range(lo, hi, first_ok, end_ok, BLOCK_N)
    return lo, run_lo, run_hi, hi


@triton.jit
def _block_count(lo, run_lo, run_hi, hi, BLOCK: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    """(blocks, blocks before the run): one loop covers the checked blocks on
    both sides of the run (compiling the loop body twice, not three times),
    another the run."""
    if CHECK_BOUNDS:
        before = (run_lo - lo + BLOCK - 1) // BLOCK
        return before + (hi - run_hi + BLOCK - 1) // BLOCK, before
    else:
        return (run_hi - run_lo + BLOCK - 1) // BLOCK, 0


@triton.jit
def _block_start(j, before, lo, run_lo, run_hi, BLOCK: tl.constexpr, CHECK_BOUNDS: tl.constexpr):
    if CHECK_BOUNDS:
        return tl.where(j < before, lo + j * BLOCK, run_hi + (j - before) * BLOCK)
    else:
        return run_lo + j * BLOCK


@triton.jit
def _dropout_keep(seed_bh, queries, keys, threshold):
    """The keep mask at query and key positions (broadcast as in _tile_scores)."""
    # Key and query index in two counter words (one i * max_k + j word repeats rows 2^32 / max_k apart)
    cols = (keys + queries * 0).to(tl.int32)
    rows = (queries + keys * 0).to(tl.int32)
    zero = cols * 0
    bits, _, _, _ = tl.philox(seed_bh, cols, rows, zero, zero)
    bits = bits.to(tl.uint32, bitcast=True)
    return (bits >> 8).to(tl.int32) >= threshold


@triton.jit
def _wide(x, WIDE_OFFSETS: tl.constexpr):
    """x in int64 where an offset may pass 2^31 elements (the host's WIDE_OFFSETS), else as it is:
    an int32 product wraps to an address before the tensor. Only such calls pay for 64-bit math."""
    if WIDE_OFFSETS:
        x = tl.cast(x, tl.int64)
    return x


@triton.jit
def _bh_offset(b, h, stride_b, stride_h, WIDE_OFFSETS: tl.constexpr):
    """The offset of batch b, head h."""
    return _wide(b, WIDE_OFFSETS) * stride_b + _wide(h, WIDE_OFFSETS) * stride_h


@triton.jit
def _bh_ptr(base, b, h, stride_b, stride_h, WIDE_OFFSETS: tl.constexpr):
    """base + the offset of batch b, head h (added in this order: the kernels' compiled code)."""
    return base + _wide(b, WIDE_OFFSETS) * stride_b + _wide(h, WIDE_OFFSETS) * stride_h


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
                     WIDE_OFFSETS: tl.constexpr):
    """(q_start, q_len, k_start, k_len, diag) of sequence b."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
        q_start = _wide(q_start, WIDE_OFFSETS)
        k_start = _wide(k_start, WIDE_OFFSETS)
    else:
        q_start = 0
        q_len = max_q
        k_start = 0
        k_len = max_k
    if BOTTOM_RIGHT:
        diag = k_len - q_len
    else:
        diag = q_len * 0
    return q_start, q_len, k_start, k_len, diag


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """tl.load of a (rows, cols) tile, masked only on the bounds that can fail:
    rows outside the unchecked run (CHECK_ROWS), columns past a head dim that is
    not a power of two (CHECK_COLS). An all-true mask is not free: in the sm_90
    forward it cost an ISETP and a SEL per 16-byte copy, ~10% of the loop."""
    if CHECK_ROWS:
        if CHECK_COLS:
            return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0)
        else:
            return tl.load(ptrs, mask=rows_ok[:, None], other=0)
    else:
        if CHECK_COLS:
            return tl.load(ptrs, mask=cols_ok[None, :], other=0)
        else:
            return tl.load(ptrs)


@triton.jit
def _value_tile(v_base, offs_n, n_start, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V: tl.constexpr,
                BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, CHECK_BOUNDS: tl.constexpr, USE_TMA: tl.constexpr):
    """A V tile at keys offs_n (from n_start), for the forward and dQ: through the
    descriptor with USE_TMA (rows past the tensor arrive as zeros), else pointers."""
    if USE_TMA:
        return V_DESC.load([b, kvh, n_start, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        return _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n < k_len,
                          offs_dv < HEAD_DIM_V, CHECK_BOUNDS, HEAD_DIM_V != BLOCK_DV)


@triton.jit
def _load_rows(base, rows, stride_row, row_ok, positions, COS, SIN, stride_rot, sin_sign,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
               ACC_DTYPE: tl.constexpr, CHECK_ROWS: tl.constexpr = True):
    """A (rows, BLOCK_D) tile of q or k, rotated by RoPE at `positions` when
    ROTARY_DIM > 0 (sin_sign = -1: the inverse rotation, for gradients). Each
    element pairs with a partner (the other half, or the odd/even neighbour when
    INTERLEAVED) loaded alongside, so rotation costs one more load, no shuffle.
    CHECK_ROWS=False: every row is inside the sequence (row_ok unused)."""
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_tile(base + rows[:, None] * stride_row + offs_d[None, :], row_ok, offs_d < HEAD_DIM, CHECK_ROWS,
                   HEAD_DIM != BLOCK_D)
    if ROTARY_DIM > 0:
        if INTERLEAVED:
            first = (offs_d % 2) == 0
            partner = offs_d ^ 1
            freq = offs_d // 2
        else:
            first = offs_d < ROTARY_DIM // 2
            partner = tl.where(first, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
            freq = tl.where(first, offs_d, offs_d - ROTARY_DIM // 2)
        inside = row_ok[:, None] & (offs_d < ROTARY_DIM)[None, :]
        x_partner = tl.load(base + rows[:, None] * stride_row + partner[None, :], mask=inside, other=0)
        cos = tl.load(COS + positions[:, None] * stride_rot + freq[None, :], mask=inside, other=1.0)
        sin = tl.load(SIN + positions[:, None] * stride_rot + freq[None, :], mask=inside, other=0.0)
        sign = tl.where(first, -sin_sign, sin_sign)  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        rotated = x.to(ACC_DTYPE) * cos.to(ACC_DTYPE) + x_partner.to(ACC_DTYPE) * (sign[None, :] * sin.to(ACC_DTYPE))
        x = rotated.to(x.dtype)
    return x


@triton.jit
def _rotary_rows_inplace(
    X, COS, SIN, ROT_OFF, CU_Q, CU_K, stride_xb, stride_xh, stride_xm, stride_rot, H, max_q, max_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROTARY_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr, ACC_DTYPE: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    QUERIES: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):
    """Undoes the RoPE rotation of dQ (QUERIES) or dK in place: the kernels
    compute gradients with respect to the rotated q and k."""
    if WIDE_OFFSETS:
        stride_xm = tl.cast(stride_xm, tl.int64)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads on grid axis 1 and sequences on 2: each <= 65535 (B * H may not be)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, diag = _sequence_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN, BOTTOM_RIGHT, WIDE_OFFSETS)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    shift = tl.load(ROT_OFF + b)
    if QUERIES:
        start = q_start
        length = q_len
        shift = shift + diag
    else:
        start = k_start
        length = k_len
    base = _bh_ptr(X, b, h, stride_xb, stride_xh, WIDE_OFFSETS) + start * stride_xm
    x = _load_rows(base, rows, stride_xm, rows < length, rows + shift, COS, SIN, stride_rot, -1.0,
                   HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED, ACC_DTYPE)
    tl.store(base + rows[:, None] * stride_xm + offs_d[None, :], x,
             mask=(rows[:, None] < length) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _query_block_longest_first():
    """This program's query block, the last one first: under a causal mask the
    last blocks see the most keys, and starting them first leaves the short ones
    for the final wave instead of a long one (longest processing time first).
    One head's blocks still start together (blocks are dispatched with
    program_id(0) varying fastest), so they share its K and V in L2."""
    return tl.num_programs(0) - 1 - tl.program_id(0)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, CU_Q, CU_K,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    H, max_q, max_k,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, ACC_DTYPE: tl.constexpr,
    VARLEN: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id, the row term of the softmax backward."""
    if WIDE_OFFSETS:
        stride_om = tl.cast(stride_om, tl.int64)
        stride_dom = tl.cast(stride_dom, tl.int64)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)  # heads on grid axis 1 and sequences on 2: each <= 65535 (B * H may not be)
    b = tl.program_id(2)
    q_start, q_len, _, _, _ = _sequence_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN, False, WIDE_OFFSETS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < q_len) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = (q_start + offs_m[:, None])
    o = tl.load(_bh_ptr(O, b, h, stride_ob, stride_oh, WIDE_OFFSETS) + rows * stride_om + offs_dv[None, :], mask=inside, other=0)
    do = tl.load(_bh_ptr(DO, b, h, stride_dob, stride_doh, WIDE_OFFSETS) + rows * stride_dom + offs_dv[None, :], mask=inside, other=0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(_bh_ptr(DELTA, b, h, stride_lb, stride_lh, WIDE_OFFSETS) + (q_start + offs_m) * stride_lm, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dmask_base, lo, run_lo, run_hi, hi, offs_m0, offs_n, offs_dv, q_len,
    k_len, diag, rot_off, COS, SIN, stride_rot, stride_qm, stride_dom, stride_lm, window_left, window_right, scale,
    softcap, mask_base, stride_mm, stride_mn, pad_base, slope, seed_bh, max_k, drop_threshold, drop_scale,
    Q_DESC, DO_DESC, b, h,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CHECK_BOUNDS: tl.constexpr, MASK_GRAD: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """dK (unscaled) and dV of one key block accumulated over one query head's
    checked query blocks or its unchecked run; with MASK_GRAD also the additive
    mask's gradient of each tile, stored at dmask_base (rows of max_k). USE_TMA:
    Q and dO tiles through their (B, H, N, D) descriptors, as K and V in _fwd_blocks."""
    count, before = _block_count(lo, run_lo, run_hi, hi, BLOCK_M, CHECK_BOUNDS)
    for j in range(0, count):
        m_start = _block_start(j, before, lo, run_lo, run_hi, BLOCK_M, CHECK_BOUNDS)
        offs_m = m_start + offs_m0
        if USE_TMA:
            q = Q_DESC.load([b, h, m_start, 0]).reshape(BLOCK_M, BLOCK_D)
            do = DO_DESC.load([b, h, m_start, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            q = _load_rows(q_base, offs_m, stride_qm, offs_m < q_len, offs_m + diag + rot_off, COS, SIN, stride_rot,
                           1.0, HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED, ACC_DTYPE, CHECK_BOUNDS)
            do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], offs_m < q_len,
                            offs_dv < HEAD_DIM_V, CHECK_BOUNDS, HEAD_DIM_V != BLOCK_DV)
        if CHECK_BOUNDS:
            lse = tl.load(lse_base + offs_m * stride_lm, mask=offs_m < q_len, other=0)
            delta = tl.load(delta_base + offs_m * stride_lm, mask=offs_m < q_len, other=0)
        else:
            lse = tl.load(lse_base + offs_m * stride_lm)
            delta = tl.load(delta_base + offs_m * stride_lm)
        # Transposed tiles, (BLOCK_N, BLOCK_M): P^T and dS^T are then the left
        # operands of the dV and dK products straight from registers; P and dS
        # transposed went through shared memory each step, and the kernel spilled.
        qk_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        s_t, t_t = _tile_scores(qk_t, offs_m[None, :], offs_n[:, None], q_len, k_len, diag, window_left,
                                window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope,
                                USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, ALIBI, RAW_SCORES, CHECK_BOUNDS)
        lse = tl.where(lse == float("-inf"), 0.0, lse).to(ACC_DTYPE)  # such rows are all -inf: p = 0
        p_t = tl.exp2(s_t * _score_scale(scale, RAW_SCORES) - lse[None, :] * LOG2E)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        p_out_t = p_t
        if DROPOUT:
            keep_t = _dropout_keep(seed_bh, offs_m[None, :], offs_n[:, None], drop_threshold)
            p_out_t = tl.where(keep_t, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        dv = _dot(p_out_t.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :].to(ACC_DTYPE))
        if MASK_GRAD:  # dS before the soft-cap derivative: the mask is added after the cap
            tl.store(dmask_base + offs_m[None, :] * max_k + offs_n[:, None], ds_t,
                     mask=(offs_m[None, :] < q_len) & (offs_n[:, None] < k_len))
        if SOFTCAP:
            ds_t = ds_t * (1 - t_t * t_t)
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DMASK, MASK, PAD, SLOPES, COS, SIN, ROT_OFF, CU_Q, CU_K, Q_DESC, DO_DESC,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_pb, stride_ab, stride_rot,
    H_KV, GROUP, max_q, max_k, scale: tl.float64, softcap: tl.float64, window_left, window_right, seed, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr,
    RAW_SCORES: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, LENGTH_BUCKET,
    WIDE_OFFSETS: tl.constexpr, MASK_GRAD: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """dK and dV of one key block; with MASK_GRAD the additive mask's gradient
    into DMASK, contiguous (B, H, max_q, max_k) in ACC_DTYPE, zeroed by the caller
    (the tiles no query block visits stay 0). USE_TMA: Q and dO through Q_DESC
    and DO_DESC (dense inputs, no RoPE, as the forward's K and V)."""
    # float64 parameters: float64 inputs keep every bit of them (float32 cost them 3e-8)
    scale, softcap = tl.full([], scale, ACC_DTYPE), tl.full([], softcap, ACC_DTYPE)
    if WIDE_OFFSETS:  # row offsets too: a mask's Nq * Nk passes 2^31 at 46k, a (B, N, H, D) view's at N * H * D
        stride_mm = tl.cast(stride_mm, tl.int64)
        stride_qm = tl.cast(stride_qm, tl.int64)
        stride_kn = tl.cast(stride_kn, tl.int64)
        stride_vn = tl.cast(stride_vn, tl.int64)
        stride_dom = tl.cast(stride_dom, tl.int64)
        stride_dkn = tl.cast(stride_dkn, tl.int64)
        stride_dvn = tl.cast(stride_dvn, tl.int64)
    if USE_TMA:
        tl.static_assert(VARLEN == 0, "USE_TMA takes dense inputs")
        tl.static_assert(ROTARY_DIM == 0, "USE_TMA loads queries as stored, without RoPE")
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)  # heads on grid axis 1 and sequences on 2: each <= 65535 (B * H may not be)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len, diag = _sequence_bounds(CU_Q, CU_K, b, max_q, max_k, VARLEN, BOTTOM_RIGHT, WIDE_OFFSETS)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_inside = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
    v_inside = (offs_n[:, None] < k_len) & (offs_dv[None, :] < HEAD_DIM_V)
    rot_off = tl.load(ROT_OFF + b) if ROTARY_DIM > 0 else 0
    k = _load_rows(_bh_ptr(K, b, kvh, stride_kb, stride_kh, WIDE_OFFSETS) + k_start * stride_kn, offs_n, stride_kn, offs_n < k_len,
                   offs_n + rot_off, COS, SIN, stride_rot, 1.0, HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED, ACC_DTYPE)
    v = tl.load(_bh_ptr(V, b, kvh, stride_vb, stride_vh, WIDE_OFFSETS) + (k_start + offs_n[:, None]) * stride_vn + offs_dv[None, :],
                mask=v_inside, other=0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC_DTYPE)
    lo = 0
    hi = q_len
    first_ok = 0
    end_ok = q_len
    if USE_WINDOW:  # the queries whose window reaches this key block
        lo = tl.maximum(n0 - diag - window_right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(n0 + BLOCK_N - diag + window_left, q_len)
        first_ok = n0 + BLOCK_N - 1 - diag - window_right  # the first query whose window holds the last key
        end_ok = tl.minimum(end_ok, n0 + 1 - diag + window_left)  # the last query's holds the first
    if ROTARY_DIM > 0:  # a partial key block, or RoPE: all checked (as in _key_blocks)
        end_ok = 0
    else:
        end_ok = tl.where(n0 + BLOCK_N > k_len, 0, end_ok)
    run_lo, run_hi = _unchecked_range(lo, hi, first_ok, end_ok, BLOCK_M)
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        q_base = _bh_ptr(Q, b, h, stride_qb, stride_qh, WIDE_OFFSETS) + q_start * stride_qm
        do_base = _bh_ptr(DO, b, h, stride_dob, stride_doh, WIDE_OFFSETS) + q_start * stride_dom
        lse_base = _bh_ptr(LSE, b, h, stride_lb, stride_lh, WIDE_OFFSETS) + q_start * stride_lm
        delta_base = _bh_ptr(DELTA, b, h, stride_lb, stride_lh, WIDE_OFFSETS) + q_start * stride_lm
        dmask_base = DMASK + (b * (H_KV * GROUP) + h).to(tl.int64) * max_q * max_k
        mask_base = _bh_ptr(MASK, b, h, stride_mb, stride_mh, WIDE_OFFSETS)
        pad_base = PAD + _wide(b, WIDE_OFFSETS) * stride_pb
        seed_bh = seed + b * (H_KV * GROUP) + h
        slope = tl.load(SLOPES + b * stride_ab + h) if ALIBI else 0.0
        for check in tl.static_range(2):  # the unchecked run, then the checked rest
            if (check == 1) | (ROTARY_DIM == 0):  # no unchecked run with RoPE (see _unchecked_range)
                dk, dv = _dkdv_blocks(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, dmask_base, lo, run_lo, run_hi, hi, offs_m0, offs_n,
                    offs_dv, q_len, k_len, diag, rot_off, COS, SIN, stride_rot, stride_qm, stride_dom, stride_lm,
                    window_left, window_right, scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope,
                    seed_bh, max_k, drop_threshold, drop_scale, Q_DESC, DO_DESC, b, h, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                    BLOCK_DV, BLOCK_M, BLOCK_N, ACC_DTYPE, DOT_PRECISION, UPCAST, USE_WINDOW, SOFTCAP, MASK_KIND,
                    HAS_PADDING, DROPOUT, ALIBI, RAW_SCORES, ROTARY_DIM, INTERLEAVED, check == 1, MASK_GRAD, USE_TMA)
    dk = dk * scale
    tl.store(_bh_ptr(DK, b, kvh, stride_dkb, stride_dkh, WIDE_OFFSETS) + (k_start + offs_n[:, None]) * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_inside)
    tl.store(_bh_ptr(DV, b, kvh, stride_dvb, stride_dvh, WIDE_OFFSETS) + (k_start + offs_n[:, None]) * stride_dvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=v_inside)


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, k_base, v_base, lo, run_lo, run_hi, hi, offs_m, offs_n0, offs_dv, q_len, k_len, diag,
    rot_off, COS, SIN, stride_rot, stride_kn, stride_vn, window_left, window_right, scale, softcap, mask_base,
    stride_mm, stride_mn, pad_base, slope, seed_bh, max_k, drop_threshold, drop_scale, K_DESC, V_DESC, b, kvh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_PADDING: tl.constexpr, DROPOUT: tl.constexpr, ALIBI: tl.constexpr, RAW_SCORES: tl.constexpr,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, CHECK_BOUNDS: tl.constexpr, USE_TMA: tl.constexpr,
    LOOK_AHEAD: tl.constexpr = False,
):
    """dQ (unscaled) accumulated over the checked key blocks or the unchecked run
    (USE_TMA: K and V through their descriptors, as in _fwd_blocks). LOOK_AHEAD:
    each block's dO V^T is issued during the block before (after that block's
    dP - delta is taken, so the running product can take its registers), and
    runs on the tensor cores beside that block's exponentials, as the forward's
    look-ahead q k^T (flash_attention_forward._fwd_run_pipelined); the last
    block's look-ahead reloads it (a clamped index)."""
    count, before = _block_count(lo, run_lo, run_hi, hi, BLOCK_N, CHECK_BOUNDS)
    if LOOK_AHEAD:
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
        if count > 0:
            first = _block_start(0, before, lo, run_lo, run_hi, BLOCK_N, CHECK_BOUNDS)
            v = _value_tile(v_base, first + offs_n0, first, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V,
                               BLOCK_DV, BLOCK_N, CHECK_BOUNDS, USE_TMA)
            dp = _dot(do, tl.trans(v), dp, DOT_PRECISION, UPCAST)
    for j in range(0, count):
        n_start = _block_start(j, before, lo, run_lo, run_hi, BLOCK_N, CHECK_BOUNDS)
        offs_n = n_start + offs_n0
        if USE_TMA:
            k = K_DESC.load([b, kvh, n_start, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = _load_rows(k_base, offs_n, stride_kn, offs_n < k_len, offs_n + rot_off, COS, SIN, stride_rot, 1.0,
                           HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED, ACC_DTYPE, CHECK_BOUNDS)
        if not LOOK_AHEAD:
            v = _value_tile(v_base, offs_n, n_start, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V,
                               BLOCK_DV, BLOCK_N, CHECK_BOUNDS, USE_TMA)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        if LOOK_AHEAD:  # this block's dO V^T came from the block before
            dpd = _dp_minus_delta(dp, delta, offs_m, offs_n, seed_bh, max_k, drop_threshold, drop_scale, DROPOUT)
            ahead = _block_start(tl.minimum(j + 1, count - 1), before, lo, run_lo, run_hi, BLOCK_N, CHECK_BOUNDS)
            v = _value_tile(v_base, ahead + offs_n0, ahead, offs_dv, stride_vn, k_len, V_DESC, b, kvh, HEAD_DIM_V,
                               BLOCK_DV, BLOCK_N, CHECK_BOUNDS, USE_TMA)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
        s, t = _tile_scores(qk, offs_m[:, None], offs_n[None, :], q_len, k_len, diag, window_left, window_right,
                            scale, softcap, mask_base, stride_mm, stride_mn, pad_base, slope,
                            USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, ALIBI, RAW_SCORES, CHECK_BOUNDS)
        p = tl.exp2(s * _score_scale(scale, RAW_SCORES) - lse[:, None] * LOG2E)
        if not LOOK_AHEAD:
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_PRECISION, UPCAST)
            dpd = _dp_minus_delta(dp, delta, offs_m, offs_n, seed_bh, max_k, drop_threshold, drop_scale, DROPOUT)
        ds = p * dpd
        if SOFTCAP:
            ds = ds * (1 - t * t)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION, UPCAST)
    return dq


@triton.jit
def _dp_minus_delta(dp, delta, offs_m, offs_n, seed_bh, max_k, drop_threshold, drop_scale, DROPOUT: tl.constexpr):
    """dP - delta of a tile, dP through the dropout mask (dropped entries 0, kept ones scaled)."""
    if DROPOUT:
        keep = _dropout_keep(seed_bh, offs_m[:, None], offs_n[None, :], drop_threshold)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    return dp - delta[:, None]


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, PAD, SLOPES, COS, SIN, ROT_OFF, CU_Q, CU_K, K_DESC, V_DESC,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, stride_lm, stride_dqb, stride_dqh, stride_dqm,
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
        stride_dom = tl.cast(stride_dom, tl.int64)
        stride_dqm = tl.cast(stride_dqm, tl.int64)
    if USE_TMA:  # as in _attn_fwd
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
    q_inside = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    rot_off = tl.load(ROT_OFF + b) if ROTARY_DIM > 0 else 0
    q = _load_rows(_bh_ptr(Q, b, h, stride_qb, stride_qh, WIDE_OFFSETS) + q_start * stride_qm, offs_m, stride_qm, offs_m < q_len,
                   offs_m + diag + rot_off, COS, SIN, stride_rot, 1.0, HEAD_DIM, BLOCK_D, ROTARY_DIM, INTERLEAVED,
                   ACC_DTYPE)
    do = tl.load(_bh_ptr(DO, b, h, stride_dob, stride_doh, WIDE_OFFSETS) + (q_start + offs_m[:, None]) * stride_dom + offs_dv[None, :],
                 mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < HEAD_DIM_V), other=0)
    stat_ptrs = _bh_offset(b, h, stride_lb, stride_lh, WIDE_OFFSETS) + (q_start + offs_m) * stride_lm
    lse = tl.load(LSE + stat_ptrs, mask=offs_m < q_len, other=0)
    lse = tl.where(lse == float("-inf"), 0.0, lse).to(ACC_DTYPE)
    delta = tl.load(DELTA + stat_ptrs, mask=offs_m < q_len, other=0).to(ACC_DTYPE)
    k_base = _bh_ptr(K, b, kvh, stride_kb, stride_kh, WIDE_OFFSETS) + k_start * stride_kn
    v_base = _bh_ptr(V, b, kvh, stride_vb, stride_vh, WIDE_OFFSETS) + k_start * stride_vn
    mask_base = _bh_ptr(MASK, b, h, stride_mb, stride_mh, WIDE_OFFSETS)
    seed_bh = seed + b * H + h
    slope = tl.load(SLOPES + b * stride_ab + h) if ALIBI else 0.0
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    lo, run_lo, run_hi, hi = _key_blocks(m0, q_len, k_len, diag, window_left, window_right, BLOCK_M, BLOCK_N,
                                         USE_WINDOW, ROTARY_DIM)
    # The unchecked run, then the checked rest (check = 0, 1); with LOOK_AHEAD the other way round
    # (check = 1, 0), as the forward's: run first, its loop drew ptxas's C7515 (tensor cores serialized).
    for check in tl.static_range(LOOK_AHEAD * 1, 2 - 3 * LOOK_AHEAD, 1 - 2 * LOOK_AHEAD):
        if (check == 1) | (ROTARY_DIM == 0):  # no unchecked run with RoPE (see _unchecked_range)
            dq = _dq_blocks(
                dq, q, do, lse, delta, k_base, v_base, lo, run_lo, run_hi, hi, offs_m, offs_n0, offs_dv, q_len, k_len,
                diag, rot_off, COS, SIN, stride_rot, stride_kn, stride_vn, window_left, window_right, scale, softcap,
                mask_base, stride_mm, stride_mn, PAD + _wide(b, WIDE_OFFSETS) * stride_pb, slope, seed_bh, max_k, drop_threshold,
                drop_scale, K_DESC, V_DESC, b, kvh, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                ACC_DTYPE, DOT_PRECISION, UPCAST, USE_WINDOW, SOFTCAP, MASK_KIND, HAS_PADDING, DROPOUT, ALIBI,
                RAW_SCORES, ROTARY_DIM, INTERLEAVED, check == 1, USE_TMA, LOOK_AHEAD & (check == 0))
    dq = dq * scale
    tl.store(_bh_ptr(DQ, b, h, stride_dqb, stride_dqh, WIDE_OFFSETS) + (q_start + offs_m[:, None]) * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_inside)


@triton.jit
def _dropout_keep_mask_kernel(OUT, H, max_q, max_k, seed, drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the dropout keep mask (B, H, max_q, max_k) as uint8: for tests."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed + pid_bh, offs_m[:, None], offs_n[None, :], drop_threshold)
    ptrs = OUT + pid_bh * max_q * max_k + offs_m[:, None] * max_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < max_q) & (offs_n[None, :] < max_k))


