"""One process that runs `python -m attnkit.bench` family after family for gpu_check.

On the H200 each family in a process of its own took 5-8 s to start (Python, torch,
CUDA and attnkit imports) before its first shape: a minute of the bench step's ~4 over
its eight GPU families. A worker pays that once. Each family still has a hard time
limit: one that overruns it, or kills the process, is reported as before and the next
family gets a fresh worker.

The protocol is one JSON request a line on the worker's stdin ({"argv": [...],
"deadline": seconds since the epoch or null}, what ATTNKIT_BENCH_DEADLINE becomes),
answered by the family's own output on stdout and stderr, then a line
`<DONE> <exit code>`.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback

DONE = "@@attnkit-bench-family-done"
COMMAND = [sys.executable, "-m", "attnkit.bench.family_worker"]


def serve(requests=sys.stdin) -> int:
    from . import cli  # the imports a worker exists to pay once

    for line in requests:
        request = json.loads(line)
        if request.get("deadline") is None:
            os.environ.pop("ATTNKIT_BENCH_DEADLINE", None)
        else:
            os.environ["ATTNKIT_BENCH_DEADLINE"] = str(request["deadline"])
        try:
            rc = cli.main(request["argv"])
        except SystemExit as exc:  # argparse's usage errors exit 2
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # a family's own errors are caught by run_family; this is the runner's
            traceback.print_exc()
            rc = 1
        _release_gpu_memory()
        sys.stderr.flush()
        print(f"{DONE} {rc}", flush=True)
    return 0


def _release_gpu_memory() -> None:
    """The next family starts with the memory the last one cached given back, as a process of its own did."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FamilyWorker:
    """The parent's end: run(argv, deadline, seconds) -> (status, seconds taken, output),
    status "passed", "failed (rc N)" or "timed out after N s", as gpu_check._run's."""

    def __init__(self, env=None, command=None):
        self.env = env
        self.command = command or COMMAND
        self.process = None
        self.lines = None

    def _start(self) -> None:
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, self.lines), daemon=True).start()

    def run(self, argv, deadline, seconds):
        started = time.perf_counter()
        if self.process is None:
            self._start()
        try:
            self.process.stdin.write(json.dumps(dict(argv=list(argv), deadline=deadline)) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # died at start-up: its output and exit code follow
        output = []
        limit = started + max(seconds, 1)
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, limit - time.perf_counter()))
            except queue.Empty:
                self.close(kill=True)
                return f"timed out after {seconds:.0f} s", time.perf_counter() - started, "".join(output)
            if line is None:  # the worker died: this family's fault, the next one gets a new worker
                rc = self.process.wait()
                self.process = None
                return f"failed (rc {rc})", time.perf_counter() - started, "".join(output)
            before, done, after = line.partition(DONE)  # after output with no newline of its own, mid-line
            output.append(before)
            if done:
                rc = int(after.split()[0])
                status = "passed" if rc == 0 else f"failed (rc {rc})"
                return status, time.perf_counter() - started, "".join(output)

    def close(self, kill=False) -> None:
        """Ends the worker: at once with `kill`, else after its current request (a few seconds at most)."""
        process, self.process = self.process, None
        if process is None:
            return
        if not kill:
            with contextlib.suppress(OSError):
                process.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its group: anything it started goes too
        process.wait()
        with contextlib.suppress(OSError):
            process.stdin.close()  # stdout is the pump's, closed at its end of file


def _pump(stream, lines) -> None:
    with stream:
        for line in stream:
            lines.put(line)
    lines.put(None)


if __name__ == "__main__":
    sys.exit(serve())
