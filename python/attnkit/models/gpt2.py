"""GPT-2 (Radford et al. 2019) on attnkit, Hugging Face `GPT2LMHeadModel` compatible,
with KV-cache generation.

Full sequences (training, scoring, the prompt of `generate`) are unpadded (packing.Packing)
and run through causal flash_attention_varlen. Generation writes each prompt's real tokens
to the front of a preallocated cache (so left or right padding leaves no holes in it), then
decodes one token per step with attention_decode against the ragged cache lengths.
Parameter names follow transformers (as nanoGPT does), in nn.Linear layout: GPT-2's Conv1D
weights are transposed on load and save.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import _autocast
from ..nn.linear import Linear
from ..ops import attention_decode, flash_attention_varlen
from ..ops.attention_validation import cu_seqlens_checked_once
from . import decode_graph
from .common import activation, check_ids, check_length
from .loading import PretrainedMixin
from .packing import Packing


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # default 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # init_weights: the std of a model built from this config

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")

    @staticmethod
    def normalize(config: dict) -> dict:
        if config.get("add_cross_attention"):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention) is not supported")
        return config

    def to_hf(self, architecture: str) -> dict:
        return {**self.__dict__, "model_type": "gpt2", "architectures": [architecture]}


class KVCache:
    """Preallocated keys/values (n_layer, B, H, max_len, D), updated in place; `lengths` (B,)
    int32 counts the valid slots of each row (rows are ragged)."""

    def __init__(self, config: GPT2Config, batch: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len = max_len


class DecodeSlots(NamedTuple):
    """Where a decode step's new tokens go, computed once for every layer: `lengths` (B,) int32,
    the valid cache lengths after the step; `rows` arange(B); `offsets[i]` (B,) int64, the slot
    of new token i in each row."""

    lengths: Tensor
    rows: Tensor
    offsets: Tuple[Tensor, ...]

    @classmethod
    def after(cls, cache: "KVCache", n: int) -> "DecodeSlots":
        lengths = cache.lengths + n
        first = lengths.long() - n
        return cls(lengths, torch.arange(lengths.shape[0], device=lengths.device), tuple(first + i for i in range(n)))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float) -> Tensor:
    """q (B, H, n, D), the newest n tokens of each row, already in the caches (B, H, N_max, D)
    whose valid lengths (int32 (B,)) include them; query i of row b sees keys j <= lengths[b] - n + i."""
    return attention_decode(q, k_cache, v_cache, lengths, scale=scale)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.layer_idx, self.dropout_p = config.n_head, layer_idx, config.attn_pdrop
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        head_dim = config.n_embd // config.n_head
        self.scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x: Tensor, packing: Optional[Packing], cache: Optional[KVCache], slots) -> Tensor:
        """x: packed (total, C) with `packing`, or (B, n, C) new tokens when decoding from `cache`.
        slots: where the new keys go in the cache, (rows, offsets) for packed tokens, or
        DecodeSlots when decoding."""
        c = x.shape[-1]
        q, k, v = self.c_attn(x).view(*x.shape[:-1], 3, self.n_head, c // self.n_head).unbind(-3)
        if packing is not None:
            if cache is not None:  # prompt: each row's real tokens fill its first cache slots
                rows, offsets = slots
                cache.k[self.layer_idx, rows, :, offsets] = k.to(cache.k.dtype)  # autocast's k may differ
                cache.v[self.layer_idx, rows, :, offsets] = v.to(cache.v.dtype)
            y = flash_attention_varlen(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                       packing.max_seqlen, causal=True, scale=self.scale,
                                       dropout_p=self.dropout_p if self.training else 0.0)
        else:
            for i, offsets in enumerate(slots.offsets):  # decode: write the new keys at each row's own length
                cache.k[self.layer_idx, slots.rows, :, offsets] = k[:, i].to(cache.k.dtype)
                cache.v[self.layer_idx, slots.rows, :, offsets] = v[:, i].to(cache.v.dtype)
            q = q.to(cache.k.dtype)  # the cache's dtype: SDPA would cast all three to autocast's
            y = decode_attention(q.transpose(1, 2), cache.k[self.layer_idx], cache.v[self.layer_idx], slots.lengths,
                                 self.scale).transpose(1, 2)
        return self.resid_dropout(self.c_proj(y.reshape(*x.shape[:-1], c)))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        inner = config.n_inner or 4 * config.n_embd
        self.c_fc = Linear(config.n_embd, inner)
        self.c_proj = Linear(inner, config.n_embd)
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, packing, cache, slots) -> Tensor:
        x = x + self.attn(self.ln_1(x), packing, cache, slots)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(PretrainedMixin, nn.Module):
    """GPT-2 decoder stack (transformers' GPT2Model: same state_dict keys, outputs to float rounding) on
    attnkit attention, with a KV cache for decoding. Build from a GPT2Config, or from_pretrained / from_hf."""

    config_class, model_type, base_prefix = GPT2Config, "gpt2", "transformer."

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self._init_own_weights()

    def _init_extra(self, std: float) -> None:
        # GPT-2's scheme, as transformers': the residual projections scaled by 1 / sqrt(2 n_layer).
        for block in self.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.normal_(0.0, std / math.sqrt(2 * self.config.n_layer))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N); attention_mask (B, N) 1 = token, 0 = padding; position_ids default
        0..N-1 as transformers' forward (pass cumsum(mask) - 1 for left padding, as generate does).
        Returns the final hidden states (B, N, C), zeros at padding."""
        packing = Packing.for_ids(input_ids, attention_mask)
        return packing.unpack(self.forward_packed(input_ids, packing, position_ids))

    def forward_packed(self, input_ids: Tensor, packing: Packing, position_ids: Optional[Tensor] = None,
                       cache: Optional[KVCache] = None) -> Tensor:
        """Hidden states of the real tokens, packed (total, C); fills `cache` when given."""
        batch, length = self._check(input_ids, position_ids)
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)
        pack = lambda t: packing.pack(t.expand(batch, length))  # noqa: E731
        x = self.drop(self.wte(pack(input_ids)) + self.wpe(pack(position_ids)))
        slots = None
        if cache is not None:
            slots = (packing.rows(), packing.offsets())
            cache.lengths.copy_(packing.cu_seqlens.diff())
        with cu_seqlens_checked_once():  # the blocks share packing.cu_seqlens: read it once
            for block in self.h:
                x = block(x, packing, cache, slots)
        return self.ln_f(x)

    def forward_decode(self, input_ids: Tensor, cache: KVCache) -> Tensor:
        """New tokens (B, n) after what `cache` holds; position of row b's token i is
        cache.lengths[b] + i. Returns hidden states (B, n, C) and advances cache.lengths."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        n = input_ids.shape[1]
        longest = int((cache.lengths + n).max())
        if longest > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens; this step needs {longest}")
        self._check(input_ids, self._positions(cache, n))
        return self.decode_unchecked(input_ids, cache)

    def decode_unchecked(self, input_ids: Tensor, cache: KVCache) -> Tensor:
        """forward_decode without its checks, which read the tokens' and the cache's values (three
        syncs with a GPU a step, and none allowed in a CUDA graph): for callers whose tokens come
        from the model's own logits and whose cache has room (generate)."""
        slots = DecodeSlots.after(cache, input_ids.shape[1])
        x = self.drop(self.wte(input_ids) + self.wpe(self._positions(cache, input_ids.shape[1])))
        for block in self.h:
            x = block(x, None, cache, slots)
        cache.lengths.copy_(slots.lengths)
        return self.ln_f(x)

    @staticmethod
    def _positions(cache: KVCache, n: int) -> Tensor:
        return (cache.lengths[:, None] + torch.arange(n, device=cache.lengths.device)).long()

    def _check(self, input_ids: Tensor, position_ids: Optional[Tensor]) -> Tuple[int, int]:
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        if position_ids is None:
            check_length(input_ids.shape[1], cfg.n_positions, "n_positions")
        else:
            check_ids("position_ids", position_ids, cfg.n_positions, "n_positions: sequence longer than the position table")
        return input_ids.shape

    def hf_config(self) -> dict:
        return self.config.to_hf(type(self).__name__)

    def hf_mapping(self, prefix: str = "") -> Tuple[Dict[str, List[str]], List[str], List[str]]:
        """(ours -> HF names, our names whose HF tensor is transposed (Conv1D), HF keys ignored)."""
        mapping = {name: [prefix + name] for name, _ in self.named_parameters()}
        transposed = [name for name in mapping if name.endswith(".weight") and ".c_" in name]
        # attn.bias / attn.masked_bias: causal-mask buffers older checkpoints saved.
        return mapping, transposed, [r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"]


class GPT2LMHeadModel(PretrainedMixin, nn.Module):
    """GPT2Model with the tied language-model head and generate() (greedy or sampled, KV-cached)."""

    config_class, model_type, base_prefix = GPT2Config, "gpt2", "transformer."

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._init_own_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        """Logits (B, N, vocab_size); zeros at padding (the head runs on real tokens only)."""
        packing = Packing.for_ids(input_ids, attention_mask)
        return packing.unpack(self.lm_head(self.transformer.forward_packed(input_ids, packing, position_ids)))

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: Optional[int] = 50, top_p: Optional[float] = None, eos_token_id: EosIds = None,
                 attention_mask: Optional[Tensor] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = False) -> Tensor:
        """The prompts followed by up to max_new_tokens tokens, (B, N + new), as transformers'
        generate, with its defaults: eos_token_id (an id or a list of ids) and pad_token_id default
        to the config's (pad then to the first eos id; () stops at no token); rows that emitted an
        eos id continue with the pad, and generation stops early once every row has. Sampling
        keeps the top_k = 50 most likely tokens unless told otherwise (None or 0: all).
        Prompts of different lengths: pad them (left, as transformers expects, or right) and pass
        attention_mask.
        cuda_graph: on a GPU, replay each decode step from a CUDA graph recorded at the first
        (one host call a token instead of ~14 launches a layer; decode_graph.py). Not yet run
        on a GPU, hence off by default."""
        steps = list(self.stream(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                                 attention_mask, pad_token_id, generator, cuda_graph))
        return torch.cat([input_ids] + [t[:, None] for t in steps], dim=1)

    @torch.no_grad()
    def stream(self, input_ids: Tensor, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
               top_k: Optional[int] = 50, top_p: Optional[float] = None, eos_token_id: EosIds = None,
               attention_mask: Optional[Tensor] = None, pad_token_id: Optional[int] = None,
               generator: Optional[torch.Generator] = None, cuda_graph: bool = False) -> Iterator[Tensor]:
        """generate() one step at a time: yields the next token of every row, (B,)."""
        if cuda_graph and input_ids.device.type != decode_graph._DEVICE_TYPE:
            raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, got {input_ids.device}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(do_sample, temperature, top_k, top_p)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else token_ids("eos_token_id", eos)  # a config may have none
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        pad = token_ids("pad_token_id", pad)[0] if pad is not None else (eos[0] if eos else 0)
        packing = Packing.for_ids(input_ids, attention_mask)
        batch, length = input_ids.shape
        lengths = packing.cu_seqlens.diff()
        if int(lengths.min()) == 0:
            raise ValueError("every prompt needs at least one token (a row of attention_mask is all 0)")
        # The last new token is never fed back: it needs no position and no cache slot.
        longest = int(lengths.max()) + max(max_new_tokens - 1, 0)
        check_length(longest, self.config.n_positions, "n_positions", what="prompt + max_new_tokens - 1 =")
        # Under autocast the keys come in its dtype (c_attn is a Linear): the cache holds them so.
        dtype = _autocast.lower_precision_dtype(input_ids.device.type) or self.lm_head.weight.dtype
        cache = KVCache(self.config, batch, longest, input_ids.device, dtype)
        # Positions count real tokens only, as transformers' generate (cumsum of the mask).
        position_ids = None if packing.index is None else (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.transformer.forward_packed(input_ids, packing, position_ids, cache)
        logits = self.lm_head(hidden[packing.cu_seqlens[1:].long() - 1])  # each row's last real token
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        eos_tensor = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        # The cache has room for every step and the tokens come from our own logits: no checks.
        decode = lambda token: self.lm_head(self.transformer.decode_unchecked(token[:, None], cache)[:, -1])  # noqa: E731
        decode = decode_graph.GraphedStep(decode) if cuda_graph else decode
        for step in range(max_new_tokens):
            token = next_token(logits.float(), do_sample, temperature, top_k, top_p, generator)
            if eos:
                token = token.masked_fill(done, pad)
                done |= torch.isin(token, eos_tensor)
            yield token
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            logits = decode(token)

    def hf_config(self) -> dict:
        return self.config.to_hf(type(self).__name__)

    def hf_mapping(self):
        mapping, transposed, ignored = self.transformer.hf_mapping("transformer.")
        mapping = {"transformer." + k: v for k, v in mapping.items()}
        transposed = ["transformer." + k for k in transposed]
        if not self.config.tie_word_embeddings:  # tied: lm_head is wte, which transformers does not save twice
            mapping["lm_head.weight"] = ["lm_head.weight"]
            ignored = ignored[:-1]
        return mapping, transposed, ignored


EosIds = Union[int, Sequence[int], None]


def token_ids(name: str, ids: Union[int, Sequence[int]]) -> List[int]:
    """An id or a list of ids (transformers' generation configs hold either) as a list."""
    ids = [ids] if isinstance(ids, numbers.Integral) and not isinstance(ids, bool) else ids
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                     for i in ids):
        raise TypeError(f"{name} must be a token id or a list of them, got {ids!r}")
    return [int(i) for i in ids]


def check_sampling(do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """transformers' checks of its logits warpers' arguments (0 or None turn top_k off, 1 or None top_p)."""
    if do_sample and not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: no top-k filtering), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 <= top_p <= 1):
        raise ValueError(f"top_p must be a number in [0, 1] (1 or None: no nucleus filtering), got {top_p!r}")


def next_token(logits: Tensor, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
               generator: Optional[torch.Generator]) -> Tensor:
    """(B, V) logits -> (B,) tokens: argmax, or a sample after temperature, top-k and top-p
    (nucleus) filtering, in that order, as transformers' logits warpers."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending: drop the low tail whose mass is <= 1 - top_p
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
