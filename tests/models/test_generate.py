"""GPT2LMHeadModel.generate (KV cache, attention_decode) vs transformers' generate."""
import subprocess
import sys

import pytest
import torch
import transformers

import attnkit.models.gpt2 as gpt2
from attnkit.models import decode_graph
from attnkit.models import GPT2LMHeadModel
from attnkit.models.gpt2 import next_token
from attnkit.models.packing import Packing


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=89, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=1, initializer_range=0.3)  # large weights: varied greedy output
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(path)
    return hf, GPT2LMHeadModel.from_pretrained(str(path)), path


def left_padded(lengths, n):
    ids = torch.randint(2, 89, (len(lengths), n))
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, n - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def test_greedy_matches_transformers_token_for_token(models):
    hf, ours, _ = models
    torch.manual_seed(1)
    ids, mask = left_padded([9, 4, 1, 7], 9)
    out = ours.generate(ids, 24, attention_mask=mask)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert len(set(out[0, 9:].tolist())) > 3  # a non-degenerate continuation


def test_eos_stops_rows_and_pads_them(models):
    hf, ours, _ = models
    torch.manual_seed(2)
    ids, mask = left_padded([6, 3], 6)
    free = ours.generate(ids, 16, attention_mask=mask)
    eos = int(free[0, 8])  # a token row 0 emits: use it as eos
    out = ours.generate(ids, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=5)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=5)
    assert torch.equal(out, ref)
    after = out[0, 6:].tolist()
    assert after[after.index(eos) + 1:] == [5] * (len(after) - after.index(eos) - 1)


def test_default_eos_and_pad_are_the_configs_as_in_transformers(models):
    hf, ours, path = models
    torch.manual_seed(2)
    ids, mask = left_padded([6, 3], 6)
    free = ours.generate(ids, 16, attention_mask=mask, eos_token_id=())[:, 6:].tolist()  # () stops at no token
    stops = {t: max(row.index(t) for row in free) for t in set(free[0]) & set(free[1])}
    eos = min(stops, key=stops.get)  # a token both rows emit: generation ends early
    assert stops[eos] < 15
    model = GPT2LMHeadModel.from_pretrained(str(path))
    model.config.eos_token_id = hf.generation_config.eos_token_id = eos
    try:
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16)  # pads with eos, as ours
    finally:
        hf.generation_config.eos_token_id = 1
    out = model.generate(ids, 16, attention_mask=mask)
    assert torch.equal(out, ref) and out.shape[1] == 6 + stops[eos] + 1
    # A list of eos ids, as generation configs hold: the first is the pad.
    both = model.generate(ids, 16, attention_mask=mask, eos_token_id=[88, eos])
    assert torch.equal(both, hf.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[88, eos]))
    after_eos = [row[row.index(eos) + 1:] for row in both[:, 6:].tolist()]
    assert any(after_eos) and all(set(tokens) <= {88} for tokens in after_eos)


def test_a_config_without_eos_generates_every_token(models):
    _, _, path = models
    model = GPT2LMHeadModel.from_pretrained(str(path))
    model.config.eos_token_id = None
    ids = torch.randint(2, 89, (2, 4))
    assert model.generate(ids, 7).shape == (2, 11)


def test_the_last_position_of_the_table_takes_a_token(models):
    """transformers never feeds the last new token back: prompt + max_new_tokens may be
    n_positions + 1."""
    hf, ours, _ = models
    ids = torch.randint(2, 89, (1, 40))
    out = ours.generate(ids, 9)
    assert out.shape == (1, 49)
    assert torch.equal(out, hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9,
                                        do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens - 1 = 49 exceeds the position table "
                                         r"\(n_positions = 48\)"):
        ours.generate(ids, 10)


