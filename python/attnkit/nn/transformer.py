"""Drop-in torch.nn Transformer modules whose attention is attnkit.nn.MultiheadAttention.

Subclasses of the torch.nn classes built by torch.nn's own constructors (same
arguments, initialisation under the same seed, state_dict keys), with each
self_attn / multihead_attn then switched to attnkit's MultiheadAttention (sharing
its parameters). torch's inference fast path (torch._transformer_encoder_layer_fwd,
nested tensors) is never taken for dense tensors: the layers always run the
documented block math, so outputs and gradients equal torch.nn's slow path.

Padded batches: TransformerEncoder given a bool src_key_padding_mask with some
padding (and no mask, or a causal one) packs the real tokens once, runs every layer
on them (projections, feed-forward and flash_attention_varlen: no work on padding)
and scatters back, so padded positions are 0 before the final norm, in training and
eval, for either batch_first, norm_first and padding alignment (pack_padding=False: dense;
Transformer packs only where memory_key_padding_mask hides those positions too). torch
gives 0 there only on its nested-tensor inference path (eval, no grad, batch_first, enable_nested_tensor,
norm_first=False, relu/gelu, no mask, right-aligned padding), elsewhere values
computed from the real keys. Outputs at real positions agree where torch's are
finite, and so do gradients when the loss ignores padded positions. Positions (RoPE,
ALiBi, windows) restart at 0 in each packed sequence. A single layer, the decoder
and float (0/-inf) padding masks use key_padding_mask in the dense kernel instead,
so their padded positions are not 0, even where torch's nested-tensor path gives 0.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from .. import _validate
from ..ops.attention_validation import cu_seqlens_checked_once
from ._share import check_from_torch, shared
from .attention import MultiheadAttention


def _swap_attention(layer) -> None:
    for name in ("self_attn", "multihead_attn"):
        attn = layer._modules.get(name)
        if type(attn) is torch.nn.MultiheadAttention:
            layer._modules[name] = MultiheadAttention.from_torch(attn)


def _canonical_masks(src: Tensor, mask: Optional[Tensor], pad: Optional[Tensor], mask_name: str):
    """torch's mask checks and mixed-type warning, naming src_key_padding_mask and `mask_name`.
    Masks of one type go on as given (bool keeps the kernel's bool paths); mixed ones as torch
    passes them on, both float, so that self_attn does not warn again under its own names."""
    pad_f = F._canonical_mask(mask=pad, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(mask),
                              other_name=mask_name, target_type=src.dtype)
    mask_f = F._canonical_mask(mask=mask, mask_name=mask_name, other_type=None, other_name="",
                               target_type=src.dtype, check_other=False)
    if mask is not None and pad is not None and mask.dtype != pad.dtype:
        return mask_f, pad_f
    return mask, pad


def _float_masks(src: Tensor, mask: Optional[Tensor], pad: Optional[Tensor]):
    """(mask, pad) as torch.nn.TransformerEncoder hands them to its layers: float, 0 / -inf."""
    return (F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                              check_other=False),
            F._canonical_mask(mask=pad, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(mask),
                              other_name="mask", target_type=src.dtype))


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """torch.nn.TransformerEncoderLayer (same arguments, parameters and state_dict) with attnkit attention."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _swap_attention(self)

    __init__.__signature__ = inspect.signature(torch.nn.TransformerEncoderLayer.__init__)  # for help()

    @classmethod
    def from_torch(cls, layer: torch.nn.TransformerEncoderLayer) -> "TransformerEncoderLayer":
        """An attnkit layer sharing `layer`'s configuration and parameters (`layer` is untouched)."""
        check_from_torch(cls, layer, torch.nn.TransformerEncoderLayer)
        new = shared(cls, layer)
        _swap_attention(new)
        return new

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if src.is_nested:  # only torch's fast path takes nested tensors
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        src_mask, src_key_padding_mask = _canonical_masks(src, src_mask, src_key_padding_mask, "src_mask")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def packed_forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool = False) -> Tensor:
        """The layer on packed tokens x (total, d_model) of sequences delimited by int32 cu_seqlens."""
        def attend(y):
            return self.dropout1(self.self_attn.packed_self_attention(y, cu_seqlens, max_seqlen, causal))

        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + self._ff_block(x))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """torch.nn.TransformerDecoderLayer (same arguments, parameters and state_dict): torch.nn's
    forward (it has no fast path) with attnkit attention in both blocks."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _swap_attention(self)

    __init__.__signature__ = inspect.signature(torch.nn.TransformerDecoderLayer.__init__)

    @classmethod
    def from_torch(cls, layer: torch.nn.TransformerDecoderLayer) -> "TransformerDecoderLayer":
        check_from_torch(cls, layer, torch.nn.TransformerDecoderLayer)
        new = shared(cls, layer)
        _swap_attention(new)
        return new


def _adopt_layers(layers, torch_cls, cls) -> torch.nn.ModuleList:
    return torch.nn.ModuleList(cls.from_torch(layer) if type(layer) is torch_cls else layer for layer in layers)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether `module` has forward or backward hooks of its own (Module.__call__ runs them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_*) exist."""
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


