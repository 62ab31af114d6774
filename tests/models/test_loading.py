"""Checkpoint loading and saving: formats, name mapping errors, wrong architectures, round trips."""
import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from attnkit.models import (BertForMaskedLM, BertForSequenceClassification, BertModel, CheckpointError,
                            GPT2LMHeadModel, GPT2Model)


def tiny_bert(cls=transformers.BertModel, add_pooling_layer=None, **extra):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=20, **extra)
    return (cls(config) if add_pooling_layer is None else cls(config, add_pooling_layer=add_pooling_layer)).eval()


def tiny_gpt2(cls=transformers.GPT2LMHeadModel):
    torch.manual_seed(0)
    return cls(transformers.GPT2Config(vocab_size=50, n_positions=20, n_embd=16, n_layer=2, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()


@pytest.mark.parametrize("ours_cls, hf_cls, make", [
    (BertModel, transformers.BertModel, tiny_bert),
    (BertForMaskedLM, transformers.BertForMaskedLM, tiny_bert),
    (BertForSequenceClassification, transformers.BertForSequenceClassification, tiny_bert),
    (GPT2Model, transformers.GPT2Model, tiny_gpt2),
    (GPT2LMHeadModel, transformers.GPT2LMHeadModel, tiny_gpt2),
])
def test_save_pretrained_round_trips_through_transformers(tmp_path, ours_cls, hf_cls, make):
    hf = make(hf_cls)
    ours = ours_cls.from_hf(hf)
    ours.save_pretrained(tmp_path)
    back = hf_cls.from_pretrained(tmp_path).eval()
    assert type(back) is hf_cls and back.config.architectures == [hf_cls.__name__]
    original, reloaded = hf.state_dict(), back.state_dict()
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name


def test_save_pretrained_keeps_what_transformers_reads(tmp_path):
    """Config fields our models do not use (label names, problem_type, reorder_and_upcast_attn)
    and an untied MLM head's decoder.bias come back out."""
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    hf = tiny_bert(transformers.BertForSequenceClassification, id2label=labels,
                   label2id={v: k for k, v in labels.items()}, problem_type="multi_label_classification")
    BertForSequenceClassification.from_hf(hf).save_pretrained(tmp_path / "cls")
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "cls")
    assert back.config.id2label == labels and back.config.label2id == {v: k for k, v in labels.items()}
    assert back.config.problem_type == "multi_label_classification"
    gpt = tiny_gpt2()
    gpt.config.reorder_and_upcast_attn = True
    GPT2LMHeadModel.from_hf(gpt).save_pretrained(tmp_path / "gpt")
    assert transformers.GPT2Config.from_pretrained(tmp_path / "gpt").reorder_and_upcast_attn
    BertForMaskedLM.from_hf(tiny_bert(transformers.BertForMaskedLM, tie_word_embeddings=False)).save_pretrained(
        tmp_path / "mlm")
    _, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "mlm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_legacy_layer_norm_gamma_beta_names_load(tmp_path):
    """The first BERT conversions named LayerNorm weights gamma / beta; transformers renames them."""
    hf = tiny_bert()
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in state)
    hf.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(BertModel.from_pretrained(str(tmp_path))(ids)[0], hf(ids).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_pytorch_model_bin_and_sharded_safetensors(tmp_path):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path / "bin")  # the older format: config.json + a pickled state dict
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        for path in ("bin", "sharded"):
            ours = GPT2LMHeadModel.from_pretrained(str(tmp_path / path))
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_wrong_architecture_is_named(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a 'gpt2' checkpoint .* BertModel loads 'bert'"):
        BertModel.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"'bert'.*GPT2LMHeadModel loads 'gpt2'"):
        GPT2LMHeadModel.from_hf(tiny_bert())


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layer.0.extra.weight"] = torch.zeros(2)
    del state["encoder.layer.1.attention.self.key.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['encoder.layer.1.attention.self.key.bias'\], "
                                              r"unexpected keys \['encoder.layer.0.extra.weight'\]"):
        BertModel.from_pretrained(str(tmp_path))


def test_task_model_from_a_base_checkpoint_reports_its_missing_head(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys \['classifier.bias', 'classifier.weight'\]"):
        BertForSequenceClassification.from_pretrained(str(tmp_path))


def test_base_model_from_a_task_checkpoint(tmp_path):
    hf = tiny_bert(transformers.BertForSequenceClassification)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        hidden, _ = BertModel.from_pretrained(str(tmp_path))(ids)
        torch.testing.assert_close(hidden, hf.bert(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_unsupported_variants_and_missing_files(tmp_path):
    tiny_bert(position_embedding_type="relative_key").save_pretrained(tmp_path / "rel")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertModel.from_pretrained(str(tmp_path / "rel"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        BertModel.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        BertModel.from_pretrained(str(tmp_path / "empty"))


def test_checkpoint_dtype_is_kept(tmp_path):
    tiny_gpt2().to(torch.bfloat16).save_pretrained(tmp_path)
    assert GPT2LMHeadModel.from_pretrained(str(tmp_path)).lm_head.weight.dtype == torch.bfloat16


def test_importing_attnkit_models_does_not_import_transformers():
    code = ("import sys, attnkit, attnkit.models; assert 'transformers' not in sys.modules; "
            "assert 'safetensors' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_bert_without_pooler(tmp_path):
    hf = tiny_bert(add_pooling_layer=False)
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys \['pooler.dense.bias', 'pooler.dense.weight'\]"):
        BertModel.from_pretrained(str(tmp_path))
    ours = BertModel.from_pretrained(str(tmp_path), add_pooling_layer=False)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        hidden, pooled = ours(ids)
    assert pooled is None
    torch.testing.assert_close(hidden, hf(ids).last_hidden_state, atol=1e-5, rtol=0)
