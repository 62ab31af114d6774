"""attnkit.models.Seq2Seq: teacher-forced forward against a plain-PyTorch recomputation
(torch.nn LSTM/LSTMCell, the attention formula), loss and gradients, greedy decoding,
beam search (beam 1 = greedy, sorted and correctly scored hypotheses, eos and max_len),
padded batches equal to each sequence alone, state_dict round trip, bad input."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from attnkit.models import BeamSearchOutput, Seq2Seq, Seq2SeqConfig

PAD, BOS, EOS = 0, 1, 2
CONFIGS = [("lstm", "bahdanau"), ("lstm", "dot"), ("gru", "general"), ("gru", "concat")]


def make_model(rnn_type="lstm", attention="bahdanau", num_layers=1, seed=0, steps=20, **kw):
    """A small float64 model trained for `steps` steps to reverse strings, so that greedy and
    beam search stop at different steps on different sources (an untrained one emits eos at
    once or never)."""
    return copy.deepcopy(_trained(rnn_type, attention, num_layers, seed, steps, tuple(sorted(kw.items()))))


@functools.lru_cache(maxsize=None)
def _trained(rnn_type, attention, num_layers, seed, steps, kw):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(src_vocab_size=9, tgt_vocab_size=8, embedding_size=6, hidden_size=10,
                           num_layers=num_layers, rnn_type=rnn_type, attention=attention, attention_size=7,
                           max_decode_length=7, **dict(kw))
    model = Seq2Seq(config).double()
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        lengths = torch.randint(1, 6, (16,), generator=gen)
        src = torch.randint(3, 8, (16, 5), generator=gen).masked_fill(torch.arange(5) >= lengths[:, None], PAD)
        tgt = torch.full((16, 6), PAD)
        for row, n in enumerate(lengths.tolist()):
            tgt[row, :n], tgt[row, n] = src[row, :n].flip(0), EOS
        loss = model.loss(src, tgt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def sources(seed=1):
    """A right-padded batch of 4 sources of lengths 5, 2, 1, 4."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 9, (4, 5), generator=gen)
    for row, length in enumerate((5, 2, 1, 4)):
        src[row, length:] = PAD
    return src


def targets(seed=2):
    gen = torch.Generator().manual_seed(seed)
    tgt = torch.randint(3, 8, (4, 4), generator=gen)
    tgt[:, -1] = EOS
    tgt[1, 2:] = torch.tensor([EOS, PAD])
    return tgt


