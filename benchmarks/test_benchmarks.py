"""The benchmark families' quick cases under pytest-benchmark, for comparing
runs over time:

    pytest benchmarks/ --benchmark-only [--benchmark-autosave | --benchmark-compare]
    ATTNKIT_BENCH_DEVICE=cuda ATTNKIT_BENCH_DTYPE=bfloat16 ATTNKIT_BENCH_FULL=1 pytest benchmarks/ --benchmark-only

Every call a family times with timing.median_ms becomes one test, timed by
pytest-benchmark instead, on the inputs the family built for it; attnkit and
its baseline for one case share a benchmark group. Not collected by
`make test` (`pytest tests`) or CI.
"""
from __future__ import annotations

import os
import re

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from attnkit.bench import cli, core  # noqa: E402


def _environment():
    """ATTNKIT_BENCH_DEVICE / _DTYPE checked as the CLI checks --device / --dtype: a clear usage
    error naming the valid values, not a traceback at collection (or a GPU test per family)."""
    device_name = os.environ.get("ATTNKIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = os.environ.get("ATTNKIT_BENCH_DTYPE", "float32")
    try:
        device = cli.parse_device(device_name)
    except Exception as error:
        raise pytest.UsageError(f"ATTNKIT_BENCH_DEVICE: {error}") from None
    if dtype_name not in core.DTYPES:
        raise pytest.UsageError(f"ATTNKIT_BENCH_DTYPE: unknown dtype {dtype_name!r}; one of {', '.join(core.DTYPES)}")
    return device, getattr(torch, dtype_name)


DEVICE, DTYPE = _environment()
QUICK = os.environ.get("ATTNKIT_BENCH_FULL", "") in ("", "0")


def _cases():
    params = []
    for name in core.families():
        try:
            cases = core.enumerate_cases(name, DEVICE, DTYPE, quick=QUICK)
        except Exception as exc:  # reported as one failing test below, not a collection error
            params.append(pytest.param(name, 0, "", "", "", exc, id=f"{name}-setup-failed"))
            continue
        if not cases:
            params.append(pytest.param(name, 0, "", "", "", None, id=f"{name}-no-cases",
                                       marks=pytest.mark.skip(reason=f"{name} times nothing on {DEVICE}")))
        for index, case, shape, side in cases:
            test_id = re.sub(r"[^\w=.+-]+", "_", f"{name}-{index:02d}-{case}-{shape}-{side}").strip("_")
            params.append(pytest.param(name, index, case, shape, side, None, id=test_id))
    return params


@pytest.mark.parametrize("family,index,case,shape,side,setup_error", _cases())
def test_family_case(benchmark, family, index, case, shape, side, setup_error):
    if setup_error is not None:
        raise setup_error
    benchmark.group = f"{family}: {case} {shape}"
    benchmark.extra_info.update(device=str(DEVICE), dtype=str(DTYPE).replace("torch.", ""), side=side)
    try:
        core.call_case(family, index, DEVICE, DTYPE, benchmark, quick=QUICK)
    except core.CaseSkipped as exc:
        pytest.skip(f"{family} skipped this call: {exc}")