class TransformerEncoder(torch.nn.TransformerEncoder):
    """torch.nn.TransformerEncoder; torch.nn layers passed in are cloned as attnkit layers."""

    def __init__(self, encoder_layer, num_layers: int, norm=None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        with warnings.catch_warnings():  # torch's warning about its nested-tensor path, which is never used here
            warnings.simplefilter("ignore")
            super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        self.layers = _adopt_layers(self.layers, torch.nn.TransformerEncoderLayer, TransformerEncoderLayer)
        self.use_nested_tensor = False

    @classmethod
    def from_torch(cls, encoder: torch.nn.TransformerEncoder) -> "TransformerEncoder":
        check_from_torch(cls, encoder, torch.nn.TransformerEncoder)
        new = shared(cls, encoder)
        new._modules["layers"] = _adopt_layers(encoder.layers, torch.nn.TransformerEncoderLayer, TransformerEncoderLayer)
        new.use_nested_tensor = False
        return new

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None, *, pack_padding: bool = True) -> Tensor:
        """torch.nn.TransformerEncoder.forward; pack_padding=False runs the dense path even with a
        bool padding mask, so that padded positions hold torch's values, not 0 (for a model that
        reads them: attnkit.nn.Transformer does so when the decoder is not told to skip them)."""
        layer_mask, layer_pad = _canonical_masks(src, mask, src_key_padding_mask, "mask")
        batch_first = self.layers[0].self_attn.batch_first
        if is_causal is None and mask is not None:  # torch's detection compares against its float causal mask
            is_causal = _detect_is_causal_mask(F._canonical_mask(mask, "mask", None, "", src.dtype, False), None,
                                               _get_seq_len(src, batch_first))
        is_causal = bool(is_causal)
        if pack_padding and self._packable(src, mask, src_key_padding_mask, is_causal):
            output = self._packed(src, mask, src_key_padding_mask, is_causal, batch_first)
        else:
            output, float_masks = src, None
            for layer in self.layers:
                masks = (layer_mask, layer_pad)
                if not isinstance(layer, TransformerEncoderLayer):  # a user's layer gets what torch's encoder passes
                    float_masks = float_masks or _float_masks(src, mask, src_key_padding_mask)
                    masks = float_masks
                output = layer(output, src_mask=masks[0], is_causal=is_causal, src_key_padding_mask=masks[1])
        return output if self.norm is None else self.norm(output)

    def _packable(self, src, mask, pad, is_causal) -> bool:
        if pad is None or pad.dtype != torch.bool or src.dim() != 3 or src.is_nested or (mask is not None and not is_causal):
            return False
        if not _mask_values_readable(pad):  # the packed length depends on them
            return False
        if _global_hooks():
            return False
        for layer in self.layers:
            attn = getattr(layer, "self_attn", None)
            if type(layer) is not TransformerEncoderLayer or type(attn) is not MultiheadAttention or \
                    attn.bias_k is not None or attn.add_zero_attn or _hooked(layer) or _hooked(attn):
                return False  # the packed path calls neither through Module.__call__: their hooks would not run
        return bool(pad.any())

    def _packed(self, src: Tensor, mask: Optional[Tensor], pad: Tensor, causal: bool, batch_first: bool) -> Tensor:
        x = src if batch_first else src.transpose(0, 1)
        batch, length, width = x.shape
        attn = self.layers[0].self_attn
        if width != attn.embed_dim:  # as the dense path, before a matmul shape error
            raise AssertionError(f"was expecting embedding dimension of {attn.embed_dim}, but got {width}")
        attn._attn_mask_4d(mask, batch, length, length)  # the causal hint stands for the mask: its shape checked only
        if tuple(pad.shape) != (batch, length):
            raise AssertionError(f"Expected src_key_padding_mask of shape {(batch, length)} (N, S), "
                                 f"but got {tuple(pad.shape)}")
        keep = ~pad
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        index = keep.reshape(-1).nonzero().squeeze(1)
        packed = x.reshape(batch * length, width).index_select(0, index)
        max_seqlen = int(lengths.max())
        with cu_seqlens_checked_once():  # the layers share cu_seqlens: read it once (a GPU sync)
            for layer in self.layers:
                packed = layer.packed_forward(packed, cu_seqlens, max_seqlen, causal)
        out = packed.new_zeros(batch * length, width).index_copy(0, index, packed).view(batch, length, width)
        return out if batch_first else out.transpose(0, 1)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """torch.nn.TransformerDecoder (its forward has no fast path); torch.nn layers become attnkit layers."""

    def __init__(self, decoder_layer, num_layers: int, norm=None) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        self.layers = _adopt_layers(self.layers, torch.nn.TransformerDecoderLayer, TransformerDecoderLayer)

    @classmethod
    def from_torch(cls, decoder: torch.nn.TransformerDecoder) -> "TransformerDecoder":
        check_from_torch(cls, decoder, torch.nn.TransformerDecoder)
        new = shared(cls, decoder)
        new._modules["layers"] = _adopt_layers(decoder.layers, torch.nn.TransformerDecoderLayer, TransformerDecoderLayer)
        return new


