"""Learn to reverse sequences with attnkit.models.Seq2Seq (bidirectional LSTM encoder,
attention decoder), on synthetic data, on a CPU in a few minutes.

    python examples/seq2seq_reverse.py                     # full run: >= 99% exact match held out
    python examples/seq2seq_reverse.py --steps 50 --eval-every 25 --test-size 64   # smoke run

Sources are random strings of `--symbols` letters, `--min-len` to `--max-len` long; the target
is the string reversed. The held-out set is drawn first and its strings never appear in
training batches. Prints the training loss, the held-out exact-match accuracy (greedy
decoding; the whole output sequence must be right) and saves an attention heatmap for one
held-out example: a clean anti-diagonal when the model has learnt to reverse.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import List, Optional, Sequence

import torch

from attnkit.models import Seq2Seq, Seq2SeqConfig

PAD, BOS, EOS, FIRST = 0, 1, 2, 3  # symbol i is token FIRST + i


def sample(rng: random.Random, count: int, symbols: int, min_len: int, max_len: int,
           exclude=frozenset()) -> List[tuple]:
    """`count` random strings (tuples of symbol indices), none of them in `exclude`."""
    out = []
    while len(out) < count:
        s = tuple(rng.randrange(symbols) for _ in range(rng.randint(min_len, max_len)))
        if s not in exclude:
            out.append(s)
    return out


def batch(strings: Sequence[tuple]):
    """(src (B, S) right-padded, tgt (B, S + 1) = reversed + eos, padded)."""
    width = max(len(s) for s in strings)
    src = torch.full((len(strings), width), PAD, dtype=torch.long)
    tgt = torch.full((len(strings), width + 1), PAD, dtype=torch.long)
    for row, s in enumerate(strings):
        tokens = torch.tensor(s, dtype=torch.long) + FIRST
        src[row, :len(s)] = tokens
        tgt[row, :len(s)] = tokens.flip(0)
        tgt[row, len(s)] = EOS
    return src, tgt


def exact_match(model: Seq2Seq, strings: Sequence[tuple], batch_size: int = 256) -> float:
    model.eval()
    right = 0
    for start in range(0, len(strings), batch_size):
        src, tgt = batch(strings[start:start + batch_size])
        out = model.greedy_decode(src, max_len=tgt.shape[1])
        out = torch.nn.functional.pad(out, (0, tgt.shape[1] - out.shape[1]), value=PAD)
        right += int((out == tgt).all(1).sum())
    model.train()
    return right / len(strings)


def plot_attention(model: Seq2Seq, string: tuple, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model.eval()
    src, _ = batch([string])
    tokens, weights = model.greedy_decode(src, max_len=len(string) + 1, return_attention=True)
    names = lambda ids: ["<eos>" if i == EOS else "<pad>" if i == PAD else chr(ord("a") + i - FIRST) for i in ids]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    image = ax.imshow(weights[0].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(string)), names(src[0].tolist()))
    ax.set_yticks(range(tokens.shape[1]), names(tokens[0].tolist()))
    ax.set_xlabel("source token (encoder position)")
    ax.set_ylabel("generated token (decoder step)")
    ax.set_title(f"{model.config.attention} attention weights, reversing a string")
    fig.colorbar(image, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps (batches)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--symbols", type=int, default=12, help="alphabet size")
    parser.add_argument("--min-len", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--rnn-type", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--attention", choices=["bahdanau", "dot", "general", "concat"], default="bahdanau")
    parser.add_argument("--test-size", type=int, default=1000, help="held-out strings")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; these matrices are small, and on a shared machine more threads "
                             "than free cores made each step ~10x slower")
    parser.add_argument("--plot", default="seq2seq_reverse_attention.png",
                        help="attention heatmap (PNG; needs matplotlib); '' for none")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "symbols", "min_len", "test_size", "eval_every", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_len < args.min_len:
        parser.error(f"--max-len ({args.max_len}) must be at least --min-len ({args.min_len})")
    distinct = sum(args.symbols ** length for length in range(args.min_len, args.max_len + 1))
    if 2 * args.test_size > distinct:  # training samples strings outside the held-out set: leave it most of them
        parser.error(f"--test-size {args.test_size} leaves too few of the {distinct} distinct strings for training; "
                     f"use at most {distinct // 2}, or more --symbols or a longer --max-len")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    held_out = sample(rng, args.test_size, args.symbols, args.min_len, args.max_len)
    excluded = frozenset(held_out)
    model = Seq2Seq(Seq2SeqConfig(
        src_vocab_size=FIRST + args.symbols, tgt_vocab_size=FIRST + args.symbols, embedding_size=args.embedding_size,
        hidden_size=args.hidden_size, rnn_type=args.rnn_type, attention=args.attention, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS, max_decode_length=args.max_len + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        src, tgt = batch(sample(rng, args.batch_size, args.symbols, args.min_len, args.max_len, excluded))
        loss = model.loss(src, tgt)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            recent = sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.perf_counter() - start:6.1f} s", flush=True)
    accuracy = exact_match(model, held_out)
    seconds = time.perf_counter() - start
    print(f"held-out exact match: {accuracy:.2%} of {len(held_out)} strings ({seconds:.0f} s)")
    if args.plot:
        try:
            plot_attention(model, max(held_out[:20], key=len), args.plot)
            print(f"attention heatmap: {args.plot}")
        except ImportError:
            print("attention heatmap skipped: matplotlib is not installed (pip install 'attnkit[bench]')")
    return {"accuracy": accuracy, "losses": losses, "seconds": seconds, "plot": args.plot}


if __name__ == "__main__":
    main()
