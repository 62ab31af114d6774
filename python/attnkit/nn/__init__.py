"""Drop-in replacements for torch.nn modules, backed by attnkit ops."""
from .linear import Linear
from .rnn import GRU, LSTM, GRUCell
from .rnn_layernorm import LayerNormGRU, LayerNormLSTM
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes
from .rnn_cell import LSTMCell
from . import hf  # imports transformers only when hf.register() is called
from .attention import MultiheadAttention
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)
from .seq2seq_attention import BahdanauAttention, LuongAttention



def _not_scriptable(self):
    raise RuntimeError(f"attnkit.nn.{type(self).__name__} cannot be compiled by torch.jit.script (its forward calls "
                       f"Python ops); use torch.compile, torch.export or torch.jit.trace, or attnkit.unpatch(model) "
                       f"first")


# torch.jit.script calls this on every submodule before compiling it: a clear error in place
# of TorchScript's own about the drop-ins' Python (ALiBi alone scripts, and keeps doing so).
for _cls in (Linear, GRU, LSTM, GRUCell, LSTMCell, LayerNormGRU, LayerNormLSTM, LearnedPositionalEmbedding,
             RotaryEmbedding, SinusoidalPositionalEncoding, MultiheadAttention, Transformer, TransformerDecoder,
             TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer, BahdanauAttention, LuongAttention):
    _cls.__prepare_scriptable__ = _not_scriptable
del _cls

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "LayerNormGRU", "LayerNormLSTM", "Linear",
           "ALiBi", "LearnedPositionalEmbedding", "RotaryEmbedding", "SinusoidalPositionalEncoding", "alibi_slopes",
           "MultiheadAttention", "Transformer", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerEncoderLayer", "BahdanauAttention", "LuongAttention"]
