"""RNN encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015) on attnkit's
LSTM/GRU and attention modules.

- Encoder: embedding -> bidirectional attnkit.nn.LSTM/GRU (hidden_size // 2 per direction,
  so its outputs and the concatenated final states have the decoder's size hidden_size).
  Padded sources are packed: no step runs on padding, and each row's final state is the
  state at its own length.
- Decoder, one step (Luong's flow; the attention's score function is configurable):
  x = [embed(y_prev); h~_prev] (input feeding) -> stacked attnkit.nn.LSTMCell/GRUCell ->
  top state h -> (context, weights) = attention(h, encoder outputs, source mask) ->
  h~ = tanh(W_c [context; h]) -> logits = W_out h~.
  The decoder starts from the encoder's final states (forward and backward concatenated).
- Training: `forward(src, tgt_input)` with teacher forcing, `loss(src, tgt)` shifts for you.
- Decoding: `greedy_decode` and `beam_search` (batched, length-normalized), padded sources.

Sources are right-padded (B, S) token ids; `src_mask` (B, S) bool, True = real token,
defaults to `src != pad_token_id`. Call `model.eval()` before decoding (dropout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..nn import GRU, LSTM, BahdanauAttention, GRUCell, LSTMCell, LuongAttention
from .common import check_ids

ATTENTIONS = ("bahdanau", "dot", "general", "concat")


@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    embedding_size: int = 256
    hidden_size: int = 256  # decoder state; the encoder has hidden_size // 2 per direction
    num_layers: int = 1  # encoder and decoder alike (layer l of the decoder starts from layer l of the encoder)
    rnn_type: str = "lstm"  # "lstm" or "gru"
    attention: str = "bahdanau"  # "bahdanau" (additive), or Luong's "dot", "general", "concat"
    attention_size: Optional[int] = None  # inside the tanh of "bahdanau"/"concat"; default hidden_size
    dropout: float = 0.0
    input_feeding: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    max_decode_length: int = 100  # default max_len of greedy_decode / beam_search

    def __post_init__(self):
        for name in ("src_vocab_size", "tgt_vocab_size", "embedding_size", "hidden_size", "num_layers",
                     "max_decode_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Seq2SeqConfig: {name} must be a positive int, got {value!r}")
        if self.hidden_size % 2:
            raise ValueError(f"Seq2SeqConfig: hidden_size must be even (the bidirectional encoder has "
                             f"hidden_size // 2 per direction), got {self.hidden_size}")
        if self.rnn_type not in ("lstm", "gru"):
            raise ValueError(f"Seq2SeqConfig: rnn_type must be 'lstm' or 'gru', got {self.rnn_type!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Seq2SeqConfig: attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig: dropout must be in [0, 1), got {self.dropout!r}")
        ids = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}
        if not 0 <= self.pad_token_id < self.src_vocab_size:
            raise ValueError(f"Seq2SeqConfig: pad_token_id must be in [0, src_vocab_size={self.src_vocab_size}) "
                             f"too (it pads the sources), got {self.pad_token_id}")
        for name, value in ids.items():
            if not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"Seq2SeqConfig: {name} must be in [0, tgt_vocab_size={self.tgt_vocab_size}), "
                                 f"got {value}")
        if len(set(ids.values())) != 3:
            raise ValueError(f"Seq2SeqConfig: pad, bos and eos token ids must differ, got {ids}")


class Seq2SeqOutput(NamedTuple):
    logits: Tensor  # (B, T, tgt_vocab_size)
    attentions: Tensor  # (B, T, S): each target step's weights over the source


class BeamSearchOutput(NamedTuple):
    sequences: Tensor  # (B, K, L) token ids, best first; pad after eos
    scores: Tensor  # (B, K) sum of log-probs / length ** length_penalty, descending
    lengths: Tensor  # (B, K) generated tokens, eos included


class Seq2Seq(nn.Module):
    """RNN encoder-decoder with attention (see the module docstring): forward/loss with teacher
    forcing, greedy_decode and beam_search. Built from a Seq2SeqConfig."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = c = config
        rnn, cell = (LSTM, LSTMCell) if c.rnn_type == "lstm" else (GRU, GRUCell)
        self.src_embed = nn.Embedding(c.src_vocab_size, c.embedding_size, padding_idx=c.pad_token_id)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.embedding_size, padding_idx=c.pad_token_id)
        self.encoder = rnn(c.embedding_size, c.hidden_size // 2, num_layers=c.num_layers, bidirectional=True,
                           batch_first=True, dropout=c.dropout if c.num_layers > 1 else 0.0)
        first_input = c.embedding_size + (c.hidden_size if c.input_feeding else 0)
        self.decoder_cells = nn.ModuleList(
            [cell(first_input if layer == 0 else c.hidden_size, c.hidden_size) for layer in range(c.num_layers)])
        if c.attention == "bahdanau":
            self.attention = BahdanauAttention(c.hidden_size, c.hidden_size, c.attention_size)
        else:
            size = c.attention_size if c.attention == "concat" else None
            self.attention = LuongAttention(c.hidden_size, c.hidden_size, c.attention, size)
        self.combine = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)  # W_c of h~ = tanh(W_c [ctx; h])
        self.out = nn.Linear(c.hidden_size, c.tgt_vocab_size)
        self.dropout = nn.Dropout(c.dropout)

    # -- encoder -------------------------------------------------------------------------------

    def _source_mask(self, src: Tensor, src_mask: Optional[Tensor]) -> Tensor:
        check_ids("src", src, self.config.src_vocab_size, "src_vocab_size")
        if src.dim() != 2 or src.shape[1] == 0:
            raise ValueError(f"src must be (batch, length) with length >= 1, got shape {tuple(src.shape)}")
        if src_mask is None:
            src_mask = src != self.config.pad_token_id
        elif not isinstance(src_mask, Tensor) or src_mask.dtype != torch.bool:
            raise TypeError("src_mask must be a bool tensor (True = real token)")
        elif src_mask.shape != src.shape:
            raise ValueError(f"src_mask must have src's shape {tuple(src.shape)}, got {tuple(src_mask.shape)}")
        lengths = src_mask.sum(1)
        if int(lengths.min()) == 0:
            raise ValueError("every source needs at least one real token (a row of src_mask is all False)")
        positions = torch.arange(src.shape[1], device=src.device)
        if not torch.equal(src_mask, positions < lengths[:, None]):
            raise ValueError("sources must be right-padded: each row of src_mask is True then False")
        return src_mask

    def encode(self, src: Tensor, src_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, List]:
        """Returns (encoder outputs (B, S, H), source mask (B, S), initial decoder state:
        a list over layers of h (B, H) or (h, c) for LSTM)."""
        mask = self._source_mask(src, src_mask)
        embedded = self.dropout(self.src_embed(src))
        packed = pack_padded_sequence(embedded, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
        outputs, final = self.encoder(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=src.shape[1])

        def per_layer(state):  # (L * 2, B, H / 2) -> (L, B, H): forward and backward concatenated
            return state.view(self.config.num_layers, 2, *state.shape[1:]).transpose(1, 2).flatten(2)

        if self.config.rnn_type == "lstm":
            hs, cs = per_layer(final[0]), per_layer(final[1])
            state = [(hs[layer], cs[layer]) for layer in range(self.config.num_layers)]
        else:
            hs = per_layer(final)
            state = [hs[layer] for layer in range(self.config.num_layers)]
        return outputs, mask, state

    # -- decoder -------------------------------------------------------------------------------

    def project_memory(self, memory: Tensor) -> Optional[Tensor]:
        """The encoder states projected for additive attention, once per source (None for the
        multiplicative scores): every decode_step would otherwise redo this GEMM."""
        additive = isinstance(self.attention, BahdanauAttention) or self.attention.score == "concat"
        return self.attention.project_keys(memory) if additive else None

    def decode_step(self, tokens: Tensor, state: List, feed: Tensor, memory: Tensor, mask: Tensor,
                    projected_memory: Optional[Tensor] = None):
        """One decoder step for tokens (B,): returns (logits (B, V), new state, h~ (B, H), weights (B, S)).
        projected_memory: `project_memory(memory)`, or None to project here."""
        x = self.dropout(self.tgt_embed(tokens))
        if self.config.input_feeding:
            x = torch.cat([x, feed], dim=1)
        new_state = []
        for layer, cell in enumerate(self.decoder_cells):
            s = cell(x, state[layer])
            new_state.append(s)
            top = s[0] if isinstance(s, tuple) else s
            x = self.dropout(top) if layer + 1 < len(self.decoder_cells) else top
        kwargs = {} if projected_memory is None else {"projected_keys": projected_memory}
        context, weights = self.attention(top, memory, mask=mask, **kwargs)
        attended = torch.tanh(self.combine(torch.cat([context, top], dim=1)))
        return self.out(self.dropout(attended)), new_state, attended, weights

    def forward(self, src: Tensor, tgt_input: Tensor, src_mask: Optional[Tensor] = None) -> Seq2SeqOutput:
        """Teacher forcing: tgt_input (B, T) is the target shifted right (bos first)."""
        self._check_target("tgt_input", tgt_input, src)
        memory, mask, state = self.encode(src, src_mask)
        projected = self.project_memory(memory)
        feed = memory.new_zeros(src.shape[0], self.config.hidden_size)
        logits, attentions = [], []
        for t in range(tgt_input.shape[1]):
            step_logits, state, feed, weights = self.decode_step(tgt_input[:, t], state, feed, memory, mask, projected)
            logits.append(step_logits)
            attentions.append(weights)
        return Seq2SeqOutput(torch.stack(logits, 1), torch.stack(attentions, 1))

    def _check_target(self, name: str, tokens: Tensor, src: Tensor) -> None:
        check_ids(name, tokens, self.config.tgt_vocab_size, "tgt_vocab_size")
        if tokens.dim() != 2 or tokens.shape[1] == 0 or not isinstance(src, Tensor) or tokens.shape[0] != src.shape[0]:
            raise ValueError(f"{name} must be (batch, length) with length >= 1 and src's batch "
                             f"{src.shape[0] if isinstance(src, Tensor) else '?'}, got shape {tuple(tokens.shape)}")

    def loss(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None) -> Tensor:
        """Mean cross-entropy over the real target tokens; tgt (B, T) ends each row with eos,
        then pad_token_id. The decoder reads bos + tgt[:, :-1] (teacher forcing)."""
        c = self.config
        self._check_target("tgt", tgt, src)
        bos = torch.full_like(tgt[:, :1], c.bos_token_id)
        logits = self(src, torch.cat([bos, tgt[:, :-1]], dim=1), src_mask).logits
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=c.pad_token_id)

    def _max_len(self, max_len: Optional[int]) -> int:
        max_len = self.config.max_decode_length if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        return max_len

    def _never_generated_ids(self) -> List[int]:
        """pad and bos: only padding and the decoder's first input, never an output (as fairseq)."""
        c = self.config
        return sorted({c.pad_token_id, c.bos_token_id} - {c.eos_token_id})

    def _never_generated(self, logits: Tensor) -> Tensor:
        blocked = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        blocked[self._never_generated_ids()] = True
        return blocked

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_mask: Optional[Tensor] = None, max_len: Optional[int] = None,
                      return_attention: bool = False):
        """Most likely token at each step until every row has produced eos or max_len tokens.
        Returns tokens (B, L) (pad after eos), and with return_attention also the weights (B, L, S)."""
        c, max_len = self.config, self._max_len(max_len)
        memory, mask, state = self.encode(src, src_mask)
        batch = src.shape[0]
        tokens = torch.full((batch,), c.bos_token_id, dtype=torch.long, device=src.device)
        feed = memory.new_zeros(batch, c.hidden_size)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        out, attentions = [], []
        projected = self.project_memory(memory)
        for _ in range(max_len):
            logits, state, feed, weights = self.decode_step(tokens, state, feed, memory, mask, projected)
            tokens = logits.masked_fill(self._never_generated(logits), float("-inf")).argmax(-1)
            tokens = tokens.masked_fill(finished, c.pad_token_id)
            out.append(tokens)
            attentions.append(weights)
            finished |= tokens == c.eos_token_id
            if bool(finished.all()):
                break
        tokens = torch.stack(out, 1)
        return (tokens, torch.stack(attentions, 1)) if return_attention else tokens

    @torch.no_grad()
    def beam_search(self, src: Tensor, src_mask: Optional[Tensor] = None, beam_size: int = 4,
                    max_len: Optional[int] = None, length_penalty: float = 1.0) -> BeamSearchOutput:
        """Batched beam search. Hypotheses are ranked by sum of log-probs / length ** length_penalty
        (length counts eos; 0 = no normalization). A hypothesis that produces eos stays in the beam
        with its score frozen, extended by pad at no cost; the search ends when every beam of every
        row has finished or after max_len tokens. beam_size=1 is greedy decoding token for token."""
        c, max_len = self.config, self._max_len(max_len)
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
        choices = c.tgt_vocab_size - len(self._never_generated_ids())
        if beam_size > choices:
            raise ValueError(f"beam_size {beam_size} exceeds the {choices} tokens a step can produce "
                             f"(tgt_vocab_size {c.tgt_vocab_size} without pad and bos)")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or not (
                0 <= length_penalty < float("inf")):
            raise ValueError(f"length_penalty must be a number >= 0, got {length_penalty!r}")
        memory, mask, state = self.encode(src, src_mask)
        batch, k, vocab, device = src.shape[0], beam_size, c.tgt_vocab_size, src.device
        # Beam b of row r is row r * k + b of every per-hypothesis tensor.
        memory, mask = memory.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        state = _map_state(state, lambda t: t.repeat_interleave(k, 0))
        feed = memory.new_zeros(batch * k, c.hidden_size)
        tokens = torch.full((batch * k,), c.bos_token_id, dtype=torch.long, device=device)
        stat = torch.float64 if memory.dtype == torch.float64 else torch.float32  # scores accumulate in this
        scores = torch.full((batch, k), float("-inf"), dtype=stat, device=device)
        scores[:, 0] = 0.0  # one live hypothesis at first, so the k beams do not start as copies
        lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
        finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
        history = torch.empty(batch, k, 0, dtype=torch.long, device=device)
        frozen = torch.full((vocab,), float("-inf"), dtype=stat, device=device)
        frozen[c.pad_token_id] = 0.0  # a finished hypothesis's only continuation
        offsets = torch.arange(batch, device=device)[:, None] * k
        projected = self.project_memory(memory)
        for _ in range(max_len):
            logits, state, feed, _ = self.decode_step(tokens, state, feed, memory, mask, projected)
            log_probs = torch.log_softmax(logits.to(stat), dim=-1).masked_fill(self._never_generated(logits), float("-inf"))
            log_probs = log_probs.view(batch, k, vocab)
            log_probs = torch.where(finished[..., None], frozen, log_probs)
            candidates = scores[..., None] + log_probs  # (batch, k, vocab)
            candidate_lengths = lengths + (~finished).long()
            normalized = candidates / candidate_lengths[..., None].to(stat) ** length_penalty
            _, index = normalized.view(batch, k * vocab).topk(k, dim=1)
            beam, token = index // vocab, index % vocab
            scores = candidates.view(batch, k * vocab).gather(1, index)
            lengths = candidate_lengths.gather(1, beam)
            finished = finished.gather(1, beam) | (token == c.eos_token_id)
            history = torch.cat([history.gather(1, beam[..., None].expand_as(history)), token[..., None]], dim=2)
            rows = (beam + offsets).view(-1)
            state = _map_state(state, lambda t: t.index_select(0, rows))
            feed, tokens = feed.index_select(0, rows), token.view(-1)
            if bool(finished.all()):
                break
        final = scores / lengths.to(stat) ** length_penalty
        final, order = final.sort(dim=1, descending=True)
        return BeamSearchOutput(history.gather(1, order[..., None].expand_as(history)), final,
                                lengths.gather(1, order))


def _map_state(state: List, fn) -> List:
    return [tuple(fn(t) for t in s) if isinstance(s, tuple) else fn(s) for s in state]
