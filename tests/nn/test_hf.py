"""attn_implementation="attnkit" in small random transformers models against "eager"."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
import attnkit.nn.hf as hf  # noqa: E402

ATOL = 1e-4


@pytest.fixture(autouse=True)
def registered():
    hf.register()


@pytest.fixture
def calls(monkeypatch):
    """Counts the attnkit attention calls (so a test cannot pass on another implementation)."""
    seen = []
    kernel = hf.flash_attention
    monkeypatch.setattr(hf, "flash_attention", lambda *a, **k: seen.append((a[0].shape, k)) or kernel(*a, **k))
    return seen


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def left_padded(batch=3, length=7, vocab=64):
    ids = torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_llama_gqa_left_padding(calls):
    model = tiny_llama()
    ids, mask = left_padded()
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    ours = run(model, "attnkit", input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 2 and calls[0][0][1] == 4  # one per layer; K/V passed with 2 heads, not repeated
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=ATOL, rtol=ATOL)
    # No padding: no mask tensor at all, the kernel's causal masking.
    calls.clear()
    eager = run(model, "eager", input_ids=ids[:1]).logits
    ours = run(model, "attnkit", input_ids=ids[:1]).logits
    assert calls[0][1]["causal"] and calls[0][1]["attn_mask"] is None
    torch.testing.assert_close(ours, eager, atol=ATOL, rtol=ATOL)


def test_llama_generate_with_kv_cache_and_from_pretrained(tmp_path, calls):
    tiny_llama().save_pretrained(tmp_path)
    eager = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit").eval()
    assert ours.config._attn_implementation == "attnkit"
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, got = eager.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(got, expected)
    assert any(shape[2] == 1 for shape, _ in calls)  # decoding steps ran through attnkit


def test_static_cache_prompt_pass_is_causal_from_the_top_left(calls):
    """With a static cache and no padding transformers passes no mask and K holds the empty
    slots after the prompt: SDPA's is_causal diagonal (top-left), not FlashAttention's."""
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = (model.set_attn_implementation("eager"), model.generate(ids, **kw))[1]
    got = (model.set_attn_implementation("attnkit"), model.generate(ids, **kw))[1]
    assert torch.equal(got, expected)
    assert any(shape[2] == 6 and k["attn_mask"] is None for shape, k in calls)  # the prompt pass, unmasked


def test_llama_under_autocast_matches_sdpa():
    """RoPE leaves q and k in float32 and v in bfloat16 under autocast: cast as SDPA's inputs."""
    model = tiny_llama().train()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    losses = {}
    for impl in ("sdpa", "attnkit"):
        model.set_attn_implementation(impl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[impl] = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(losses["attnkit"], losses["sdpa"], atol=2e-2, rtol=0)


def test_gpt_oss_attention_sinks_in_inference_only(calls):
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("transformers without GPT-OSS")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, sliding_window=4, max_position_embeddings=64,
                                       pad_token_id=0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # trained sinks take a real share of each row
    ids, mask = left_padded()
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    ours = run(model, "attnkit", input_ids=ids, attention_mask=mask).logits
    assert calls
    torch.testing.assert_close(ours[mask.bool()], eager[mask.bool()], atol=ATOL, rtol=ATOL)
    with pytest.raises(NotImplementedError, match="attention sinks .* inference only"):
        model(input_ids=ids, attention_mask=mask)


def test_llama_gradients():
    model = tiny_llama().train()
    ids, mask = left_padded()
    real = mask.bool()
    grads = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits[real].square().sum().backward()
        grads[impl] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["attnkit"][name], grad, atol=ATOL, rtol=1e-3, msg=name)


def test_bert_padding(calls):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids, mask = left_padded()
    mask = mask.flip(1)  # BERT pads on the right
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).last_hidden_state
    ours = run(model, "attnkit", input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(calls) == 2 and not calls[0][1]["causal"]
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=ATOL, rtol=ATOL)


def test_gemma2_softcap_and_sliding_window(calls):
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                       max_position_embeddings=64, sliding_window=3, attn_logit_softcapping=20.0,
                                       pad_token_id=0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    ids, mask = left_padded()
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    ours = run(model, "attnkit", input_ids=ids, attention_mask=mask).logits
    assert calls and all(k["softcap"] == 20.0 for _, k in calls)
    real = mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=ATOL, rtol=ATOL)


def test_importing_attnkit_does_not_import_transformers():
    code = "import sys, attnkit, attnkit.nn.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def test_t5_position_bias_values_and_gradients(calls):
    """T5's learned relative bias goes in as an additive mask (with the padding mask in the encoder
    and cross-attention, and the kernel's causal flag in the decoder); its gradient reaches
    relative_attention_bias as through eager."""
    model = tiny_t5().train()
    ids, mask = left_padded(length=9)
    mask = mask.flip(1)  # pad on the right
    labels = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        calls.clear()
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[impl] = (out.logits.detach(), grads, len(calls))
    logits, grads, count = results["attnkit"]
    assert count == 6  # 2 encoder self, 2 decoder self, 2 cross-attention layers
    torch.testing.assert_close(logits, results["eager"][0], atol=ATOL, rtol=ATOL)
    bias_grads = [name for name in grads if "relative_attention_bias" in name]
    assert len(bias_grads) == 2 and all(grads[name].abs().sum() > 0 for name in bias_grads)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(grads[name], grad, atol=ATOL, rtol=1e-3, msg=name)


def test_per_query_sinks_as_eager():
    """Inkling2 passes `sinks` (B, H, Q, 1), one sink logit a query (they were dropped)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    sinks = torch.randn(2, 4, 5, 1) * 2
    module = torch.nn.Module()
    module.is_causal = False
    with torch.no_grad():
        ours, _ = hf.attention_forward(module, q, k, v, None, scaling=0.3, sinks=sinks)
    scores = torch.cat([q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3, sinks], -1).softmax(-1)[..., :-1]
    torch.testing.assert_close(ours, (scores @ v.repeat_interleave(2, 1)).transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"sinks .* \(B, H, Q, 1\)"):
        hf.attention_forward(module, q, k, v, None, sinks=sinks[..., 0])


def test_head_dims_past_the_kernels_run_transformers_sdpa(calls):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=320, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids, mask = left_padded()
    sdpa = run(model, "sdpa", input_ids=ids, attention_mask=mask).logits
    ours = run(model, "attnkit", input_ids=ids, attention_mask=mask).logits  # raised NotImplementedError
    assert not calls
    torch.testing.assert_close(ours, sdpa, atol=ATOL, rtol=ATOL)


def test_output_attentions_warns_as_sdpa():
    model = tiny_llama()
    ids, mask = left_padded()
    hf._warned_output_attentions = False
    with pytest.warns(UserWarning, match="output_attentions"):
        out = run(model, "attnkit", input_ids=ids, attention_mask=mask, output_attentions=True)
    assert not any(a is not None for a in (out.attentions or ()))
