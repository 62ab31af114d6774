"""attnkit BERT vs transformers' BERT on random small checkpoints saved with save_pretrained."""
import pytest
import torch
import transformers

import attnkit
from attnkit.models import BertForMaskedLM, BertForSequenceClassification, BertModel

ATOL = 1e-5
SIZES = [  # (hidden, layers, heads, intermediate, act)
    (32, 2, 4, 37, "gelu"),
    (48, 1, 3, 64, "gelu_new"),
    (64, 3, 2, 96, "relu"),
]


def checkpoint(tmp_path, hf_cls, hidden, layers, heads, inter, act, **extra):
    torch.manual_seed(hidden + layers)
    config = transformers.BertConfig(vocab_size=101, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=inter, hidden_act=act,
                                     max_position_embeddings=24, type_vocab_size=3, **extra)
    hf = hf_cls(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


def batch(lengths, n=16, left=False):
    ids = torch.randint(1, 101, (len(lengths), n))
    types = torch.randint(0, 3, (len(lengths), n))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        (mask[i, n - length:] if left else mask[i, :length]).fill_(1)
    return ids, types, mask


@pytest.mark.parametrize("size", SIZES)
def test_bert_model_matches_transformers_with_padding(tmp_path, size):
    hf = checkpoint(tmp_path, transformers.BertModel, *size)
    ours = BertModel.from_pretrained(str(tmp_path))
    ids, types, mask = batch([16, 9, 1, 13])
    with torch.no_grad():
        hidden, pooled = ours(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref.last_hidden_state[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=ATOL, rtol=0)
    assert hidden[~real].abs().max() == 0  # re-padded with zeros


def test_bert_left_padding_and_holes_match_on_real_tokens(tmp_path):
    hf = checkpoint(tmp_path, transformers.BertModel, *SIZES[0])
    ours = BertModel.from_pretrained(str(tmp_path))
    ids, types, mask = batch([16, 5, 11], left=True)
    mask[0, 3] = 0  # a masked token inside a row keeps the positions of its neighbours
    with torch.no_grad():
        hidden, _ = ours(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(hidden[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)


def test_pooler_of_left_padded_rows_matches_transformers(tmp_path):
    """transformers pools position 0 whatever it holds: with left padding, a pad token that
    attends to the row's real tokens. Its value and gradients, next to right-padded rows."""
    hf = checkpoint(tmp_path, transformers.BertForSequenceClassification, *SIZES[0], num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = BertForSequenceClassification.from_pretrained(str(tmp_path))
    ids, types, mask = batch([16, 5, 11, 1], left=True)
    mask[2] = mask[2].flip(0)  # a right-padded row: its position 0 is a real token
    mask[0, 3] = 0  # a hole
    logits = ours(ids, mask, types)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    assert len({tuple(row) for row in logits.tolist()}) == 4  # each row its own logits
    logits.square().sum().backward()
    ref.square().sum().backward()
    for ours_name, hf_name in [("bert.layers.1.qkv.weight", None), ("bert.pooler.weight", "bert.pooler.dense.weight"),
                               ("bert.embeddings.word.weight", "bert.embeddings.word_embeddings.weight")]:
        got = dict(ours.named_parameters())[ours_name].grad
        if hf_name is None:  # our fused q, k, v rows
            layer = hf.bert.encoder.layer[1].attention.self
            want = torch.cat([layer.query.weight.grad, layer.key.weight.grad, layer.value.weight.grad])
        else:
            want = dict(hf.named_parameters())[hf_name].grad
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with torch.no_grad():  # last_hidden_state stays zero at every pad, position 0 included
        hidden, _ = ours.bert(ids, mask, types)
    assert hidden[~mask.bool()].abs().max() == 0


def test_bert_without_mask_and_defaults(tmp_path):
    hf = checkpoint(tmp_path, transformers.BertModel, *SIZES[1])
    ours = BertModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 101, (2, 24))  # the full position table
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf(input_ids=ids).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_masked_lm_logits_match(tmp_path, tie):
    hf = checkpoint(tmp_path, transformers.BertForMaskedLM, *SIZES[0], tie_word_embeddings=tie)
    ours = BertForMaskedLM.from_pretrained(str(tmp_path))
    assert (ours.decoder.weight is ours.bert.embeddings.word.weight) == tie
    ids, types, mask = batch([16, 4])
    with torch.no_grad():
        logits = ours(ids, mask, types)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(logits[mask.bool()], ref[mask.bool()], atol=ATOL, rtol=0)
    assert logits[~mask.bool()].abs().max() == 0  # the vocabulary projection skipped the padding


def test_sequence_classification_logits_match(tmp_path):
    hf = checkpoint(tmp_path, transformers.BertForSequenceClassification, *SIZES[2], num_labels=5)
    ours = BertForSequenceClassification.from_pretrained(str(tmp_path))
    assert ours.config.num_labels == 5
    ids, types, mask = batch([16, 2, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask, types), hf(input_ids=ids, attention_mask=mask,
                                                              token_type_ids=types).logits, atol=ATOL, rtol=0)


def test_padding_costs_no_attention_compute(tmp_path, monkeypatch):
    """Only the real tokens reach the varlen kernel."""
    checkpoint(tmp_path, transformers.BertModel, *SIZES[0])
    ours = BertModel.from_pretrained(str(tmp_path))
    seen = []
    kernel = attnkit.models.bert.flash_attention_varlen
    monkeypatch.setattr(attnkit.models.bert, "flash_attention_varlen",
                        lambda q, *a, **k: seen.append((q.shape[0], a[2].tolist())) or kernel(q, *a, **k))
    ids, types, mask = batch([16, 3, 5])
    with torch.no_grad():
        ours(ids, mask, types)
    assert seen == [(24, [0, 16, 19, 24])] * 2


def test_training_gradients_match_transformers_with_padding(tmp_path):
    """Every parameter's gradient (dropouts 0, a padded batch) against transformers', through
    hf_mapping: the fused QKV against HF's query, key and value, the pooler and the classifier."""
    hf = checkpoint(tmp_path, transformers.BertForSequenceClassification, *SIZES[0], hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0).train()
    ours = BertForSequenceClassification.from_pretrained(str(tmp_path)).train()
    ids, types, mask = batch([16, 8])
    weights = torch.randn(2, hf.config.num_labels)
    (ours(ids, mask, types) * weights).sum().backward()
    (hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits * weights).sum().backward()
    theirs = dict(hf.named_parameters())
    mapping, _, _ = ours.bert.hf_mapping(prefix="bert.")
    mapping.update({"classifier.weight": ["classifier.weight"], "classifier.bias": ["classifier.bias"]})
    named = dict(ours.named_parameters())
    for name, hf_names in mapping.items():
        parameter = named[name if name.startswith("classifier") else "bert." + name]
        want = torch.cat([theirs[n].grad for n in hf_names])
        torch.testing.assert_close(parameter.grad, want, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert len(mapping) == len(named)


def test_bad_input_errors(tmp_path):
    checkpoint(tmp_path, transformers.BertModel, *SIZES[0])
    ours = BertModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 101\)"):
        ours(torch.tensor([[1, 101]]))
    with pytest.raises(ValueError, match=r"input_ids must be in"):
        ours(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="token_type_ids"):
        ours(torch.tensor([[1, 2]]), token_type_ids=torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="exceeds the position table"):
        ours(torch.ones(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        ours(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        ours(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long).index_fill(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="attention_mask must have shape"):  # all ones too
        ours(torch.ones(2, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long))
