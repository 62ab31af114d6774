"""gpu_check's benchmark worker (attnkit.bench.family_worker): one process for
family after family, each under its own time limit."""
import json
import os
import sys
import textwrap

import pytest

from attnkit.bench import cli, family_worker

# A stand-in worker speaking the protocol, its behaviour chosen by the request's argv[0].
STAND_IN = textwrap.dedent(f"""
    import json, os, sys, time
    for line in sys.stdin:
        request = json.loads(line)
        what = request["argv"][0]
        if what == "pid":
            print(os.getpid(), end="")  # no newline before the end marker
        elif what == "sleep":
            time.sleep(60)
        elif what == "die":
            print("dying", flush=True)
            os._exit(7)
        elif what == "deadline":
            print(request["deadline"])
        print("{family_worker.DONE} " + ("3" if what == "fail" else "0"), flush=True)
""")


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    worker = family_worker.FamilyWorker(command=[sys.executable, str(script)])
    yield worker
    worker.close()


def test_one_process_serves_family_after_family(stand_in):
    status, _, first = stand_in.run(["pid"], None, 30)
    assert status == "passed" and first.isdigit()
    assert stand_in.run(["pid"], None, 30)[2] == first  # the same process: no second start-up
    assert stand_in.run(["deadline"], 123.5, 30)[2] == "123.5\n"
    assert stand_in.run(["fail"], None, 30)[:1] == ("failed (rc 3)",)
    assert stand_in.run(["pid"], None, 30)[2] == first  # a failing family leaves the worker serving


def test_a_family_that_kills_or_outlasts_the_worker_costs_only_itself(stand_in):
    first = stand_in.run(["pid"], None, 30)[2]
    status, _, output = stand_in.run(["die"], None, 30)
    assert status == "failed (rc 7)" and output == "dying\n" and stand_in.process is None
    second = stand_in.run(["pid"], None, 30)[2]
    assert second.isdigit() and second != first  # a fresh worker for the next family
    status, taken, _ = stand_in.run(["sleep"], None, 1)
    assert status == "timed out after 1 s" and 1 <= taken < 10 and stand_in.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(second), 0)  # killed, not left running
    assert stand_in.run(["pid"], None, 30)[2] not in (first, second)


def test_serve_runs_the_cli_with_each_request_deadline(monkeypatch, capsys):
    seen = []

    def fake_main(argv):
        seen.append((argv, os.environ.get("ATTNKIT_BENCH_DEADLINE")))
        if argv == ["--bad"]:
            raise SystemExit(2)
        return 0

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setenv("ATTNKIT_BENCH_DEADLINE", "1")
    requests = [json.dumps(dict(argv=["--only", "a"], deadline=1e10)), json.dumps(dict(argv=["--bad"], deadline=None))]
    assert family_worker.serve(line + "\n" for line in requests) == 0
    assert seen == [(["--only", "a"], "10000000000.0"), (["--bad"], None)]  # a deadline of None clears the last one
    assert capsys.readouterr().out == f"{family_worker.DONE} 0\n{family_worker.DONE} 2\n"


def test_the_real_worker_reports_a_usage_error_and_keeps_serving():
    worker, pids = family_worker.FamilyWorker(), []
    try:
        for _ in range(2):
            status, _, output = worker.run(["--only", "no_such_family"], None, 120)
            assert status == "failed (rc 2)" and "invalid choice: 'no_such_family'" in output
            pids.append(worker.process.pid)
        assert pids[0] == pids[1] and worker.process.poll() is None
    finally:
        worker.close()
    assert worker.process is None
