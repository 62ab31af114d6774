"""Bad and odd input to every public op (tests/fuzz_cases.py builds the cases):
each call raises a clear ValueError/TypeError/RuntimeError/NotImplementedError
naming the argument, or gives the reference's result (odd strides, stride-0,
zero sizes, NaN/Inf). The cases run in one subprocess per backend, so a crash
fails the test that names the case instead of killing pytest.

ATTNKIT_FUZZ_BACKENDS=cpp limits the backends (make test-asan runs the cpp one
under AddressSanitizer/UBSan)."""
import json
import os
import subprocess
import sys

import pytest

import attnkit
from attnkit import _dispatch

import fuzz_cases

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = os.environ.get("ATTNKIT_FUZZ_BACKENDS", "cpp,reference,triton").split(",")
# Triton runs under the interpreter only a handful of cases of the ops it implements.
TRITON_OPS = ("flash_attention", "rotary", "attention_decode")
_results = {}


def _batch(backend):
    """{case id: result} of one subprocess over every op; a crash is recorded on its case."""
    if backend in _results:
        return _results[backend]
    argv = [sys.executable, os.path.join(HERE, "fuzz_cases.py"), backend]
    env = dict(os.environ)
    if backend == "triton":
        argv += ["--quick", *TRITON_OPS]
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    results, started = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            started = line[6:]
        elif line.startswith("{"):
            result = json.loads(line)
            results[result["id"]] = result
            started = None
    if proc.returncode != 0:
        crashed = started or "<before the first case>"
        results[crashed] = {"id": crashed, "verdict": "fail",
                            "detail": f"worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}"}
    _results[backend] = results
    return results


def _params():
    for backend in BACKENDS:
        for op in fuzz_cases.OPS:
            if backend == "triton" and op not in TRITON_OPS:
                continue
            yield pytest.param(backend, op, id=f"{backend}-{op}")


@pytest.mark.parametrize("backend,op", list(_params()))
def test_bad_input_raises_clearly_or_matches_reference(backend, op):
    if not attnkit.available_backends()[backend].available and backend != "triton":
        pytest.skip(attnkit.available_backends()[backend].reason)
    if op == "additive_attention" and not fuzz_cases.OPS[op]():
        pytest.skip("attnkit.ops.additive_attention is not in this tree yet")
    dispatch_name = fuzz_cases.DISPATCH_NAME.get(op, op)
    if backend not in _dispatch._OPS[dispatch_name].implementations:
        pytest.skip(f"no {op} implementation in the {backend} backend")
    results = {k: v for k, v in _batch(backend).items() if k.startswith(op + "/") or k.startswith("<")}
    failures = [f"{r['id']}: {r['detail']}" for r in results.values() if r["verdict"] != "ok"]
    assert not failures, f"{len(failures)} of {len(results)} cases:\n" + "\n".join(failures)
    ran = [r for r in results.values() if "declined" not in r["detail"]]
    assert len(ran) >= (5 if backend == "triton" else 50), f"only {len(ran)} cases ran the {backend} backend"


def test_worker_crash_is_reported_on_its_case(tmp_path, monkeypatch):
    """The harness itself: a worker that dies mid-case fails on that case."""
    script = tmp_path / "fuzz_cases.py"
    script.write_text("import os\nprint('START x/crash', flush=True)\nos.abort()\n")
    monkeypatch.setattr(sys.modules[__name__], "HERE", str(tmp_path))
    monkeypatch.setitem(_results, "__crash__", None)
    _results.pop("__crash__")
    results = _batch("__crash__")
    _results.pop("__crash__")
    assert results["x/crash"]["verdict"] == "fail" and "exited with" in results["x/crash"]["detail"]