def test_sampling_keeps_the_top_50_by_default(models):
    _, ours, _ = models
    ids = torch.randint(2, 89, (1, 4)).expand(256, 4)
    top50 = set(ours(ids[:1])[0, -1].topk(50).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    flat = ours.generate(ids, 1, do_sample=True, temperature=1e3, generator=gen)[:, -1].tolist()
    assert set(flat) <= top50 and len(set(flat)) > 30
    unfiltered = ours.generate(ids, 1, do_sample=True, temperature=1e3, top_k=0, generator=gen)[:, -1].tolist()
    assert not set(unfiltered) <= top50


def test_right_padding_gives_the_same_tokens_as_left_padding(models):
    _, ours, _ = models
    torch.manual_seed(3)
    ids, mask = left_padded([5, 2], 5)
    right_ids = torch.stack([ids[0], torch.cat([ids[1, 3:], ids[1, :3]])])
    right_mask = torch.stack([mask[0], torch.cat([mask[1, 3:], mask[1, :3]])])
    assert torch.equal(ours.generate(ids, 8, attention_mask=mask)[:, 5:],
                       ours.generate(right_ids, 8, attention_mask=right_mask)[:, 5:])


def test_decoding_uses_attention_decode_on_one_preallocated_cache(models, monkeypatch):
    _, ours, _ = models
    calls = []
    kernel = gpt2.attention_decode
    monkeypatch.setattr(gpt2, "attention_decode",
                        lambda q, k, v, lens, **kw: calls.append((k.data_ptr(), lens.tolist())) or kernel(q, k, v, lens, **kw))
    ids, mask = left_padded([4, 2], 4)
    ours.generate(ids, 5, attention_mask=mask)
    assert len(calls) == 4 * 2  # 4 decode steps (the first token comes from the prompt pass) x 2 layers
    assert len({ptr for ptr, _ in calls[::2]}) == 1  # layer 0 reads the same cache storage every step
    assert [lens for _, lens in calls[::2]] == [[5, 3], [6, 4], [7, 5], [8, 6]]


def test_generation_follows_in_place_weight_updates(models):
    _, ours, path = models
    model = GPT2LMHeadModel.from_pretrained(str(path))
    ids = torch.randint(2, 89, (1, 5))
    model.generate(ids, 2)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place: same storage, new version
    expected = model(ids)[0, -1].argmax()
    assert int(model.generate(ids, 1)[0, -1]) == int(expected)


def test_sampling(models):
    hf, ours, _ = models
    ids, mask = left_padded([5, 3], 5)
    greedy = ours.generate(ids, 6, attention_mask=mask)
    assert torch.equal(ours.generate(ids, 6, do_sample=True, top_k=1, attention_mask=mask), greedy)
    a = ours.generate(ids, 6, do_sample=True, temperature=0.8, top_p=0.9, attention_mask=mask,
                      generator=torch.Generator().manual_seed(0))
    b = ours.generate(ids, 6, do_sample=True, temperature=0.8, top_p=0.9, attention_mask=mask,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 11)


def test_next_token_filters_as_transformers():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    k_top = logits.topk(3).indices
    for _ in range(20):
        token = next_token(logits, True, 0.7, 3, None, None)
        assert all(t in row for t, row in zip(token.tolist(), k_top.tolist()))
    # top_p: the smallest set of most likely tokens whose mass exceeds p, as transformers' TopPLogitsWarper
    warped = transformers.TopPLogitsWarper(0.6)(None, logits.clone())
    allowed = [set(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in warped]
    for _ in range(30):
        token = next_token(logits, True, 1.0, None, 0.6, None)
        assert all(t in ok for t, ok in zip(token.tolist(), allowed))


def test_generate_input_errors(models):
    _, ours, _ = models
    one = torch.ones(1, 3, dtype=torch.long)
    for kwargs, message in [(dict(temperature=0.0), "temperature must be a finite number > 0"),
                            (dict(temperature=float("nan")), "temperature"), (dict(top_k=-3), "top_k must be"),
                            (dict(top_k=2.5), "top_k must be"), (dict(top_p=-0.5), r"top_p must be a number in \[0, 1\]"),
                            (dict(top_p=float("nan")), "top_p must be")]:
        with pytest.raises(ValueError, match=message):
            ours.generate(one, 2, do_sample=True, **kwargs)
    with pytest.raises(TypeError, match="eos_token_id must be a token id or a list of them"):
        ours.generate(one, 2, eos_token_id=[1.5])
    with pytest.raises(TypeError, match="pad_token_id must be"):
        ours.generate(one, 2, eos_token_id=4, pad_token_id="0")
    with pytest.raises(ValueError, match="at least one token"):
        ours.generate(torch.ones(2, 3, dtype=torch.long), 2, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 89\)"):
        ours.generate(torch.tensor([[3, 200]]), 2)


def run_cli(*args):
    result = subprocess.run([sys.executable, "-m", "attnkit.generate", *map(str, args)], capture_output=True,
                            text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def test_cli_streams_the_greedy_tokens(models):
    _, ours, path = models
    code, out, err = run_cli("--model", path, "--prompt-ids", 5, 6, 7, "--max-new-tokens", 6, "--eos-token-id", 88)
    assert code == 0, err
    expected = ours.generate(torch.tensor([[5, 6, 7]]), 6, eos_token_id=88)[0, 3:].tolist()
    assert [int(t) for t in out.split()] == expected


def cli_main(capsys, *args):
    """The entry point in-process (subprocesses cost seconds each on a loaded machine)."""
    from attnkit.generate import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_text_prompt_with_a_local_tokenizer(models, tmp_path, capsys):
    hf, _, path = models
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(87)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    model_dir = tmp_path / "with_tokenizer"
    hf.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    code, out, err = cli_main(capsys, "--model", model_dir, "--prompt", "w3 w4 w5", "--max-new-tokens", 5, "--eos-token-id", 88)
    assert code == 0, err
    ids = GPT2LMHeadModel.from_pretrained(str(model_dir)).generate(torch.tensor([[3 + 2, 4 + 2, 5 + 2]]), 5,
                                                                     eos_token_id=88)[0, 3:].tolist()
    assert out.split() == [words[i] for i in ids]


def test_cli_errors(models, tmp_path, capsys):
    _, _, path = models
    code, _, err = cli_main(capsys, "--model", path, "--prompt-ids", 3, 500)
    assert code == 2 and "input_ids must be in [0, 89)" in err
    code, _, err = cli_main(capsys, "--model", path, "--prompt", "hello")
    assert code == 2 and "needs a tokenizer" in err
    code, _, err = cli_main(capsys, "--model", path, "--prompt-ids", 3, "--cuda-graph")
    assert code == 2 and "cuda_graph=True needs the model and input_ids on a CUDA device" in err
    tiny = transformers.BertModel(transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=8))
    tiny.save_pretrained(tmp_path / "bert")
    code, _, err = cli_main(capsys, "--model", tmp_path / "bert", "--prompt-ids", 1)
    assert code == 2 and "holds a 'bert' checkpoint" in err


@torch.no_grad()
def test_forward_decode_continues_the_prompt_pass_and_checks_its_input(models):
    _, ours, _ = models
    torch.manual_seed(4)
    ids = torch.randint(2, 89, (2, 7))
    full = ours.transformer(ids)
    cache = gpt2.KVCache(ours.config, 2, 8, ids.device, torch.float32)
    ours.transformer.forward_packed(ids[:, :5], Packing.for_ids(ids[:, :5], None), None, cache)
    step = ours.transformer.forward_decode(ids[:, 5:], cache)  # two new tokens at once
    assert torch.allclose(step, full[:, 5:], atol=1e-5) and cache.lengths.tolist() == [7, 7]
    with pytest.raises(ValueError, match="KV cache holds 8 tokens; this step needs 9"):
        ours.transformer.forward_decode(ids[:, :2], cache)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 89\)"):
        ours.transformer.forward_decode(torch.tensor([[3], [89]]), cache)
    assert cache.lengths.tolist() == [7, 7]  # a refused step changes nothing


@pytest.fixture
def stand_in_graphs(monkeypatch):
    """CUDA graphs on the CPU, as far as that goes: the capture executes nothing (as a real one)
    and a replay runs the recorded step again on the same buffers; the first step runs as is."""
    monkeypatch.setattr(decode_graph, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(decode_graph, "_run_first", lambda step, token: step(token))
    monkeypatch.setattr(decode_graph, "_capture", lambda fn: fn)


def test_cuda_graph_steps_replay_on_their_own_buffers(models, stand_in_graphs, monkeypatch):
    hf, ours, _ = models
    torch.manual_seed(5)
    ids, mask = left_padded([6, 2, 4], 6)
    tokens_seen = []
    decode = ours.transformer.decode_unchecked
    monkeypatch.setattr(ours.transformer, "decode_unchecked",
                        lambda token, cache: tokens_seen.append(token.data_ptr()) or decode(token, cache))
    out = ours.generate(ids, 9, attention_mask=mask, cuda_graph=True)
    assert torch.equal(out, hf.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0))
    # 8 decode steps (the first token comes from the prompt pass): the first runs on its own token, the
    # capture (executing nothing) records the buffer's, and the 7 replays all read that buffer.
    assert len(tokens_seen) == 1 + 7 and len(set(tokens_seen[1:])) == 1 and tokens_seen[0] != tokens_seen[1]


def test_a_step_that_cannot_be_captured_runs_without_a_graph(models, stand_in_graphs, monkeypatch):
    _, ours, _ = models
    ids, mask = left_padded([3, 5], 5)

    def refuse(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(decode_graph, "_capture", refuse)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        out = ours.generate(ids, 7, attention_mask=mask, cuda_graph=True)
    assert torch.equal(out, ours.generate(ids, 7, attention_mask=mask))


def test_cuda_graph_needs_a_gpu(models):
    _, ours, _ = models
    with pytest.raises(ValueError, match="cuda_graph=True needs the model and input_ids on a CUDA device"):
        ours.generate(torch.ones(1, 3, dtype=torch.long), 2, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_generation_on_a_gpu_matches_eager(models):
    """The replayed steps give the eager steps' tokens (the same kernels on the same values; the
    eager path's parity with transformers is the CPU tests')."""
    _, _, path = models
    ours = GPT2LMHeadModel.from_pretrained(str(path)).cuda()
    torch.manual_seed(6)
    ids, mask = (t.cuda() for t in left_padded([9, 4, 1, 7], 9))
    graphed = ours.generate(ids, 24, attention_mask=mask, cuda_graph=True)
    assert torch.equal(graphed, ours.generate(ids, 24, attention_mask=mask))
    eos = int(graphed[0, 12])  # stops early, rows padded, as the eager path
    assert torch.equal(ours.generate(ids, 24, attention_mask=mask, eos_token_id=eos, pad_token_id=5, cuda_graph=True),
                       ours.generate(ids, 24, attention_mask=mask, eos_token_id=eos, pad_token_id=5))


def test_generate_under_autocast_keeps_its_cache_in_autocast_dtype(models, monkeypatch):
    """Under autocast c_attn's keys come in bfloat16: the cache holds them so (a float32 cache
    made the first write fail with index_put's dtype error), and the first token is the
    forward's argmax under the same autocast."""
    _, ours, _ = models
    caches, make_cache = [], gpt2.KVCache
    monkeypatch.setattr(gpt2, "KVCache", lambda *args: caches.append(make_cache(*args)) or caches[-1])
    torch.manual_seed(3)
    ids = torch.randint(2, 89, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.generate(ids, 5)
        first = ours(ids)[:, -1].argmax(-1)
    assert out.shape == (2, 11) and caches[0].k.dtype == torch.bfloat16
    assert torch.equal(out[:, 6], first)
