"""The one validator of attention arguments, shared by the dense and varlen ops
and so by every backend: errors name the argument and say what was expected,
before any kernel runs."""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import ContextManager, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _validate
from ..backends.attention import MAX_HEAD_DIM

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _same_dtype_device(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    _validate.same_dtype_and_device(op, [("q", q), ("k", k), ("v", v)])


def check_head_dims(op: str, q: Tensor, k: Tensor, v: Tensor, names: Sequence[str] = ("q", "k", "v")) -> None:
    nq, nk, nv = names
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: {nq} and {nk} must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    for name, dim in ((f"{nq}/{nk}", q.shape[-1]), (nv, v.shape[-1])):
        if dim < 1:
            raise ValueError(f"{op}: head dim of {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
        if dim > MAX_HEAD_DIM:  # the kernels hold a row of q and of the output in registers
            raise NotImplementedError(f"{op}: head dim of {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}: "
                                      f"larger head dims are not implemented")


def check_heads(op: str, heads_q: int, heads_k: int, heads_v: int, names: Sequence[str] = ("q", "k", "v")) -> None:
    nq, nk, nv = names
    if heads_k != heads_v:
        raise ValueError(f"{op}: {nk} and {nv} must have the same number of heads, got {heads_k} and {heads_v}")
    if heads_q == 0:  # kernels index head 0; nothing to compute is still a caller mistake worth naming
        raise ValueError(f"{op}: {nq} must have at least one head, got 0")
    if heads_k == 0 or heads_q % heads_k != 0:
        raise ValueError(f"{op}: {nq} heads ({heads_q}) must be a multiple of {nk}/{nv} heads ({heads_k}) for GQA/MQA")


def window(op: str, window_size: Sequence[int],
           names: Tuple[str, str] = ("window_size left", "window_size right")) -> Tuple[int, int]:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{op}: window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = window_size
    for name, side in zip(names, (left, right)):
        if isinstance(side, bool) or not isinstance(side, int) or side < -1:
            raise ValueError(f"{op}: {name} must be an int >= -1 (-1 = unbounded), got {side!r}")
    # A side no sequence reaches is unbounded: every backend then sees -1 (a side near 2^63 overflowed
    # the cpp kernel's key ranges into an empty window, and 2^63 did not fit its int64 argument).
    return tuple(-1 if side >= _UNBOUNDED_FROM else int(side) for side in (left, right))


_UNBOUNDED_FROM = 2**31


def flags(op: str, **named) -> None:
    """TypeError for a flag that is not a bool (a string such as "no" is truthy)."""
    for name, flag in named.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {type(flag).__name__}")


def _real(op: str, name: str, value, expected: str) -> float:
    """value as a float: any real number (numpy's too) or a one-element tensor, as torch's SDPA takes."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and (value.is_floating_point() or
                                                                     value.dtype in _INTEGER_DTYPES):
        value = value.item()  # a host read of a GPU tensor, as torch's own
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be {expected}, got {type(value).__name__}")
    return float(value)


_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def scalars(op: str, softcap: float, scale: Optional[float], dropout_p: float, head_dim: int) -> Tuple[float, float, float]:
    softcap = _real(op, "softcap", softcap, "a float")
    dropout_p = _real(op, "dropout_p", dropout_p, "a float")
    if not 0 <= softcap < math.inf:  # NaN too
        raise ValueError(f"{op}: softcap must be finite and >= 0 (0 = off), got {softcap}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:  # finite; symbolic under torch.compile(dynamic=True), where math.isfinite fails
        scale = head_dim**-0.5
    else:
        scale = _real(op, "scale", scale, "a float or None")
        if not math.isfinite(scale):
            raise ValueError(f"{op}: scale must be finite, got {scale}")
    return float(softcap), float(scale), float(dropout_p)


def _well_formed_dense(q, k, v) -> bool:
    """The usual dense call in a few comparisons (1.5 us against the named checks' 5): plain
    tensors, 4-D, one floating dtype and device, one batch, k and v alike, the heads dividing,
    head dims in 1..MAX_HEAD_DIM. False sends the call through the named checks."""
    if type(q) not in _validate.PLAIN_TENSORS or type(k) not in _validate.PLAIN_TENSORS:
        return False
    if type(v) not in _validate.PLAIN_TENSORS:
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4 or q.dtype not in FLOAT_DTYPES:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    heads_kv = ks[1]
    return (ks[0] == qs[0] and vs[0] == qs[0] and vs[1] == heads_kv and vs[2] == ks[2] and ks[3] == qs[3]
            and 0 < heads_kv and 0 < qs[1] and qs[1] % heads_kv == 0
            and 1 <= qs[3] <= MAX_HEAD_DIM and 1 <= vs[3] <= MAX_HEAD_DIM)


def dense(op: str, q, k, v, attn_mask, key_padding_mask) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Checks dense (B, H, N, D) inputs; returns the masks ready for the kernels:
    attn_mask expanded (as a view) to (B, H, Nq, Nk), key_padding_mask bool (B, Nk)."""
    if not _well_formed_dense(q, k, v):
        for name, t in (("q", q), ("k", k), ("v", v)):
            _validate.tensor(op, name, t, ndim=4, dtypes=FLOAT_DTYPES)
        _same_dtype_device(op, q, k, v)
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: q, k, v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, "
                             f"{v.shape[0]}")
        if v.shape[2] != k.shape[2]:
            raise ValueError(f"{op}: k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
        check_heads(op, q.shape[1], k.shape[1], v.shape[1])
        check_head_dims(op, q, k, v)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    target = (batch, heads, n_q, n_k)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{op}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{op}: attn_mask must be bool (True = attend) or floating (added to scores), got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise RuntimeError(f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            if attn_mask.dim() > 4 or _validate.broadcast_shapes(attn_mask.shape, target) != target:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(
                f"{op}: attn_mask of shape {tuple(attn_mask.shape)} cannot broadcast to (B, H, Nq, Nk) = {target}"
            ) from None
        if attn_mask.requires_grad and attn_mask.dtype in (torch.float16, torch.bfloat16):
            # The gradient, summed back over the broadcast dims by the expand's backward, sums in
            # float32 then, and is rounded once (as SDPA's), not per (B, H, Nq, Nk) element.
            attn_mask = attn_mask.float()
        attn_mask = attn_mask.expand(target)
    if key_padding_mask is not None:
        _validate.tensor(op, "key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        if tuple(key_padding_mask.shape) != (batch, n_k):
            raise ValueError(
                f"{op}: key_padding_mask must have shape (B, Nk) = {(batch, n_k)} (True = padding), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise RuntimeError(f"{op}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    return attn_mask, key_padding_mask


def varlen(op: str, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    """Checks packed (total, H, D) inputs and their int32 cu_seqlens."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(op, name, t, ndim=3, dtypes=FLOAT_DTYPES)
    _same_dtype_device(op, q, k, v)
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: k and v must have the same total length, got {k.shape[0]} and {v.shape[0]}")
    check_heads(op, q.shape[1], k.shape[1], v.shape[1])
    check_head_dims(op, q, k, v)
    cus = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for name, cu, _, max_seqlen in cus:
        _validate.tensor(op, name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.device != q.device:
            raise RuntimeError(f"{op}: {name} is on {cu.device} but q is on {q.device}")
        if cu.numel() < 2:
            raise ValueError(f"{op}: {name} must have batch + 1 >= 2 entries, got {cu.numel()}")
        max_name = name.replace("cu_seqlens", "max_seqlen")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise TypeError(f"{op}: {max_name} must be a non-negative int, got {max_seqlen!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same batch, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} entries")
    if torch.compiler.is_compiling():  # reading values syncs; skipped when traced
        return
    seen = getattr(_checked_once, "seen", None)
    if seen is not None:
        # Keyed by identity: each entry holds its two tensors, so their ids stay theirs for the block.
        ids = (id(cu_seqlens_q), id(cu_seqlens_k))
        state = (_version(cu_seqlens_q), _version(cu_seqlens_k), q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
        entry = seen.get(ids)
        if entry is not None and entry[2] == state:
            return
    values = _read_cu_seqlens(cu_seqlens_q, cu_seqlens_k)
    batch_plus_1 = cu_seqlens_q.numel()
    for (name, _, total, max_seqlen), part in zip(cus, (values[:batch_plus_1], values[-batch_plus_1:])):
        if part[0] != 0 or part[-1] != total:
            raise ValueError(f"{op}: {name} must start at 0 and end at the packed length {total}, got {part[0]}..{part[-1]}")
        lengths = [b - a for a, b in zip(part[:-1], part[1:])]
        if min(lengths) < 0:
            raise ValueError(f"{op}: {name} must be non-decreasing, got {part}")
        if max(lengths) > max_seqlen:
            max_name = name.replace("cu_seqlens", "max_seqlen")
            raise ValueError(f"{op}: {max_name} = {max_seqlen} is smaller than the longest sequence ({max(lengths)})")
    if seen is not None:
        seen[ids] = (cu_seqlens_q, cu_seqlens_k, state)


def _version(t: Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version  # inference tensors keep no version


def _read_cu_seqlens(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> List[int]:
    """Both tensors' values in one transfer (one GPU sync), or the one tensor self-attention passes twice."""
    if cu_seqlens_k is cu_seqlens_q:
        return cu_seqlens_q.tolist()
    return torch.cat((cu_seqlens_q, cu_seqlens_k)).tolist()


_checked_once = threading.local()


def cu_seqlens_checked_once() -> ContextManager[None]:
    """Inside the block, varlen calls do not read again cu_seqlens tensors whose values an
    earlier call of the block checked (the same tensors with the same totals and max_seqlen,
    and the same version where they keep one: inference tensors do not, so the block must
    not change them in place). For a model's layers, which pass the one tensor the model
    built: each read is a GPU sync, 12 a forward for BERT-base. A compiled graph reads none:
    there the block is a null one (dynamo before torch 2.7 cannot trace a generator's)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _checked_once_block()


@contextlib.contextmanager
def _checked_once_block() -> Iterator[None]:
    previous = getattr(_checked_once, "seen", None)
    _checked_once.seen = {}
    try:
        yield
    finally:
        _checked_once.seen = previous


def alibi(op: str, slopes: Optional[Tensor], batch: int, heads: int, device) -> Optional[Tensor]:
    """ALiBi slopes (H,) or (B, H), fp32, as FlashAttention; returned as (B, H) contiguous."""
    if slopes is None:
        return None
    _validate.tensor(op, "alibi_slopes", slopes, dtypes=(torch.float32,))
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"{op}: alibi_slopes must have shape (H,) = ({heads},) or (B, H) = {(batch, heads)}, got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise RuntimeError(f"{op}: alibi_slopes is on {slopes.device} but q is on {device}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{op}: gradients with respect to alibi_slopes are not implemented; pass alibi_slopes.detach()")
    return slopes.expand(batch, heads).contiguous()


def rotary(op: str, cos: Optional[Tensor], sin: Optional[Tensor], offsets, head_dim: int, batch: int,
           lengths_q: Sequence[int], lengths_k: Sequence[int], bottom_right: bool, device):
    """Fused-RoPE tables and offsets: returns (cos, sin, offsets int32 (B,)) or Nones.
    `lengths_q/k` are the sequence lengths (one pair per sequence) used to bound positions."""
    if cos is None and sin is None:
        return None, None, None
    if cos is None or sin is None:
        raise ValueError(f"{op}: pass both rotary_cos and rotary_sin, or neither")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        _validate.tensor(op, name, t, ndim=2, dtypes=FLOAT_DTYPES)
        if t.device != device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but q is on {device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{op}: gradients with respect to {name} are not implemented; pass {name}.detach()")
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ValueError(f"{op}: rotary_cos and rotary_sin must match, got {tuple(cos.shape)} {cos.dtype} and "
                         f"{tuple(sin.shape)} {sin.dtype}")
    rotary_dim = 2 * cos.shape[1]
    if not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"{op}: rotary_cos has shape (positions, rotary_dim / 2) = {tuple(cos.shape)}, so rotary_dim = "
                         f"{rotary_dim}, which must be between 2 and the head dim {head_dim}")
    if isinstance(offsets, bool) or not isinstance(offsets, (int, Tensor)):
        raise TypeError(f"{op}: rotary_seqlen_offsets must be an int or an int32 tensor (B,), got {type(offsets).__name__}")
    if isinstance(offsets, int):
        if not -2**31 <= offsets < 2**31:
            raise ValueError(f"{op}: rotary_seqlen_offsets must fit in int32, got {offsets}")
        offsets = torch.full((batch,), offsets, dtype=torch.int32, device=device)
    else:
        _validate.tensor(op, "rotary_seqlen_offsets", offsets, ndim=1, dtypes=(torch.int32,))
        if offsets.shape[0] != batch or offsets.device != device:
            raise ValueError(f"{op}: rotary_seqlen_offsets must be ({batch},) int32 on {device}, got "
                             f"{tuple(offsets.shape)} on {offsets.device}")
    if not torch.compiler.is_compiling():
        for b, (n_q, n_k, offset) in enumerate(zip(lengths_q, lengths_k, offsets.tolist())):
            first_q = offset + (n_k - n_q if bottom_right else 0)
            if offset < 0 or (n_q > 0 and first_q < 0):
                raise ValueError(f"{op}: fused RoPE needs non-negative positions; sequence {b} has Nq = {n_q} > Nk = "
                                 f"{n_k} with bottom-right alignment and offset {offset}")
            last = max(offset + n_k, first_q + n_q) - 1
            if last >= cos.shape[0]:
                raise ValueError(f"{op}: rotary_cos/rotary_sin cover {cos.shape[0]} positions but sequence {b} reaches "
                                 f"position {last}")
    return cos.contiguous(), sin.contiguous(), offsets.contiguous()
