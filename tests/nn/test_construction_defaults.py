"""Construction under torch's global defaults and on the meta device, as torch.nn modules
handle them: meta tensors through the Transformer's padding masks, a default device other
than the data's, a low-precision default dtype for the sinusoidal table, and
transformers' initialization for the models built from a config."""
import math

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import attnkit
from attnkit.models import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel


@pytest.fixture
def default_device_meta():
    torch.set_default_device("meta")  # stands in for "cuda" with the data on another device
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("lib", [torch.nn, attnkit.nn], ids=["torch", "attnkit"])
def test_transformer_runs_on_meta_tensors_with_a_bool_padding_mask(lib):
    with torch.device("meta"):
        encoder = lib.TransformerEncoder(lib.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        model = lib.Transformer(8, 2, 1, 1, 16, batch_first=True)
        x, pad = torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.bool)
    assert encoder(x, src_key_padding_mask=pad).shape == (2, 4, 8)  # reading the mask's values raised
    out = model(x, x, src_key_padding_mask=pad, memory_key_padding_mask=pad.clone())
    assert out.shape == (2, 4, 8) and out.is_meta


@pytest.mark.parametrize("cls", [attnkit.nn.LSTM, attnkit.nn.GRU, attnkit.nn.LayerNormLSTM])
def test_bidirectional_packed_rnn_ignores_the_default_device(cls):
    torch.manual_seed(0)
    module = cls(4, 3, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    expected = module(packed)[0].data
    torch.set_default_device("meta")
    try:
        out = module(packed)[0].data
    finally:
        torch.set_default_device(None)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ops_lstm_list_lengths_ignore_the_default_device(default_device_meta):
    cpu = torch.device("cpu")
    x, h0 = torch.randn(5, 2, 4, device=cpu), torch.zeros(2, 3, device=cpu)
    w_ih, w_hh = torch.randn(12, 4, device=cpu), torch.randn(12, 3, device=cpu)
    out, _ = attnkit.ops.lstm(x, (h0, h0), w_ih, w_hh, lengths=[5, 3])
    assert out.device == cpu and (out[3:, 1] == 0).all()


def _sinusoid_table(max_len, d_model):
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    angle = position * torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, 1, d_model, dtype=torch.float64)
    table[:, 0, 0::2], table[:, 0, 1::2] = angle.sin(), angle.cos()[:, : d_model // 2]
    return table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_sinusoidal_table_is_exact_under_any_default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        pe = attnkit.nn.SinusoidalPositionalEncoding(16, max_len=600).pe
    finally:
        torch.set_default_dtype(previous)
    assert pe.dtype == dtype  # computed in bfloat16, positions past 256 rounded: sin/cos off by up to 2
    torch.testing.assert_close(pe, _sinusoid_table(600, 16).to(dtype), rtol=0, atol=0)


def test_sinusoidal_meta_construction_then_reset_parameters():
    with torch.device("meta"):
        module = attnkit.nn.SinusoidalPositionalEncoding(15, max_len=40, dropout=0.0)
    module.to_empty(device="cpu")
    module.reset_parameters()
    torch.testing.assert_close(module.pe, _sinusoid_table(40, 15).float(), rtol=0, atol=0)
    built = attnkit.nn.SinusoidalPositionalEncoding(15, max_len=40, device="cpu", dtype=torch.float64)
    assert built.pe.dtype == torch.float64 and list(built.state_dict()) == ["pe"]


def _initial_loss(model, vocab):
    """Cross-entropy on random targets: ~ln(vocab) for logits near 0."""
    ids, targets = torch.randint(0, vocab, (2, 4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1)).item()


def test_gpt2_built_from_a_config_is_initialized_as_transformers():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=2000, n_positions=64, n_embd=128, n_layer=3, n_head=4, initializer_range=0.05)
    model = GPT2LMHeadModel(config)
    t = model.transformer
    assert model.lm_head.weight is t.wte.weight
    for weight in (t.wte.weight, t.wpe.weight, t.h[0].attn.c_attn.weight, t.h[2].mlp.c_fc.weight):
        assert abs(weight.std().item() - 0.05) < 0.004
    for weight in (t.h[0].attn.c_proj.weight, t.h[1].mlp.c_proj.weight):  # GPT-2's residual scaling
        assert abs(weight.std().item() - 0.05 / math.sqrt(6)) < 0.002
    assert (t.h[1].attn.c_attn.bias == 0).all() and (t.ln_f.weight == 1).all() and (t.h[0].ln_1.bias == 0).all()
    # torch's default N(0, 1) embeddings started training at a loss of ~174 (ln 2000 = 7.6)
    assert abs(_initial_loss(GPT2LMHeadModel(GPT2Config(**{**config.__dict__, "initializer_range": 0.02})), 2000)
               - math.log(2000)) < 0.5


def test_bert_built_from_a_config_is_initialized_as_transformers():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, pad_token_id=3)
    model = BertForMaskedLM(config)
    word = model.bert.embeddings.word.weight
    assert model.decoder.weight is word
    assert (word[3] == 0).all()  # the padding row, not re-drawn through the tied decoder
    for weight in (word, model.bert.layers[1].qkv.weight, model.transform.weight):
        assert abs(weight.std().item() - 0.02) < 0.002
    assert (model.decoder.bias == 0).all() and (model.ln.weight == 1).all()
    assert abs(_initial_loss(model, 1000) - math.log(1000)) < 0.5
    with torch.no_grad():
        word.fill_(1.0)
    model.init_weights()
    assert (word[3] == 0).all() and abs(word.std().item() - 0.02) < 0.002
