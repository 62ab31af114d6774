"""Generate from a local GPT-2 checkpoint directory, streaming tokens as they come.

    python -m attnkit.generate --model DIR --prompt-ids 464 2068 --max-new-tokens 20
    python -m attnkit.generate --model DIR --prompt "Hello" --do-sample --top-p 0.9

Text prompts (and text output) need a tokenizer in DIR and transformers installed; with
--prompt-ids the ids of the new tokens are printed, or their text when a tokenizer loads.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from .bench.cli import parse_device
from .models import GPT2LMHeadModel


def load_tokenizer(path: str):
    """transformers' tokenizer saved in `path`, or None (no tokenizer files, or no transformers)."""
    # transformers may build an empty tokenizer from config.json alone: require its files.
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local checkpoint directory (config.json + weights)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=int, nargs="+", help="prompt token ids")
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in --model and transformers)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="0: no top-k filtering (default 50, as transformers)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--eos-token-id", type=int, default=None, help="default: the config's eos_token_id")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ids", action="store_true", help="print token ids even when a tokenizer is available")
    parser.add_argument("--device", type=parse_device, default="cpu", help="cpu or cuda[:N] (where a GPU is)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on a GPU, replay each decode step from a CUDA graph (not yet run on a GPU)")
    args = parser.parse_args(argv)

    try:
        model = GPT2LMHeadModel.from_pretrained(args.model).to(args.device)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    tokenizer = load_tokenizer(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            parser.error(f"--prompt needs a tokenizer in {args.model} and transformers installed; use --prompt-ids")
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        ids = torch.tensor([args.prompt_ids])
    generator = torch.Generator(args.device).manual_seed(args.seed) if args.seed is not None else None
    as_text = tokenizer is not None and not args.ids
    try:
        stream = model.stream(ids.to(args.device), args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              eos_token_id=args.eos_token_id, generator=generator, cuda_graph=args.cuda_graph)
        new = []
        for token in stream:
            new.append(int(token[0]))
            # Decoding the whole continuation each time keeps multi-token characters intact.
            if as_text:
                text = tokenizer.decode(new)
                sys.stdout.write(text[len(tokenizer.decode(new[:-1])):])
            else:
                sys.stdout.write(f"{new[-1]} ")
            sys.stdout.flush()
    except ValueError as error:  # bad ids, too long for the position table
        parser.error(str(error))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
