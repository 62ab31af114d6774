"""Shared pieces of the property tests: example budgets per profile and the attention
problem strategy. (tests/property has no __init__.py: pytest puts it on sys.path.)"""
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from hypothesis import settings
from hypothesis import strategies as st

LONG = os.environ.get("ATTNKIT_HYPOTHESIS", "default") == "long"


def examples(n: int) -> settings:
    """n examples in the default profile, 20 n in the long one (other settings from the profile)."""
    return settings(max_examples=n * 20 if LONG else n)


seeds = st.integers(0, 2**31 - 1)

# Head dims: 1, odd-ish multiples of 8 (24, 40: not a power of two), the common 64.
HEAD_DIMS = (1, 2, 3, 8, 16, 24, 40, 64)


@dataclass(frozen=True)
class AttentionProblem:
    batch: int
    heads_kv: int
    group: int  # q heads per k/v head (GQA/MQA)
    n_q: int
    n_k: int
    dim: int
    dim_v: int
    causal: bool
    window: Tuple[int, int]
    softcap: float
    scale: Optional[float]
    alibi: str  # "", "heads" (H,), "batch" (B, H)
    mask: str  # "", "bool", "float" (with -inf entries), "bool-2d"
    mask_batch: bool  # mask has a batch dim (else 1, broadcast)
    mask_heads: bool
    dead_rows: Tuple[int, ...]  # query rows whose mask hides every key
    key_lengths: Optional[Tuple[int, ...]]  # key_padding_mask: keys >= length are padding (0: whole entry)
    seed: int
    rotary: str = ""  # fused RoPE: "", "half", "interleaved"
    rotary_dim: int = 0
    rotary_offsets: str = ""  # "int" (one offset) or "tensor" (one per sequence)

    @property
    def heads(self) -> int:
        return self.heads_kv * self.group

    def inputs(self, dtype, device="cpu"):
        """(q, k, v, flash_attention kwargs) drawn from `seed`."""
        gen = torch.Generator().manual_seed(self.seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

        q = randn(self.batch, self.heads, self.n_q, self.dim)
        k = randn(self.batch, self.heads_kv, self.n_k, self.dim)
        v = randn(self.batch, self.heads_kv, self.n_k, self.dim_v)
        kwargs = dict(causal=self.causal, window_size=self.window, softcap=self.softcap, scale=self.scale)
        if self.mask:
            shape = (self.n_q, self.n_k) if self.mask == "bool-2d" else (
                self.batch if self.mask_batch else 1, self.heads if self.mask_heads else 1, self.n_q, self.n_k)
            keep = torch.rand(*shape, generator=gen) > 0.3
            keep[..., list(self.dead_rows), :] = False
            if self.mask == "float":  # hidden keys at -inf, the rest a random additive bias
                mask = torch.randn(*shape, generator=gen, dtype=torch.float64).masked_fill(~keep, float("-inf"))
                kwargs["attn_mask"] = mask.to(dtype=dtype, device=device)
            else:
                kwargs["attn_mask"] = keep.to(device)
        if self.key_lengths is not None:
            lengths = torch.tensor(self.key_lengths)
            kwargs["key_padding_mask"] = (torch.arange(self.n_k)[None, :] >= lengths[:, None]).to(device)
        if self.rotary:  # tables long enough for the last key at the largest offset
            offsets = torch.randint(0, 5, (self.batch,), generator=gen, dtype=torch.int32)
            angles = torch.rand(self.n_k + 5, self.rotary_dim // 2, generator=gen, dtype=torch.float64) * 6.3
            kwargs.update(rotary_cos=angles.cos().to(dtype=dtype, device=device),
                          rotary_sin=angles.sin().to(dtype=dtype, device=device),
                          rotary_interleaved=self.rotary == "interleaved",
                          rotary_seqlen_offsets=offsets.to(device) if self.rotary_offsets == "tensor" else int(offsets[0]))
        if self.alibi == "heads":
            kwargs["alibi_slopes"] = torch.rand(self.heads, generator=gen).to(device)
        elif self.alibi == "batch":
            kwargs["alibi_slopes"] = torch.rand(self.batch, self.heads, generator=gen).to(device)
        return q, k, v, kwargs


@st.composite
def attention_problems(draw, max_batch=3, max_kv_heads=2, max_group=3, max_n=40, dims=HEAD_DIMS, rotary=True,
                       max_n_q=None):
    batch = draw(st.integers(1, max_batch))
    n_q, n_k = draw(st.integers(1, max_n_q or max_n)), draw(st.integers(1, max_n))
    dim = draw(st.sampled_from(dims))
    side = st.integers(-1, max_n)
    mask = draw(st.sampled_from(["", "", "bool", "float", "bool-2d"]))
    return AttentionProblem(
        batch=batch, heads_kv=draw(st.integers(1, max_kv_heads)), group=draw(st.integers(1, max_group)),
        n_q=n_q, n_k=n_k, dim=dim, dim_v=draw(st.one_of(st.just(dim), st.sampled_from(dims))),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.just((-1, -1)), st.tuples(side, side))),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 50.0])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        alibi=draw(st.sampled_from(["", "", "heads", "batch"])),
        mask=mask, mask_batch=draw(st.booleans()), mask_heads=draw(st.booleans()),
        dead_rows=tuple(draw(st.sets(st.integers(0, n_q - 1), max_size=2))) if mask else (),
        key_lengths=draw(st.one_of(st.none(), st.tuples(*[st.integers(0, n_k)] * batch))),
        seed=draw(seeds),
        # Fused RoPE (bottom-right) needs non-negative query positions: Nq <= Nk.
        **(dict(rotary=draw(st.sampled_from(["", "", "half", "interleaved"])),
                rotary_dim=2 * draw(st.integers(1, dim // 2)), rotary_offsets=draw(st.sampled_from(["int", "tensor"])))
           if rotary and dim >= 2 and n_q <= n_k else {}),
    )
