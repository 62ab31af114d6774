"""attnkit GPT-2 vs transformers' GPT-2 on random small checkpoints saved with save_pretrained."""
import pytest
import torch
import transformers

from attnkit.models import GPT2LMHeadModel, GPT2Model

ATOL = 1e-5
SIZES = [  # (n_embd, n_layer, n_head, extra config)
    (32, 2, 4, {}),
    (48, 1, 3, {"n_inner": 40, "activation_function": "gelu"}),
    (64, 3, 2, {"scale_attn_by_inverse_layer_idx": True}),
]


def checkpoint(tmp_path, hf_cls, n_embd, n_layer, n_head, extra, **more):
    torch.manual_seed(n_embd + n_layer)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                                     bos_token_id=0, eos_token_id=1, initializer_range=0.2, **extra, **more)
    hf = hf_cls(config).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("size", SIZES)
def test_lm_logits_match_transformers(tmp_path, size):
    hf = checkpoint(tmp_path, transformers.GPT2LMHeadModel, *size)
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("left", [True, False])
def test_padded_batch_matches_on_real_tokens(tmp_path, left):
    hf = checkpoint(tmp_path, transformers.GPT2LMHeadModel, *SIZES[0])
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    for row, n in ((1, 5), (2, 11)):
        mask[row, :n] = 0 if left else 1
        mask[row, n:] = 1 if left else 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours(ids, mask, positions)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref[real], atol=ATOL, rtol=0)
    assert logits[~real].abs().max() == 0


def test_base_model_hidden_states_and_prefixes(tmp_path):
    """GPT2Model loads a bare GPT2Model checkpoint and the body of a GPT2LMHeadModel one."""
    hf = checkpoint(tmp_path / "lm", transformers.GPT2LMHeadModel, *SIZES[1])
    base = checkpoint(tmp_path / "base", transformers.GPT2Model, *SIZES[1])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        for path, ref in ((tmp_path / "lm", hf.transformer), (tmp_path / "base", base)):
            ours = GPT2Model.from_pretrained(str(path))
            torch.testing.assert_close(ours(ids), ref(ids).last_hidden_state, atol=ATOL, rtol=0)


def test_untied_lm_head(tmp_path):
    hf = checkpoint(tmp_path, transformers.GPT2LMHeadModel, *SIZES[0], tie_word_embeddings=False)
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    assert ours.lm_head.weight is not ours.transformer.wte.weight
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)


def test_training_step_gradients_match_transformers(tmp_path):
    """Every parameter's gradient of a training step (dropouts 0) against transformers':
    embeddings, the tied LM head, the blocks and the final LayerNorm."""
    hf = checkpoint(tmp_path, transformers.GPT2LMHeadModel, *SIZES[0], resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0).train()
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path)).train()
    ids = torch.randint(0, 97, (2, 10))
    torch.nn.functional.cross_entropy(ours(ids[:, :-1]).reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    torch.nn.functional.cross_entropy(hf(ids[:, :-1]).logits.reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    theirs = dict(hf.named_parameters())
    mapping, transposed, _ = ours.hf_mapping()  # HF's Conv1D weights are stored transposed
    for name, parameter in ours.named_parameters():
        (hf_name,) = mapping[name]
        want = theirs[hf_name].grad.t() if name in transposed else theirs[hf_name].grad
        torch.testing.assert_close(parameter.grad, want, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_input_errors(tmp_path):
    checkpoint(tmp_path, transformers.GPT2LMHeadModel, *SIZES[0])
    ours = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 97\)"):
        ours(torch.tensor([[5, 97]]))
    with pytest.raises(ValueError, match=r"exceeds the position table \(n_positions = 32\)"):
        ours(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        ours(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens - 1 = 33 exceeds the position table \(n_positions = 32\)"):
        ours.generate(torch.zeros(1, 20, dtype=torch.long), max_new_tokens=14)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, length\)"):
        ours.transformer.forward_decode(torch.zeros(3, dtype=torch.long), None)
