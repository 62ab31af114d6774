"""Hypothesis profiles for the property tests (tests/property/).

- "default" (`make test`): few examples per test (see prop_common.examples), derandomized so
  every run and CI draw the same examples; no deadline (the Triton interpreter is slow).
- "long" (ATTNKIT_HYPOTHESIS=long): 20x the examples, random each run, for nightly-style runs:
  `ATTNKIT_HYPOTHESIS=long TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/property -q`.

A failure prints the falsifying example and a `@reproduce_failure` blob (print_blob).
No example database is written: derandomized runs need none, and the blob reproduces long runs.
"""
import os

from hypothesis import HealthCheck, settings

# tests/conftest.py's autouse dispatch reset is function-scoped: it runs once per test, not per
# example, which is fine here because every example forces its backend in a `with` block.
_COMMON = dict(deadline=None, print_blob=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("default", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("ATTNKIT_HYPOTHESIS", "default"))
