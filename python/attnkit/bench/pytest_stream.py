"""A pytest plugin for gpu-check: one JSON line per test event, written as it
happens, to the file named by ATTNKIT_TEST_STREAM.

JUnit XML is written only when pytest ends, so a suite killed at the check's
deadline left no record of which tests had failed or were still running (twice
on the H200). This file survives the kill. Under pytest-xdist the controller
receives every worker's events, so only it writes; the workers stay quiet.

    pytest -p attnkit.bench.pytest_stream ...
"""
from __future__ import annotations

import json
import os
import time

STREAM_ENV = "ATTNKIT_TEST_STREAM"
EXCERPT_CHARS = 4000


def _write(record):
    path = os.environ.get(STREAM_ENV)
    if not path or hasattr(_config, "workerinput"):  # an xdist worker: the controller writes
        return
    # One write per line in append mode: lines from pytests running side by side stay whole.
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


_config = None  # the pytest config, for _write's worker check


def pytest_configure(config):
    global _config
    _config = config


def pytest_runtest_logstart(nodeid, location):
    _write({"id": nodeid, "event": "start", "at": round(time.time(), 2)})


def pytest_runtest_logreport(report):
    # "at" and "worker" (xdist's gateway id, on the controller's copy of a report): which tests
    # queued on one worker, and when, where a suite's wall time outruns its tests' seconds.
    record = {"id": report.nodeid, "event": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3), "at": round(time.time(), 2)}
    worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
    if worker is not None:
        record["worker"] = worker
    if report.failed:
        record["excerpt"] = str(report.longreprtext)[-EXCERPT_CHARS:]
    _write(record)


def summarize(path):
    """(counts, failures, unfinished, slowest) from a stream file, or None where it
    holds nothing: counts {passed, failed, errors, skipped}; failures [(id, excerpt)];
    unfinished, the ids started but never reported done (running when killed);
    slowest, [(id, seconds)] longest first, ten at most."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip().endswith("}")]
    except OSError:
        return None
    if not records:
        return None
    phases, excerpts, seconds, started = {}, {}, {}, []
    for record in records:
        test = record["id"]
        if record["event"] == "start":
            started.append(test)
            continue
        phases.setdefault(test, {})[record["event"]] = record["outcome"]
        seconds[test] = seconds.get(test, 0.0) + record.get("seconds", 0.0)
        if record["outcome"] == "failed":
            excerpts.setdefault(test, record.get("excerpt", ""))
    # Done: torn down, or failed (a crashed xdist worker's test gets a failed report and no teardown).
    done = {test for test, seen in phases.items() if "teardown" in seen or "failed" in seen.values()}
    outcome = {test: _outcome(phases[test]) for test in phases if test in done}
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for result in outcome.values():
        counts[result] += 1
    failures = [(test, excerpts.get(test, "")) for test, result in outcome.items() if result in ("failed", "errors")]
    unfinished = [test for test in dict.fromkeys(started) if test not in done]
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:10]
    return counts, failures, unfinished, slowest


def _outcome(phases):
    """A test's result as pytest counts it, from its {phase: outcome}."""
    if "failed" in (phases.get("call"), phases.get("???")):  # "???": xdist's report for a crashed worker's test
        return "failed"
    if "failed" in phases.values():
        return "errors"  # in setup or teardown
    if "skipped" in (phases.get("setup"), phases.get("call")):
        return "skipped"
    return "passed"
