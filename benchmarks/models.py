"""BERT and GPT-2 on attnkit (attnkit.models) vs Hugging Face transformers with the same
(random) weights. BERT: forward on a padded batch (lengths evenly spread), attnkit unpadding
to flash_attention_varlen vs transformers' "sdpa" and "eager" attention. GPT-2: greedy
generation with a KV cache, attnkit's generate vs transformers' generate (time per call;
speedup = tokens/s ratio). Needs transformers (skipped without it)."""
from __future__ import annotations

import statistics

import torch
from timing import max_error, median_ms, within_budget

import attnkit
from attnkit.models import BertModel, GPT2LMHeadModel, gpt2

TITLE = "BERT padded-batch forward and GPT-2 generation: attnkit.models vs transformers"
BERT_QUICK = dict(layers=2, batch=8, min_len=16, max_len=64)  # BERT-base width, 2 layers
BERT_FULL = dict(layers=12, batch=32, min_len=16, max_len=256)  # the case: BERT-base, B=32, 16..256
GPT_QUICK = dict(layers=4, batch=1, prompt=16, new=16)  # GPT-2 small width and vocabulary, 4 layers
GPT_FULL = dict(layers=12, batch=1, prompt=128, new=256)  # GPT-2 small, 256 new tokens after 128


def paired_ms(fns, device, rounds, repeats):
    """Medians over alternating rounds: on a shared machine the load drifts within seconds.
    Callers have run each fn once already (warm-up)."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, acc in zip(fns, times):
            acc.append(median_ms(fn, device, warmup=0, repeats=repeats))
    return [statistics.median(t) for t in times]


def bert_rows(transformers, case, device, dtype, rounds, repeats):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=case["layers"], hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # BERT-base otherwise
    hf = transformers.BertModel(config, add_pooling_layer=False).to(device, dtype).eval()
    ours = BertModel.from_hf(hf, add_pooling_layer=False).to(device, dtype)
    batch = case["batch"]
    lengths = torch.linspace(case["min_len"], case["max_len"], batch).round().long()
    mask = (torch.arange(case["max_len"])[None] < lengths[:, None]).long().to(device)
    ids = torch.randint(1, config.vocab_size, (batch, case["max_len"]), device=device)
    real = mask.bool()
    shape = (f"L={case['layers']} d=768 B={batch} N={case['min_len']}..{case['max_len']} "
             f"pad={1 - real.float().mean().item():.0%}")
    rows = []
    with torch.no_grad():
        ours_fn = lambda: ours(ids, mask)  # noqa: E731
        error = max_error(ours_fn()[0][real], hf(input_ids=ids, attention_mask=mask).last_hidden_state[real])
        backend = attnkit.last_dispatch("flash_attention").backend
        for impl in ("sdpa", "eager"):
            hf.set_attn_implementation(impl)
            hf_fn = lambda: hf(input_ids=ids, attention_mask=mask)  # noqa: E731
            hf_fn()
            t_ours, t_theirs = paired_ms([ours_fn, hf_fn], device, rounds, repeats)
            rows.append(dict(case=f"BERT forward vs {impl}", shape=shape, backend=backend, ours_ms=t_ours,
                             baseline_ms=t_theirs, max_err=error))
    return rows


def gpt_rows(transformers, case, device, dtype, rounds, repeats):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=case["layers"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     eos_token_id=None, bos_token_id=None)  # GPT-2 small; no eos: full length
    hf = transformers.GPT2LMHeadModel(config).to(device, dtype).eval()
    hf.generation_config.eos_token_id = None
    ours = GPT2LMHeadModel.from_hf(hf).to(device, dtype)
    ids = torch.randint(0, config.vocab_size, (case["batch"], case["prompt"]), device=device)
    new = case["new"]
    hf_fn = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,  # noqa: E731
                                pad_token_id=0)
    reference = hf_fn()
    # On a GPU also with each decode step replayed from a CUDA graph (decode_graph.py); transformers
    # runs its default (eager, dynamic cache) generate in both rows.
    variants = [("GPT-2 greedy generate", False)] + ([("GPT-2 greedy generate, CUDA graph", True)]
                                                     if device.type == "cuda" else [])
    fns = [lambda graphed=graphed: ours.generate(ids, new, cuda_graph=graphed) for _, graphed in variants]
    outputs = [fn() for fn in fns]
    op = "attention_decode"
    backend = f"{attnkit.last_dispatch(op).backend} ({op})"
    *t_ours, t_theirs = paired_ms(fns + [hf_fn], device, rounds, repeats)  # one baseline, timed alternating
    tokens = case["batch"] * new
    rows = []
    for (label, _), a, t in zip(variants, outputs, t_ours):
        same = int((a == reference).all(dim=1).sum())
        shape = (f"L={case['layers']} d=768 B={case['batch']} prompt={case['prompt']} new={new} "
                 f"{tokens / t * 1e3:.0f} vs {tokens / t_theirs * 1e3:.0f} tok/s, same tokens {same}/{case['batch']}")
        rows.append(dict(case=label, shape=shape, backend=backend, ours_ms=t, baseline_ms=t_theirs,
                         max_err=float((a != reference).sum())))
    return rows


def skip_reason(device: torch.device, dtype: torch.dtype):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "skipped: the baseline needs transformers (pip install transformers)"
    return None


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    try:
        import transformers
    except ImportError:
        return []
    transformers.logging.set_verbosity_error()
    rounds, repeats = 3, 1
    cases = [(bert_rows, BERT_QUICK if quick else BERT_FULL, "BERT"),
             (gpt_rows, GPT_QUICK if quick else GPT_FULL, "GPT-2")]
    rows = []
    for measure, case, _ in within_budget(cases, rows, lambda case: case[2]):
        rows += measure(transformers, case, device, dtype, rounds, repeats)
    return rows
