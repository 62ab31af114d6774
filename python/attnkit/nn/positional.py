"""Positional encodings: RotaryEmbedding (RoPE tables + attnkit.ops.apply_rotary),
ALiBi slopes for attnkit.ops.flash_attention, the sinusoidal encoding of
Vaswani et al. and learned absolute position embeddings (BERT, GPT-2, OPT).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops.rotary import apply_rotary

_SCALINGS = {None: None, "default": None, "linear": "linear", "dynamic": "dynamic_ntk", "dynamic_ntk": "dynamic_ntk",
             "yarn": "yarn"}


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer) with cached cos/sin tables, numerically as
    Hugging Face's LlamaRotaryEmbedding (rope_type default, linear, dynamic, yarn).

    Args:
        dim: rotary dim R (even); heads of size D >= R rotate their first R dims.
        base: rope_theta.
        scaling: None, "linear" (positions / factor), "dynamic_ntk" (base grows with the
            longest sequence seen past max_position_embeddings, statefully as HF's
            `dynamic_rope_update`) or "yarn" (also HF's names "default", "dynamic").
        scaling_factor: HF's rope_parameters["factor"]; for yarn None means
            max_position_embeddings / original_max_position_embeddings.
        max_position_embeddings, original_max_position_embeddings (yarn, default
            max_position_embeddings), beta_fast, beta_slow, mscale, mscale_all_dim,
            attention_factor, truncate: as HF's rope_parameters.
        interleaved: rotate pairs (2i, 2i + 1) (GPT-J) instead of halves (Llama, GPT-NeoX).

    Tables are float32, computed on first use per (device, dtype) and grown on demand.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: Optional[str] = None,
                 scaling_factor: Optional[float] = 1.0, max_position_embeddings: int = 2048,
                 original_max_position_embeddings: Optional[int] = None, beta_fast: float = 32.0,
                 beta_slow: float = 1.0, mscale: Optional[float] = None, mscale_all_dim: Optional[float] = None,
                 attention_factor: Optional[float] = None, truncate: bool = True, interleaved: bool = False,
                 device=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim (the rotary dim) must be an even int >= 2, got {dim!r}")
        if scaling not in _SCALINGS:
            raise ValueError(f"RotaryEmbedding: scaling must be one of None, 'linear', 'dynamic_ntk', 'yarn', "
                             f"got {scaling!r}")
        self.scaling = _SCALINGS[scaling]
        if self.scaling is not None and not (scaling_factor is None and self.scaling == "yarn"):
            if not isinstance(scaling_factor, (int, float)) or scaling_factor <= 0:
                raise ValueError(f"RotaryEmbedding: scaling_factor must be a positive number, got {scaling_factor!r}")
        for name, flag in (("interleaved", interleaved), ("truncate", truncate)):
            if not isinstance(flag, bool):
                raise TypeError(f"RotaryEmbedding: {name} must be a bool, got {type(flag).__name__}")
        self.dim, self.base, self.factor, self.interleaved = dim, base, scaling_factor, interleaved
        self.max_position_embeddings = max_position_embeddings
        self.original_max_position_embeddings = original_max_position_embeddings or max_position_embeddings
        self.yarn_options = dict(beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
                                 attention_factor=attention_factor, truncate=truncate)
        inv_freq, self.attention_scaling = self._initial_inv_freq()
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self._dynamic_len = max_position_embeddings  # HF's max_seq_len_cached
        self._tables: Dict[Tuple[torch.device, torch.dtype], Tuple[Tensor, Tensor]] = {}

    def _exponents(self) -> Tensor:
        return torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim

    def _initial_inv_freq(self) -> Tuple[Tensor, float]:
        """HF's rope init functions (modeling_rope_utils), operation for operation so
        that the float32 rounding, and so the tables, are the same."""
        if self.scaling is None:
            return 1.0 / (self.base ** self._exponents()), 1.0
        if self.scaling == "linear":
            return 1.0 / (self.base ** self._exponents()) / self.factor, 1.0
        if self.scaling == "dynamic_ntk":
            length = self.max_position_embeddings
            base = self.base * ((self.factor * length / length) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
            return 1.0 / (base ** self._exponents()), 1.0
        return self._yarn()

    def _dynamic_inv_freq(self, seq_len: int) -> Tensor:
        # HF passes seq_len as a tensor here, so the new base is computed in float32.
        seq = torch.tensor(max(seq_len, self.max_position_embeddings))
        base = self.base * ((self.factor * seq / self.max_position_embeddings) - (self.factor - 1)) ** (
            self.dim / (self.dim - 2))
        return 1.0 / (base ** self._exponents())

    def _yarn(self) -> Tuple[Tensor, float]:
        o = self.yarn_options
        original = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else self.max_position_embeddings / original

        def mscale_of(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = o["attention_factor"]
        if attention is None:
            if o["mscale"] and o["mscale_all_dim"]:
                attention = float(mscale_of(factor, o["mscale"]) / mscale_of(factor, o["mscale_all_dim"]))
            else:
                attention = mscale_of(factor)

        def correction_dim(rotations):  # the dim whose wavelength makes `rotations` turns over `original`
            return (self.dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(self.base))

        low, high = correction_dim(o["beta_fast"] or 32), correction_dim(o["beta_slow"] or 1)
        if o["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        if low == high:
            high += 0.001  # as HF: avoids dividing by zero
        ramp = torch.clamp((torch.arange(self.dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = self.base ** (torch.arange(0, self.dim, 2).float() / self.dim)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, attention

    def _apply(self, fn, recurse=True):
        # Recomputed after every move or cast: to_empty (meta-device construction) leaves this
        # non-persistent buffer uninitialized, and no state_dict refills it.
        module = super()._apply(fn, recurse)
        self.inv_freq = refilled(self.inv_freq, self._inv_freq_now())
        self._tables.clear()
        return module

    def _inv_freq_now(self) -> Tensor:
        if self.scaling == "dynamic_ntk" and self._dynamic_len > self.max_position_embeddings:
            return self._dynamic_inv_freq(self._dynamic_len)
        return self._initial_inv_freq()[0]

    def _inv_freq_fp32(self) -> Tensor:
        """inv_freq, recomputed when a module-wide .half()/.bfloat16() has rounded the buffer."""
        if self.inv_freq.dtype == torch.float32:
            return self.inv_freq
        return self._inv_freq_now()

    def _update_dynamic(self, seq_len: int) -> None:
        """HF's dynamic_frequency_update: grow past the longest length seen, reset to the
        original frequencies for a sequence shorter than max_position_embeddings."""
        previous = self._dynamic_len
        if seq_len > previous:
            self.inv_freq = self._dynamic_inv_freq(seq_len).to(self.inv_freq.device)
            self._dynamic_len = seq_len
            self._tables.clear()
        if seq_len < self.max_position_embeddings and previous > self.max_position_embeddings:
            self.inv_freq = self._initial_inv_freq()[0].to(self.inv_freq.device)
            self._dynamic_len = self.max_position_embeddings
            self._tables.clear()

    def cos_sin(self, seq_len: int, device=None, dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """cos, sin tables (seq_len, dim / 2) for positions 0..seq_len-1, attention scaling included
        (HF's forward returns them repeated twice along the last dim)."""
        device = torch.device(device) if device is not None else self.inv_freq.device
        if self.inv_freq.is_meta and device.type != "meta":
            # load_state_dict(assign=True) after meta-device construction refills no computed buffer
            self.inv_freq = self._inv_freq_now().to(device)
        if self.scaling == "dynamic_ntk":
            self._update_dynamic(seq_len)
        if not torch.compiler.is_compiling():  # dynamo cannot read _version; a graph is made for one inv_freq
            # inv_freq replaced or edited in place (HF's rotary modules read it at every call): new tables.
            source = (self.inv_freq, None if self.inv_freq.is_inference() else self.inv_freq._version)
            if getattr(self, "_tables_source", None) is None or self._tables_source[0] is not source[0] or \
                    self._tables_source[1] != source[1]:
                self._tables.clear()
                self._tables_source = source
        key = (device, dtype)
        cached = self._tables.get(key)
        # Tables made under inference_mode cannot be saved for a backward later: remake them.
        # (Dynamo cannot trace is_inference(); a compiled graph builds no inference tensors.)
        stale = (cached is not None and not torch.compiler.is_compiling() and cached[0].is_inference()
                 and not torch.is_inference_mode_enabled())
        if cached is None or stale or cached[0].shape[0] < seq_len:
            length = max(seq_len, 2 * cached[0].shape[0] if cached is not None else 0)
            positions = torch.arange(length, device=device, dtype=torch.float32)
            freqs = positions[:, None] * self._inv_freq_fp32().to(device)[None, :]
            scale = self.attention_scaling
            self._tables[key] = ((freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype))
        cos, sin = self._tables[key]
        return cos[:seq_len], sin[:seq_len]

    def forward(self, q: Tensor, k: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                seqlen_offset: Union[int, Tensor] = 0, layout: str = "bnhd", cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """(q, k) rotated by attnkit.ops.apply_rotary (k may have fewer heads, or be None).

        q, k: (B, N, H, D), or (B, H, N, D) with layout="bhnd" (HF's), or packed (total, H, D)
        with cu_seqlens and max_seqlen (as flash_attention_varlen). Positions are
        position_ids (B, N) or (N,) when given (any values, as HF's), else n + seqlen_offset
        (an int or a (B,) int tensor, as a KV cache gives). Reading the largest position costs
        a device sync for tensor positions (needed to size the tables, and for dynamic NTK).
        """
        if not isinstance(q, Tensor):
            raise TypeError(f"RotaryEmbedding: q must be a torch.Tensor, got {type(q).__name__}")
        length = max_seqlen if cu_seqlens is not None else q.shape[2 if layout == "bhnd" else 1]
        if position_ids is not None:
            if cu_seqlens is not None:
                raise ValueError("RotaryEmbedding: position_ids are for dense q/k; packed q/k take seqlen_offset")
            self._check_position_ids(position_ids, q.shape[0], length)
            if position_ids.dim() == 2 and position_ids.shape[0] == 1:
                position_ids = position_ids[0]  # shared by the batch: one (N, R/2) table
            (cos, sin), offsets = self._cos_sin_at(position_ids.to(q.device)), 0
        else:
            longest = int(seqlen_offset.max()) if isinstance(seqlen_offset, Tensor) else seqlen_offset
            cos, sin = self.cos_sin(longest + length, q.device)
            offsets = seqlen_offset
        rotate = lambda t: apply_rotary(t, cos, sin, interleaved=self.interleaved, seqlen_offsets=offsets,  # noqa: E731
                                        layout=layout, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return rotate(q), None if k is None else rotate(k)

    def _cos_sin_at(self, position_ids: Tensor) -> Tuple[Tensor, Tensor]:
        """cos, sin of the given positions, (*position_ids.shape, dim / 2)."""
        low, high = torch.stack(torch.aminmax(position_ids)).tolist()  # one sync for both
        if low >= 0:
            cos, sin = self.cos_sin(high + 1, position_ids.device)
            return cos[position_ids], sin[position_ids]
        # Negative positions rotate the other way (HF computes every id's angles); the table
        # holds 0.. only, where indexing would wrap around.
        if self.scaling == "dynamic_ntk":
            self._update_dynamic(max(high + 1, 1))
        freqs = position_ids.float()[..., None] * self._inv_freq_fp32().to(position_ids.device)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    @staticmethod
    def _check_position_ids(position_ids, batch: int, length: int) -> None:
        if not isinstance(position_ids, Tensor) or position_ids.is_floating_point() or position_ids.is_complex():
            raise TypeError(f"RotaryEmbedding: position_ids must be an integer tensor, got "
                            f"{getattr(position_ids, 'dtype', type(position_ids).__name__)}")
        if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != length or (
                position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
            raise ValueError(f"RotaryEmbedding: position_ids must be ({length},) or (B or 1, {length}) with B = "
                             f"{batch}, got shape {tuple(position_ids.shape)}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scaling={self.scaling}, factor={self.factor}"


def refilled(buffer: Optional[Tensor], values: Tensor) -> Optional[Tensor]:
    """`values` where `buffer` is (device, dtype): a computed buffer after Module._apply, which
    to_empty leaves uninitialized (None stays None)."""
    return None if buffer is None else values.to(device=buffer.device, dtype=buffer.dtype)


def alibi_slopes(n_heads: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """ALiBi's head slopes (Press et al.): 2^(-8 i / n) for i = 1..n when n is a power of two;
    otherwise those of the nearest lower power of two p, then every other slope of 2p
    (the paper's reference code, HF BLOOM's build_alibi_tensor). (n_heads,) float32."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be a positive int, got {n_heads!r}")

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64).to(device=device, dtype=dtype)


class ALiBi(nn.Module):
    """ALiBi slopes as a (non-persistent) buffer: `flash_attention(q, k, v, alibi_slopes=alibi())`.

    The bias of query i and key j is -slope * |j - (i + diag)|, diag = Nk - Nq (bottom-right,
    as FlashAttention; for causal attention this is the paper's -slope * (i - j))."""

    def __init__(self, n_heads: int, device=None):
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("slopes", alibi_slopes(n_heads, device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.slopes = refilled(self.slopes, alibi_slopes(self.n_heads))  # as RotaryEmbedding's inv_freq
        return module

    def forward(self, batch_size: Optional[int] = None) -> Tensor:
        """The slopes, (H,) or expanded to (batch_size, H)."""
        return self.slopes if batch_size is None else self.slopes.expand(batch_size, self.n_heads)

    def bias(self, q_len: int, k_len: int, bottom_right: bool = True) -> Tensor:
        """The (H, q_len, k_len) float32 bias, for attention that takes an additive mask."""
        diag = k_len - q_len if bottom_right else 0
        rel = torch.arange(k_len, device=self.slopes.device)[None, :] - (
            torch.arange(q_len, device=self.slopes.device)[:, None] + diag)
        return -self.slopes[:, None, None] * rel.abs().to(self.slopes.dtype)[None]

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}"


class SinusoidalPositionalEncoding(nn.Module):
    """x + PE then dropout, PE(pos, 2i) = sin(pos / 10000^(2i / d)), PE(pos, 2i + 1) = cos(...)
    (Vaswani et al.), as the PyTorch transformer tutorial's PositionalEncoding, with the same
    `pe` buffer (max_len, 1, d_model). x is (N, B, d_model), or (B, N, d_model) with batch_first;
    `offset` shifts the positions (incremental decoding). The table is computed in float64 and
    stored in `dtype` (default: torch's default dtype): computed in a bfloat16 default dtype,
    positions and angles lost their low bits (sin/cos off by up to 2); reset_parameters()
    refills it (after meta-device construction and to_empty)."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.1, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.batch_first = batch_first
        self.register_buffer("pe", torch.empty(max_len, 1, d_model, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        max_len, _, d_model = self.pe.shape
        if self.pe.is_meta:
            return
        f64 = dict(dtype=torch.float64, device="cpu")  # float64: not every device has it
        position = torch.arange(max_len, **f64).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, **f64) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model, **f64)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term[: d_model // 2])  # odd d_model: one cos fewer
        with torch.no_grad():
            self.pe.copy_(pe)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        # A 2-D x would broadcast against the (N, 1, d_model) table into an (N, N, d_model) result.
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.pe.shape[-1]:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SinusoidalPositionalEncoding: x must be "
                             f"{'(B, N' if self.batch_first else '(N, B'}, d_model={self.pe.shape[-1]}), got {got}")
        seq_dim = 1 if self.batch_first else 0
        length = x.shape[seq_dim]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"SinusoidalPositionalEncoding: offset must be an int >= 0, got {offset!r}")
        if offset + length > self.pe.shape[0]:
            raise ValueError(f"SinusoidalPositionalEncoding: positions up to {offset + length} exceed max_len = "
                             f"{self.pe.shape[0]}; build it with a larger max_len")
        pe = self.pe[offset:offset + length]
        return self.dropout(x + (pe.transpose(0, 1) if self.batch_first else pe))


class LearnedPositionalEmbedding(nn.Embedding):
    """A learned table of absolute positions (BERT's position_embeddings, GPT-2's wpe), an
    nn.Embedding whose state_dict is `weight`. `offset` reserves that many leading rows
    (OPT stores positions at index + 2); `padding_idx` as nn.Embedding."""

    def __init__(self, num_positions: int, dim: int, offset: int = 0, padding_idx: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__(num_positions + offset, dim, padding_idx=padding_idx, device=device, dtype=dtype)
        self.num_positions, self.offset = num_positions, offset

    def forward(self, input: Tensor, past_length: int = 0, position_ids: Optional[Tensor] = None) -> Tensor:
        """Embeddings of positions past_length .. past_length + N - 1, (1, N, dim), for an input
        (B, N, ...) such as input_ids; or of position_ids (B, N) when given, (B, N, dim)."""
        if not isinstance(input, Tensor):
            raise TypeError(f"LearnedPositionalEmbedding: input must be a torch.Tensor, got {type(input).__name__}")
        if position_ids is None:
            length = input.shape[1] if input.dim() > 1 else input.shape[0]
            if isinstance(past_length, bool) or not isinstance(past_length, int) or past_length < 0:
                raise ValueError(f"LearnedPositionalEmbedding: past_length must be an int >= 0, got {past_length!r}")
            if past_length + length > self.num_positions:
                raise ValueError(f"LearnedPositionalEmbedding: positions up to {past_length + length} exceed "
                                 f"num_positions = {self.num_positions}")
            position_ids = torch.arange(past_length, past_length + length, device=self.weight.device)[None]
        return super().forward(position_ids + self.offset)
