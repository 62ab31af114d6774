"""BERT (Devlin et al. 2018) on attnkit, Hugging Face `BertModel` compatible.

A padded batch is unpadded once (packing.Packing): embeddings, every layer and the
attention (flash_attention_varlen) run on the real tokens only, and the output is re-padded
with zeros at the end, as in FlashAttention's BERT. Positions are those of the padded input
(0..N-1, or position_ids), as transformers computes them, so results match it on real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..ops import flash_attention_varlen
from ..ops.attention_validation import cu_seqlens_checked_once
from .common import activation, check_ids, check_length
from .loading import PretrainedMixin
from .packing import Packing


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2  # BertForSequenceClassification
    classifier_dropout: Optional[float] = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # init_weights: the std of a model built from this config

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    @staticmethod
    def normalize(config: dict) -> dict:
        """A transformers config.json as our fields; refuses the BERT variants this model is not."""
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {config['position_embedding_type']!r} is not supported "
                             f"(only 'absolute')")
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise ValueError("decoder BERT (is_decoder / add_cross_attention) is not supported")
        config = dict(config)
        if "id2label" in config:  # transformers stores num_labels as the label names
            config["num_labels"] = len(config["id2label"])
        return config

    def to_hf(self, architecture: str) -> dict:
        fields = {k: v for k, v in self.__dict__.items() if k != "num_labels"}
        labels = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        return {**fields, "model_type": "bert", "architectures": [architecture], "position_embedding_type": "absolute",
                "id2label": labels, "label2id": {v: int(k) for k, v in labels.items()}}


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        return self.dropout(self.ln(x))


class BertLayer(nn.Module):
    """Post-norm encoder layer on packed tokens (total, C)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config.hidden_size
        self.n_head, self.attn_dropout = config.num_attention_heads, config.attention_probs_dropout_prob
        self.qkv = nn.Linear(c, 3 * c)  # HF's query, key, value fused: one GEMM
        self.attn_out = nn.Linear(c, c)
        self.ln_attn = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.fc_in = nn.Linear(c, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, c)
        self.ln_out = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.act = activation(config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        total, c = x.shape
        q, k, v = self.qkv(x).view(total, 3, self.n_head, c // self.n_head).unbind(1)
        if packing.keys is not None:  # tokens that are queries only (BertModel.forward's pooled pads)
            k, v = k.index_select(0, packing.keys), v.index_select(0, packing.keys)
        cu_seqlens_k, max_seqlen_k = packing.key_lengths()
        a = flash_attention_varlen(q, k, v, packing.cu_seqlens, cu_seqlens_k, packing.max_seqlen, max_seqlen_k,
                                   dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.ln_attn(x + self.dropout(self.attn_out(a.reshape(total, c))))
        return self.ln_out(x + self.dropout(self.fc_out(self.act(self.fc_in(x)))))


class BertModel(PretrainedMixin, nn.Module):
    """BERT encoder (transformers' BertModel: same state_dict keys, outputs to float rounding) on attnkit
    attention; padded batches run packed. Build from a BertConfig, or from_pretrained / from_hf."""

    config_class, model_type, base_prefix = BertConfig, "bert", "bert."

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self._init_own_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """input_ids (B, N); attention_mask (B, N) 1 = token, 0 = padding (anywhere in the row);
        token_type_ids, position_ids (B, N) default 0 and 0..N-1.
        Returns (last_hidden_state (B, N, C), zeros at padding; pooled (B, C) or None).
        The pooler reads position 0, as transformers: with left padding that is a pad token, which
        then runs through the layers as a query of the row's real tokens, as there."""
        packing = Packing.for_ids(input_ids, attention_mask)
        with_first = None if self.pooler is None else packing.with_first_tokens(attention_mask)
        if with_first is None:
            hidden = packing.unpack(self.forward_packed(input_ids, packing, token_type_ids, position_ids))
            return hidden, torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else None
        hidden = self.forward_packed(input_ids, with_first, token_type_ids, position_ids)
        pooled = torch.tanh(self.pooler(with_first.unpack(hidden)[:, 0]))
        return packing.unpack(hidden.index_select(0, with_first.keys)), pooled

    def forward_packed(self, input_ids: Tensor, packing: Packing, token_type_ids: Optional[Tensor] = None,
                       position_ids: Optional[Tensor] = None) -> Tensor:
        """Hidden states of the real tokens only, packed (total, C)."""
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_ids("token_type_ids", token_type_ids, cfg.type_vocab_size, "type_vocab_size")
        if position_ids is None:
            check_length(length, cfg.max_position_embeddings, "max_position_embeddings")
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        check_ids("position_ids", position_ids, cfg.max_position_embeddings, "max_position_embeddings")
        pack = lambda t: packing.pack(t.expand(batch, length))  # noqa: E731
        x = self.embeddings(pack(input_ids), pack(token_type_ids), pack(position_ids))
        with cu_seqlens_checked_once():  # the layers share packing.cu_seqlens: read it once
            for layer in self.layers:
                x = layer(x, packing)
        return x

    def hf_config(self) -> dict:
        return self.config.to_hf(type(self).__name__)

    def hf_mapping(self, prefix: str = "") -> Tuple[Dict[str, List[str]], List[str], List[str]]:
        """(ours -> HF names, our names stored transposed (none), HF keys ignored on load)."""
        p = prefix + "embeddings."
        mapping = {"embeddings.word.weight": [p + "word_embeddings.weight"],
                   "embeddings.position.weight": [p + "position_embeddings.weight"],
                   "embeddings.token_type.weight": [p + "token_type_embeddings.weight"],
                   "embeddings.ln.weight": [p + "LayerNorm.weight"], "embeddings.ln.bias": [p + "LayerNorm.bias"]}
        for i in range(self.config.num_hidden_layers):
            ours, hf = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
            for kind in ("weight", "bias"):
                mapping[ours + "qkv." + kind] = [f"{hf}attention.self.{n}.{kind}" for n in ("query", "key", "value")]
                mapping[ours + "attn_out." + kind] = [f"{hf}attention.output.dense.{kind}"]
                mapping[ours + "ln_attn." + kind] = [f"{hf}attention.output.LayerNorm.{kind}"]
                mapping[ours + "fc_in." + kind] = [f"{hf}intermediate.dense.{kind}"]
                mapping[ours + "fc_out." + kind] = [f"{hf}output.dense.{kind}"]
                mapping[ours + "ln_out." + kind] = [f"{hf}output.LayerNorm.{kind}"]
        if self.pooler is not None:  # a checkpoint without one: from_pretrained(path, add_pooling_layer=False)
            mapping.update({"pooler.weight": [prefix + "pooler.dense.weight"], "pooler.bias": [prefix + "pooler.dense.bias"]})
        # position_ids: a buffer older checkpoints saved; the pooler / heads of checkpoints whose body we load.
        ignored = [r"(bert\.)?embeddings\.position_ids", r"cls\..*", r"classifier\..*"]
        if self.pooler is None:
            ignored.append(r"(bert\.)?pooler\..*")
        return mapping, [], ignored


class BertForMaskedLM(PretrainedMixin, nn.Module):
    """BertModel with transformers' masked-LM head (tied to the word embeddings)."""

    config_class, model_type, base_prefix = BertConfig, "bert", "bert."

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.decoder.weight = self.bert.embeddings.word.weight
        self._init_own_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """Logits (B, N, vocab_size), zeros at padding (the head runs on real tokens only)."""
        packing = Packing.for_ids(input_ids, attention_mask)
        hidden = self.bert.forward_packed(input_ids, packing, token_type_ids, position_ids)
        return packing.unpack(self.decoder(self.ln(self.act(self.transform(hidden)))))

    def hf_config(self) -> dict:
        return self.config.to_hf(type(self).__name__)

    def hf_mapping(self):
        mapping, _, ignored = self.bert.hf_mapping("bert.")
        mapping = {"bert." + k: v for k, v in mapping.items()}
        h = "cls.predictions."
        for kind in ("weight", "bias"):
            mapping["transform." + kind] = [f"{h}transform.dense.{kind}"]
            mapping["ln." + kind] = [f"{h}transform.LayerNorm.{kind}"]
        mapping["decoder.bias"] = [h + "bias"]  # transformers ties decoder.bias to predictions.bias
        ignored = [p for p in ignored if not p.startswith("cls")]
        ignored += [r"cls\.predictions\.decoder\.bias", r"cls\.seq_relationship\..*"]
        if self.config.tie_word_embeddings:
            ignored.append(r"cls\.predictions\.decoder\.weight")  # a copy of the word embeddings
        else:
            mapping["decoder.weight"] = [h + "decoder.weight"]
        return mapping, [], ignored

    def hf_extra_tensors(self, hf_state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        # Untied, transformers reads decoder.bias too (tied, it ties it to predictions.bias).
        if not self.config.tie_word_embeddings:
            hf_state["cls.predictions.decoder.bias"] = hf_state["cls.predictions.bias"].clone()
        return hf_state


class BertForSequenceClassification(PretrainedMixin, nn.Module):
    """BertModel with transformers' pooled sequence-classification head."""

    config_class, model_type, base_prefix = BertConfig, "bert", "bert."

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_own_weights()

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """Logits (B, num_labels) from the pooled first token."""
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        return self.classifier(self.dropout(pooled))

    def hf_config(self) -> dict:
        return self.config.to_hf(type(self).__name__)

    def hf_mapping(self):
        mapping, _, ignored = self.bert.hf_mapping("bert.")
        mapping = {"bert." + k: v for k, v in mapping.items()}
        mapping.update({"classifier.weight": ["classifier.weight"], "classifier.bias": ["classifier.bias"]})
        return mapping, [], [p for p in ignored if not p.startswith("classifier")]
