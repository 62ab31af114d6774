"""Bad input at the Python boundary of the public API: a TypeError/ValueError that names the
argument (in the caller's terms) before anything runs, where a deeper AttributeError, a string
flag taken as True, or a silently broadcast shape would otherwise meet the user."""
import numpy as np
import pytest
import torch

import attnkit
from attnkit import nn as ann
from attnkit import ops


@pytest.mark.parametrize("cls", [ann.LSTM, ann.GRU])
@pytest.mark.parametrize("bad", ["numpy", "list"])
def test_recurrent_drop_ins_name_a_non_tensor_input(cls, bad):
    module = cls(4, 8)
    x = np.zeros((2, 3, 4), dtype=np.float32) if bad == "numpy" else [[0.0] * 4] * 3
    with pytest.raises(TypeError, match=f"{cls.__name__}: input must be a torch.Tensor or a PackedSequence"):
        module(x)


def test_recurrent_drop_ins_name_a_missing_state():
    x = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="LSTM: c_0 must be a torch.Tensor, got NoneType"):
        ann.LSTM(4, 8)(x, (torch.zeros(1, 3, 8), None))
    with pytest.raises(TypeError, match="GRU: hx must be a torch.Tensor, got tuple"):
        ann.GRU(4, 8)(x, (torch.zeros(1, 3, 8),))
    out, h = ann.GRU(4, 8)(x, torch.zeros(1, 3, 8))  # the fast one-layer path still takes a tensor
    assert out.shape == (2, 3, 8) and h.shape == (1, 3, 8)


def test_positional_modules_check_their_input():
    with pytest.raises(TypeError, match="RotaryEmbedding: q must be a torch.Tensor"):
        ann.RotaryEmbedding(8)(None)
    with pytest.raises(TypeError, match="RotaryEmbedding: interleaved must be a bool"):
        ann.RotaryEmbedding(8, interleaved="yes")
    with pytest.raises(TypeError, match="LearnedPositionalEmbedding: input must be a torch.Tensor"):
        ann.LearnedPositionalEmbedding(8, 4)([[1, 2]])
    encoding = ann.SinusoidalPositionalEncoding(8)
    with pytest.raises(ValueError, match=r"x must be \(N, B, d_model=8\), got shape \(5, 8\)"):
        encoding(torch.zeros(5, 8))  # broadcast into a (5, 5, 8) result before
    assert encoding(torch.zeros(5, 2, 8)).shape == (5, 2, 8)


def test_flags_must_be_bools():
    q = torch.randn(1, 2, 3, 8)
    for flag in ("return_lse", "deterministic", "rotary_interleaved"):
        with pytest.raises(TypeError, match=f"flash_attention: {flag} must be a bool, got str"):
            ops.flash_attention(q, q, q, **{flag: "no"})  # a truthy string returned (out, lse) before
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        ops.flash_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, 3, 3,
                                   return_lse=1)
    with pytest.raises(TypeError, match="attention_decode: return_lse must be a bool"):
        ops.attention_decode(q[:, :, :1], q, q, torch.tensor([3], dtype=torch.int32), return_lse="no")


@pytest.mark.parametrize("change,message", [
    (dict(is_causal="yes"), "is_causal must be a bool"),
    (dict(query="long"), "query has dtype int64"),
    (dict(key="double"), "key has dtype torch.float64 but query has torch.float32"),
    (dict(key="narrow"), "query and key must have the same head dim, got 8 and 6"),
])
def test_drop_in_sdpa_errors_name_its_own_arguments(change, message):
    q = torch.randn(1, 2, 3, 8)
    made = {"long": q.long(), "double": q.double(), "narrow": torch.randn(1, 2, 3, 6)}
    args = dict(query=q, key=q, value=q)
    args.update({name: made.get(value, value) for name, value in change.items()})
    with pytest.raises((TypeError, ValueError), match=f"^attnkit.scaled_dot_product_attention: {message}"):
        attnkit.scaled_dot_product_attention(**args)


def test_linear_from_torch_shares_the_parameters():
    torch_linear = torch.nn.Linear(6, 4)
    ours = ann.Linear.from_torch(torch_linear)
    assert type(ours) is ann.Linear and ours.weight is torch_linear.weight and ours.bias is torch_linear.bias
    x = torch.randn(3, 6)
    torch.testing.assert_close(ours(x), torch_linear(x))
    with pytest.raises(TypeError, match="expected a torch.nn.Linear, got LSTM"):
        ann.Linear.from_torch(torch.nn.LSTM(2, 2))


def test_patch_takes_one_module_name_and_unpatch_checks_its_argument():
    model = torch.nn.Sequential(torch.nn.LSTM(4, 8), torch.nn.GRU(8, 8))
    report = attnkit.patch(model, modules="LSTM")  # read letter by letter before: "'L' is not supported"
    assert len(report.replaced) == 1 and type(model[0]) is ann.LSTM and type(model[1]) is torch.nn.GRU
    with pytest.raises(TypeError, match="attnkit.unpatch: model must be a torch.nn.Module, got str"):
        attnkit.unpatch("model")


def test_models_name_non_tensor_ids_and_non_models():
    transformers = pytest.importorskip("transformers")
    from attnkit.models import GPT2LMHeadModel

    config = transformers.GPT2Config(vocab_size=50, n_positions=20, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(config))
    with pytest.raises(TypeError, match=r"input_ids must be a torch.Tensor of token ids \(batch, length\), got list"):
        model.generate([[1, 2]], 2)
    with pytest.raises(TypeError, match="GPT2LMHeadModel.from_hf: expected a loaded transformers model"):
        GPT2LMHeadModel.from_hf(torch.nn.Linear(2, 2))
