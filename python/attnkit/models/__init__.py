"""Models built on attnkit's ops, loadable from (and savable as) Hugging Face checkpoints.
Importing this package never imports transformers."""
from .bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from .gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model, KVCache
from .loading import CheckpointError
from .seq2seq import BeamSearchOutput, Seq2Seq, Seq2SeqConfig, Seq2SeqOutput

__all__ = ["BertConfig", "BertForMaskedLM", "BertForSequenceClassification", "BertModel", "CheckpointError", "GPT2Config", "GPT2LMHeadModel",
           "GPT2Model", "KVCache", "BeamSearchOutput", "Seq2Seq", "Seq2SeqConfig", "Seq2SeqOutput"]
