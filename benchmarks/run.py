"""Kept so `python benchmarks/run.py [options]` still works: the runner is
attnkit.bench (`python -m attnkit.bench --help`, `make bench`), same options.

FAMILIES is the one list of benchmark families (module names in this
directory, each with TITLE and run(device, dtype, quick) -> rows): append new
families here; attnkit.bench, `make bench` and benchmarks/test_benchmarks.py
all read it from here.
"""
from __future__ import annotations

import sys

FAMILIES = ["lstm_cell", "gru_cell", "attention", "attention_cpu", "positional", "rnn", "transformer", "models", "additive_attention",
            "rope_attention", "linear"]


def main(argv=None) -> int:
    from attnkit.bench import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