class Transformer(torch.nn.Transformer):
    """torch.nn.Transformer built from the attnkit encoder and decoder (custom ones are kept as given)."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation=F.relu, custom_encoder=None,
                 custom_decoder=None, layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:
        kw = dict(device=device, dtype=dtype)
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias)
        # Built in torch.nn.Transformer's order, so the same seed gives the same weights.
        if custom_encoder is None:
            custom_encoder = TransformerEncoder(TransformerEncoderLayer(*layer_args, **kw), num_encoder_layers,
                                                torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        if custom_decoder is None:
            custom_decoder = TransformerDecoder(TransformerDecoderLayer(*layer_args, **kw), num_decoder_layers,
                                                torch.nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **kw))
        super().__init__(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
                         custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias, **kw)

    @classmethod
    def from_torch(cls, model: torch.nn.Transformer) -> "Transformer":
        check_from_torch(cls, model, torch.nn.Transformer)
        new = shared(cls, model)
        if type(model.encoder) is torch.nn.TransformerEncoder:
            new._modules["encoder"] = TransformerEncoder.from_torch(model.encoder)
        if type(model.decoder) is torch.nn.TransformerDecoder:
            new._modules["decoder"] = TransformerDecoder.from_torch(model.decoder)
        return new

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None, memory_key_padding_mask: Optional[Tensor] = None,
                src_is_causal: Optional[bool] = None, tgt_is_causal: Optional[bool] = None,
                memory_is_causal: bool = False) -> Tensor:
        """torch.nn.Transformer.forward. The encoder packs a padded source (padded positions 0) only
        where the decoder skips those positions too: with no memory_key_padding_mask (the common
        call passing src_key_padding_mask alone) the decoder attends to them, and torch's values
        there (computed from the real keys) change its output."""
        is_batched = src.dim() == 3
        if is_batched and src.size(0 if self.batch_first else 1) != tgt.size(0 if self.batch_first else 1):
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.size(-1) != self.d_model or tgt.size(-1) != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        encoder_kwargs = dict(mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        if isinstance(self.encoder, TransformerEncoder):
            encoder_kwargs["pack_padding"] = _decoder_skips_padding(src_key_padding_mask, memory_key_padding_mask)
        memory = self.encoder(src, **encoder_kwargs)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def _decoder_skips_padding(src_pad: Optional[Tensor], memory_pad: Optional[Tensor]) -> bool:
    """Whether memory_key_padding_mask hides every source position the bool src_key_padding_mask
    pads (the same tensor, or bool with True wherever the source's is), so that the packed
    encoder's 0 there reaches no output."""
    if src_pad is None or memory_pad is None:
        return src_pad is None
    if memory_pad is src_pad:
        return True
    if src_pad.dtype != torch.bool or memory_pad.dtype != torch.bool or memory_pad.shape != src_pad.shape:
        return False
    if not _mask_values_readable(src_pad, memory_pad):
        return False  # the encoder does not pack there anyway
    return not bool((src_pad & ~memory_pad).any())


def _mask_values_readable(*masks: Tensor) -> bool:
    """Whether the masks' values may decide the path: not under compile (a graph break, or a
    guard on data), nor under a functorch transform (vmap over the batch: bool() of a batched
    tensor raises there), nor for masks without values (meta tensors, as in shape inference,
    fake tensors, tensor subclasses): those take the dense path, as torch's modules run."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return all(type(mask) in _validate.PLAIN_TENSORS and not mask.is_meta for mask in masks)
