"""The benchmark suite: `python -m attnkit.bench` (what `make bench` runs) and
`python -m attnkit.bench.gpu_check` (`make gpu-check`). The families live in
the repository's benchmarks/ directory, installed as attnkit.benchmarks."""
from .cli import main

__all__ = ["main"]