def reference_logits(model, src_row, tgt_in_row):
    """One unpadded sequence through torch.nn modules carrying the model's weights and the
    attention formula written out: the model's forward, recomputed independently (1 layer)."""
    c = model.config
    rnn_cls, cell_cls = (torch.nn.LSTM, torch.nn.LSTMCell) if c.rnn_type == "lstm" else (torch.nn.GRU, torch.nn.GRUCell)
    # torch.nn modules run on the model's own Parameters (functional_call), so gradients reach them.
    torch_encoder = rnn_cls(c.embedding_size, c.hidden_size // 2, bidirectional=True, batch_first=True).double()
    torch_cell = cell_cls(model.decoder_cells[0].input_size, c.hidden_size).double()
    encoder = lambda *a: functional_call(torch_encoder, dict(model.encoder.named_parameters()), a)  # noqa: E731
    cell = lambda *a: functional_call(torch_cell, dict(model.decoder_cells[0].named_parameters()), a)  # noqa: E731
    memory, final = encoder(model.src_embed(src_row)[None])
    memory = memory[0]  # (S, H)
    h_n = final[0] if c.rnn_type == "lstm" else final
    state = torch.cat([h_n[0, 0], h_n[1, 0]])
    if c.rnn_type == "lstm":
        state = (state, torch.cat([final[1][0, 0], final[1][1, 0]]))
    feed = torch.zeros(c.hidden_size, dtype=torch.float64)
    att, logits = model.attention, []
    for token in tgt_in_row:
        state = cell(torch.cat([model.tgt_embed(token), feed])[None], None if state is None else
                     (tuple(s[None] for s in state) if isinstance(state, tuple) else state[None]))
        state = tuple(s[0] for s in state) if isinstance(state, tuple) else state[0]
        h = state[0] if isinstance(state, tuple) else state
        if c.attention in ("bahdanau", "concat"):
            scores = torch.tanh(att.query_proj.weight @ h + memory @ att.key_proj.weight.T) @ att.v
        elif c.attention == "dot":
            scores = memory @ h
        else:
            scores = memory @ (att.proj.weight.T @ h)
        context = F.softmax(scores, 0) @ memory
        feed = torch.tanh(model.combine.weight @ torch.cat([context, h]))
        logits.append(model.out(feed))
    return torch.stack(logits)


@pytest.mark.parametrize("rnn_type,attention", CONFIGS)
def test_forward_matches_plain_pytorch_per_sequence(rnn_type, attention):
    model = make_model(rnn_type, attention)
    src, tgt = sources(), targets()
    tgt_in = torch.cat([torch.full((4, 1), BOS), tgt[:, :-1]], 1)
    out = model(src, tgt_in)
    assert out.logits.shape == (4, 4, 8) and out.attentions.shape == (4, 4, 5)
    with torch.no_grad():
        for row in range(4):
            length = int((src[row] != PAD).sum())
            expected = reference_logits(model, src[row, :length], tgt_in[row])
            torch.testing.assert_close(out.logits[row], expected)
    mask = src != PAD
    assert (out.attentions.masked_select(~mask[:, None, :].expand_as(out.attentions)) == 0).all()
    torch.testing.assert_close(out.attentions.sum(-1), torch.ones(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("rnn_type,attention", CONFIGS)
def test_loss_is_teacher_forced_cross_entropy_and_backprops(rnn_type, attention):
    model = make_model(rnn_type, attention, num_layers=2, steps=0, dropout=0.1).train()
    src, tgt = sources(), targets()
    torch.manual_seed(3)
    loss = model.loss(src, tgt)
    torch.manual_seed(3)
    logits = model(src, torch.cat([torch.full((4, 1), BOS), tgt[:, :-1]], 1)).logits
    real = tgt != PAD
    torch.testing.assert_close(loss, F.cross_entropy(logits[real], tgt[real]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.decoder_cells[1].weight_hh.grad.abs().sum() > 0


def test_gradients_match_plain_pytorch():
    model = make_model("lstm", "bahdanau")
    src, tgt = sources()[:1], targets()[:1]
    tgt_in = torch.cat([torch.full((1, 1), BOS), tgt[:, :-1]], 1)
    params = [model.attention.v, model.encoder.weight_hh_l0_reverse, model.decoder_cells[0].weight_ih]
    grads = torch.autograd.grad(model(src, tgt_in).logits.square().sum(), params)
    expected = torch.autograd.grad(reference_logits(model, src[0], tgt_in[0]).square().sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def greedy_by_hand(model, src):
    """Greedy decoding spelled out on the teacher-forced forward: feed back the argmax."""
    tokens = torch.full((src.shape[0], 1), BOS)
    for _ in range(model.config.max_decode_length):
        with torch.no_grad():
            logits = model(src, tokens).logits[:, -1]
        next_token = logits.index_fill(1, torch.tensor([PAD, BOS]), float("-inf")).argmax(-1)  # never generated
        tokens = torch.cat([tokens, next_token[:, None]], 1)
    return tokens[:, 1:]


@pytest.mark.parametrize("rnn_type,attention", CONFIGS)
def test_greedy_decode(rnn_type, attention):
    model = make_model(rnn_type, attention)
    src = sources()
    tokens, weights = model.greedy_decode(src, return_attention=True)
    assert tokens.shape[1] <= 7 and weights.shape == tokens.shape + (5,)
    by_hand = greedy_by_hand(model, src)
    for row in range(4):
        seq = tokens[row].tolist()
        n = seq.index(EOS) + 1 if EOS in seq else len(seq)
        assert seq[:n] == by_hand[row, :n].tolist()
        assert all(t == PAD for t in seq[n:])
    ends = [row.index(EOS) if EOS in row else None for row in tokens.tolist()]
    assert None not in ends and len(set(ends)) > 1, f"the fixture should stop at different steps, got {ends}"


@pytest.mark.parametrize("rnn_type,attention", CONFIGS)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_one_equals_greedy(rnn_type, attention, length_penalty):
    model = make_model(rnn_type, attention)
    src = sources()
    greedy = model.greedy_decode(src)
    beam = model.beam_search(src, beam_size=1, length_penalty=length_penalty)
    assert beam.sequences.shape == (4, 1, greedy.shape[1])
    assert torch.equal(beam.sequences[:, 0], greedy)


def hypothesis_log_prob(model, src_row, seq):
    tgt_in = torch.tensor([[BOS] + seq[:-1]])
    with torch.no_grad():
        log_probs = model(src_row[None], tgt_in).logits.log_softmax(-1)[0]
    return float(log_probs[torch.arange(len(seq)), torch.tensor(seq)].sum())


@pytest.mark.parametrize("rnn_type,attention", CONFIGS[:2])
def test_beam_search_hypotheses_sorted_and_scored(rnn_type, attention):
    model = make_model(rnn_type, attention)
    src = sources()
    alpha = 0.7
    out = model.beam_search(src, beam_size=3, length_penalty=alpha)
    assert isinstance(out, BeamSearchOutput) and out.sequences.shape[:2] == (4, 3) and out.sequences.shape[2] <= 7
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    for row in range(4):
        seen = set()
        length = int((src[row] != PAD).sum())
        for k in range(3):
            seq = out.sequences[row, k].tolist()
            n = int(out.lengths[row, k])
            assert n == (seq.index(EOS) + 1 if EOS in seq else 7)  # eos ends it, else max_len did
            assert all(t == PAD for t in seq[n:])
            seen.add(tuple(seq[:n]))
            expected = hypothesis_log_prob(model, src[row, :length], seq[:n]) / n ** alpha
            assert out.scores[row, k].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert len(seen) == 3, "hypotheses must be distinct"


def test_beam_search_beats_or_ties_greedy_on_raw_log_prob_with_wide_beam():
    """With no length penalty and a beam as wide as the vocabulary over 2 steps, beam
    search is exhaustive: its best 2-token hypothesis is the most likely one."""
    model = make_model()
    src = sources()[:1]
    out = model.beam_search(src, beam_size=6, max_len=2, length_penalty=0.0)  # 8 tokens but pad and bos
    best = max(hypothesis_log_prob(model, src[0], [a, b] if a != EOS else [a]) for a in range(8) for b in range(8)
               if a not in (PAD, BOS) and (a == EOS or b not in (PAD, BOS)))
    assert out.scores[0, 0].item() == pytest.approx(best, rel=1e-9)


def test_pad_and_bos_are_never_generated():
    """As fairseq: pad is only padding (after eos) and bos only the first input, even from a
    model that favours them."""
    model = make_model(steps=0)
    with torch.no_grad():
        model.out.bias[PAD] += 50.0
        model.out.bias[BOS] += 40.0
    src = sources()
    greedy = model.greedy_decode(src, max_len=4)
    assert not (greedy == PAD).any() and not (greedy == BOS).any()
    beams = model.beam_search(src, beam_size=3, max_len=4)
    for row, lengths in zip(beams.sequences.tolist(), beams.lengths.tolist()):
        for seq, n in zip(row, lengths):
            assert PAD not in seq[:n] and BOS not in seq[:n]
    assert torch.isfinite(beams.scores).all()


def test_padded_batch_equals_each_sequence_alone():
    model = make_model("lstm", "concat", num_layers=2)
    src, tgt = sources(), targets()
    tgt_in = torch.cat([torch.full((4, 1), BOS), tgt[:, :-1]], 1)
    with torch.no_grad():
        logits = model(src, tgt_in).logits
    greedy = model.greedy_decode(src)
    beam = model.beam_search(src, beam_size=3)
    for row in range(4):
        alone = src[row:row + 1, :int((src[row] != PAD).sum())]
        with torch.no_grad():
            torch.testing.assert_close(model(alone, tgt_in[row:row + 1]).logits[0], logits[row])
        g = model.greedy_decode(alone)[0]
        assert torch.equal(greedy[row, :len(g)], g) and (greedy[row, len(g):] == PAD).all()
        b = model.beam_search(alone, beam_size=3)
        width = b.sequences.shape[2]
        assert torch.equal(beam.sequences[row, :, :width], b.sequences[0])
        torch.testing.assert_close(beam.scores[row], b.scores[0])


def test_state_dict_round_trip():
    model = make_model("gru", "general", num_layers=2, steps=0)
    other = make_model("gru", "general", num_layers=2, seed=7, steps=0)
    src = sources()
    assert not torch.equal(other.out.weight, model.out.weight)
    other.load_state_dict(model.state_dict())
    assert list(other.state_dict()) == list(model.state_dict())
    tgt_in = torch.cat([torch.full((4, 1), BOS), targets()[:, :-1]], 1)
    with torch.no_grad():
        assert torch.equal(other(src, tgt_in).logits, model(src, tgt_in).logits)
    assert torch.equal(other.beam_search(src, beam_size=2).sequences, model.beam_search(src, beam_size=2).sequences)


def test_bad_input_errors():
    model = make_model()
    src = sources()
    with pytest.raises(ValueError, match="beam_size must be an int >= 1"):
        model.beam_search(src, beam_size=0)
    with pytest.raises(ValueError, match=r"beam_size 7 exceeds the 6 tokens a step can produce \(tgt_vocab_size 8"):
        model.beam_search(src, beam_size=7)
    for penalty in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="length_penalty must be a number >= 0"):
            model.beam_search(src, length_penalty=penalty)
    with pytest.raises(ValueError, match="tgt_input must be \\(batch, length\\) with length >= 1"):
        model(src, torch.ones(4, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="tgt must be \\(batch, length\\)"):
        model.loss(src, torch.tensor([EOS] * 4))
    with pytest.raises(TypeError, match="src must be a torch.Tensor"):
        model.greedy_decode(src.tolist())
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        model.greedy_decode(src, max_len=0)
    with pytest.raises(ValueError, match="src_mask must have src's shape"):
        model.greedy_decode(src, src_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="src_mask must be a bool tensor"):
        model.greedy_decode(src, src_mask=torch.ones(4, 5))
    with pytest.raises(ValueError, match="right-padded"):
        model.greedy_decode(src, src_mask=torch.tensor([[False, True, True, True, True]] * 4))
    with pytest.raises(ValueError, match="at least one real token"):
        model.greedy_decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="src must be in \\[0, 9\\)"):
        model.greedy_decode(src + 9)
    with pytest.raises(ValueError, match="tgt_input must be"):
        model(src, torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size must be even"):
        Seq2SeqConfig(9, 8, hidden_size=11)
    with pytest.raises(ValueError, match="attention must be one of"):
        Seq2SeqConfig(9, 8, attention="luong")
    with pytest.raises(ValueError, match="pad, bos and eos token ids must differ"):
        Seq2SeqConfig(9, 8, eos_token_id=0)
    with pytest.raises(ValueError, match="eos_token_id must be in"):
        Seq2SeqConfig(9, 8, eos_token_id=8)
