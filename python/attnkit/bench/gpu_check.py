"""python -m attnkit.bench.gpu_check (`make gpu-check`): the one command for a
machine with a GPU. Rebuilds attnkit with the CUDA extension required (from a
source checkout), runs the GPU test suite (`pytest -m "gpu or (cuda_build and
not aot_compile)"`: the ahead-of-time compile check is CI's)
and the full benchmarks on the GPU, and writes one report: <out>/gpu-report.md,
gpu-report.json and the plots, within a time budget (9 minutes by default).

Without a GPU it runs as a dry run on the CPU (Triton under the interpreter,
the GPU-marked tests skip, the quick benchmarks), so the pipeline itself can
be checked anywhere; the report says so at the top.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

from . import cli, core, family_worker, pytest_stream, report


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(command, seconds, env=None, cwd=None):
    """(status, seconds taken, combined output); status "passed", "failed (rc N)" or "timed out"."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(seconds, 1), env=env, cwd=cwd)
        status = "passed" if done.returncode == 0 else f"failed (rc {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {seconds:.0f} s"
        parts = (exc.stdout, exc.stderr)
        output = "".join(part.decode() if isinstance(part, bytes) else (part or "") for part in parts)
    return status, time.perf_counter() - started, output


def build(root, seconds, side_commands=(), warm_up=()):
    """pip install -e with the CUDA extension required: (status, seconds taken,
    output, (side status, side output), (warm-up status, warm-up output)).
    `side_commands` (the Triton prewarm) run beside it, each on a core of its
    own: after the first minute the build is one or two long nvcc compiles, and
    the other cores would sit idle (on the H200 it took 82 s of a 540 s check).
    `warm_up` (see warm_up_commands) runs beside them too, and is stopped once
    the build and the side commands have ended."""
    env = dict(os.environ, ATTNKIT_REQUIRE_CUDA="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in env:
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: a short build
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", root]
    started = time.perf_counter()
    commands = [command, *side_commands, *warm_up]
    results = _run_parallel(commands, len(commands), seconds, env, root, best_effort=len(warm_up))
    (status, output), side_results = results[0], results[1:1 + len(side_commands)]
    warm_results = results[1 + len(side_commands):]
    warm_status = "; ".join(dict.fromkeys(_warm_up_status(s) for s, _ in warm_results)) or "not run"
    _, warm_output = _side_outcome(warm_up, warm_results)  # its statuses read as _warm_up_status says
    return (status, time.perf_counter() - started, output, _side_outcome(side_commands, side_results),
            (warm_status, warm_output))


def warm_up_commands(paths, jobs, xdist=None):
    """The GPU tests run once beside the build to fill Triton's cache, their
    results not counted: the build leaves most cores idle, and the suite is
    Triton compiles above all (on the H200: 58 s with the cache warm, past 200 s
    cold). Without the extensions, which the build is rewriting: the tests that
    need them fail at once, the Triton ones compile what the real run will
    find cached (ATTNKIT_NO_EXTENSIONS is not part of Triton's cache key)."""
    if xdist is None:
        xdist = importlib.util.find_spec("xdist") is not None
    workers = ["-n", str(jobs), "--dist", xdist_distribution()] if xdist and jobs > 1 else []
    return [_niced(["env", "ATTNKIT_NO_EXTENSIONS=1", sys.executable, "-m", "pytest", "-m", "gpu and not cuda_build",
                    "-q", "-p", "no:cacheprovider", *paths, *workers])]


def xdist_distribution():
    """'worksteal' where pytest-xdist has it (3.2 on): an idle worker takes half of a busy
    one's queue. Under 'load' the H200 suite's four longest tests (35-45 s each) queued on
    one worker of 14 and ran in a row at its end (2026-11-27)."""
    try:
        version = importlib.metadata.version("pytest-xdist")
    except importlib.metadata.PackageNotFoundError:
        return "load"
    major, minor = (int(part) if part.isdigit() else 0 for part in (version.split(".") + ["0"])[:2])
    return "worksteal" if (major, minor) >= (3, 2) else "load"


def _warm_up_status(status):
    if status in ("passed", "failed (rc 1)"):  # rc 1: some tests failed, as those needing the extensions do
        return "ran to the end"
    return "stopped when the build ended" if status == STOPPED else status


def _side_outcome(commands, results):
    """(status, output) of the side commands together: each distinct failure once, or "passed"."""
    bad = [status for status, _ in results if status != "passed"]
    output = "\n".join(f"$ {' '.join(command[1:])}\n{text}" for command, (_, text) in zip(commands, results))
    return "; ".join(dict.fromkeys(bad)) or "passed", output


# The ahead-of-time compile check (aot_compile) is CI's, in `make cuda-check`: on a GPU the suite
# compiles the same kernels for this GPU and runs them, and the check's one-core compiles for two
# architectures outlasted the rest of the suite on the H200.
MARKERS = "gpu or (cuda_build and not aot_compile)"


def _selected_files(root, paths, env, seconds):
    """The test files holding selected tests, most tests first (None when collection fails)."""
    # --rootdir: test ids relative to `root`, where the shards run.
    command = [sys.executable, "-m", "pytest", "-m", MARKERS, "--collect-only", "-q", "-p", "no:cacheprovider",
               "--rootdir", root, *paths]
    status, _, output = _run(command, seconds, env=env, cwd=root)
    if status != "passed":
        return None
    per_file = {}
    for line in output.splitlines():
        if "::" in line:
            name = line.split("::", 1)[0]
            per_file[name] = per_file.get(name, 0) + 1
    if not all(os.path.isfile(os.path.join(root, name)) for name in per_file):
        return None
    return sorted(per_file, key=lambda name: -per_file[name])


def run_tests(root, out_dir, seconds, paths, extra, jobs=None, side_commands=(), xdist=None):
    """pytest -m MARKERS over `paths`, `jobs` processes at a time on
    a GPU: Triton compiles each kernel variant on one CPU core, and the suite's
    compiles dominate its run time. With pytest-xdist installed (`xdist`: None
    asks), one pytest hands out single tests to `jobs` workers; else one pytest
    per test file, whose longest file (tens of compiles) bounds the run.
    `side_commands` (the Triton prewarm) run beside them, each on a core of its
    own, under the same deadline; their outcome is returned last, apart from the
    tests'. Returns (status, seconds, output, pytest_stream.summarize's summary
    or None, (side status, side output)); the stream is <out_dir>/gpu-tests.jsonl."""
    cwd = root or os.getcwd()
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the dry run: Triton kernels on CPU tensors
    if jobs is None:
        # The cores the side commands leave, two spare (12 workers ran the H200 suite in 58 s,
        # Triton's cache warm; 8 beside 14 prewarm processes did not finish it in 206 s, cold).
        cores = (os.cpu_count() or 2) - len(side_commands) - 2
        jobs = max(1, min(14, cores)) if torch.cuda.is_available() else 1
    if xdist is None:
        xdist = importlib.util.find_spec("xdist") is not None
    started = time.perf_counter()
    files = _selected_files(cwd, paths, env, min(120, seconds)) if jobs > 1 and not xdist else None
    shards = [[f] for f in files] if files else [list(paths)]
    if jobs > 1 and xdist:
        shards = [[*paths, "-n", str(jobs), "--dist", xdist_distribution()]]
    stream = os.path.join(out_dir, "gpu-tests.jsonl")
    if os.path.exists(stream):
        os.remove(stream)  # never count a previous run's results
    env[pytest_stream.STREAM_ENV] = os.path.abspath(stream)
    commands = [[sys.executable, "-m", "pytest", "-m", MARKERS, "-q", "-p", "no:cacheprovider",
                 "-p", "attnkit.bench.pytest_stream", *shard, *extra] for shard in shards]
    side_commands = list(side_commands)
    results = _run_parallel(side_commands + commands, jobs + len(side_commands),
                            seconds - (time.perf_counter() - started), env, cwd)
    side_results, results = results[:len(side_commands)], results[len(side_commands):]
    summary = pytest_stream.summarize(stream)
    statuses = [status for status, _ in results]
    if all(status.startswith("failed (rc 5)") for status in statuses):  # pytest: nothing selected
        status = "no tests selected"
    else:
        bad = [status for status in statuses if status != "passed" and not status.startswith("failed (rc 5)")]
        status = "; ".join(dict.fromkeys(bad)) or "passed"  # each distinct outcome once, in shard order
    output = "\n".join(f"$ {' '.join(command[1:])}\n{text}" for command, (_, text) in zip(commands, results))
    return status, time.perf_counter() - started, output, summary, _side_outcome(side_commands, side_results)


def _run_parallel(commands, jobs, seconds, env, cwd, best_effort=0):
    """[(status, output)] of each command, at most `jobs` running at once; any
    still running at the deadline is killed ("timed out"). The last
    `best_effort` commands (a cache warm-up) are stopped once all the others
    have ended. Each command runs in a process group of its own, killed whole:
    a killed pytest's xdist workers would otherwise go on compiling and
    running GPU tests into the next step."""
    deadline = time.perf_counter() + max(seconds, 1)
    needed = len(commands) - best_effort
    pending, running, results = list(enumerate(commands)), {}, [None] * len(commands)

    def finish(index, status):
        process, log = running.pop(index)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.seek(0)
        results[index] = (status, log.read())
        log.close()

    try:
        while pending or running:
            while pending and len(running) < jobs and time.perf_counter() < deadline:
                index, command = pending.pop(0)
                log = tempfile.TemporaryFile(mode="w+")
                running[index] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                                   cwd=cwd, start_new_session=True), log)
            needed_done = all(results[i] is not None for i in range(needed)) and not any(
                i < needed for i, _ in pending)
            for index, (process, _) in list(running.items()):
                if process.poll() is not None:
                    finish(index, "passed" if process.returncode == 0 else f"failed (rc {process.returncode})")
                elif time.perf_counter() >= deadline:
                    finish(index, f"timed out after {seconds:.0f} s")
                elif index >= needed and needed_done:
                    finish(index, STOPPED)
            if pending and (time.perf_counter() >= deadline or needed_done and pending[0][0] >= needed):
                for index, _ in pending:
                    results[index] = (STOPPED if index >= needed and needed_done else "not run: out of time", "")
                pending = []
            time.sleep(0.05)
    finally:  # an interrupted gpu-check leaves nothing running
        for index in list(running):
            finish(index, "interrupted")
    return results


STOPPED = "stopped: the rest had ended"


def _niced(command):
    """`command` at a low CPU priority where `nice` exists: work beside the build
    (the Triton warm-up) takes the cores the build leaves idle, not the build's."""
    return ["nice", "-n", "10", *command] if shutil.which("nice") else list(command)


# Roughly the seconds each family's full mode takes on an H200, as weights for sharing out the bench
# step's time: transformer and positional as the gpu-check of 2026-11-26 17:56 UTC read them;
# attention stopped at its soft deadline there (87 s) and measures more shapes with more time;
# models, additive_attention and rope_attention estimated from their rows' times in an earlier run;
# rnn read 21 s there, before its CUDA-graph and cluster rows (estimated at about as much again).
FULL_SECONDS = {"attention": 200, "transformer": 50, "models": 45, "rnn": 40, "rope_attention": 15,
                "additive_attention": 10, "positional": 5}
# Families that measure nothing on a GPU (their run() returns no rows there): not started on one.
CPU_ONLY_FAMILIES = ("attention_cpu", "linear")
STARTUP_SECONDS = 8.0  # a worker process: Python, torch, CUDA and attnkit imports, before its first shape
FAMILY_SECONDS = 1.0  # a family in a running worker: its module's import and its JSON and plots


def _soft_share(left, name, later, started=False):
    """Seconds family `name` may use of the `left`, before `later` families:
    the worker's start-up (unless `started`) and a second a family, then the
    remainder in proportion to each family's expected time."""
    weights = [max(1.0, FULL_SECONDS.get(family, 1.0)) for family in [name, *later]]
    startup = 0.0 if started else STARTUP_SECONDS
    spare = max(0.0, left - startup - FAMILY_SECONDS * len(weights))
    return startup + FAMILY_SECONDS + spare * weights[0] / sum(weights)


def run_bench(out_dir, seconds, device, full, only, dtype):
    """The families one after another in one worker process (family_worker), so
    that a family that crashes the process or overruns the budget loses only its
    own table; merged into gpu-report.json."""
    started = time.perf_counter()
    base, families, outputs = None, {}, []
    names = every_name = only or core.families()
    if torch.device(device).type == "cuda":
        skipped = [name for name in names if name in CPU_ONLY_FAMILIES]
        families.update({name: {"title": name, "rows": [], "seconds": 0.0} for name in skipped})
        names = [name for name in names if name not in skipped]
    worker = family_worker.FamilyWorker()
    try:
        for index, name in enumerate(names):
            left = seconds - (time.perf_counter() - started)
            path = os.path.join(out_dir, f"gpu-report-{name}.json")
            if os.path.exists(path):
                os.remove(path)  # never report a previous run's numbers
            argv = ["--device", str(device), "--dtype", dtype, "--only", name, "--json", path, "--out", out_dir,
                    "--no-progress", "--full" if full else "--quick"]
            # Families that can run long stop between shapes at this soft deadline (benchmarks/timing.py
            # within_budget), their share of what is left, so that one long family (attention: FlexAttention
            # compiles per shape) cannot leave the rest no time at all; the margin lets the shape in progress end.
            later = names[index + 1:]
            share = _soft_share(left, name, later, started=worker.process is not None)
            deadline = time.time() + share - min(30.0, share / 4)
            # The hard limit keeps the later families their seconds and a worker's start-up, in case
            # this family has to be killed.
            left = left - (STARTUP_SECONDS + FAMILY_SECONDS * len(later) if later else 0.0)
            status, _, output = worker.run(argv, deadline, left) if left > 1 else ("not run: out of time", 0.0, "")
            outputs.append(f"$ -m attnkit.bench {' '.join(argv)}\n{output}")
            try:
                with open(path) as f:
                    document = json.load(f)
            except (OSError, json.JSONDecodeError):
                document = None
            base = base or document
            # No results file: the family died or ran out of time; the status says which.
            families[name] = (document or {}).get("families", {}).get(name) or {
                "title": name, "rows": [], "seconds": None, "error": status}
    finally:
        worker.close()
    taken = time.perf_counter() - started
    if base is None:
        return "failed: no family wrote results", taken, "\n".join(outputs), None
    families = {name: families[name] for name in every_name}  # the families' own order
    merged = dict(base, families=families, mode="full" if full else "quick", seconds=round(taken, 2))
    with open(os.path.join(out_dir, "gpu-report.json"), "w") as f:
        json.dump(merged, f, indent=1)
    failed = [name for name, family in families.items() if family.get("error")]
    return ("passed" if not failed else f"failed: {', '.join(failed)}"), taken, "\n".join(outputs), merged


def prewarm_commands(args):
    """One process per autotune candidate of the attention kernels: each compiles
    its candidate at every head dim and mask the attention family times, so the
    benchmark's autotuner finds all of them in Triton's cache."""
    from attnkit.triton_kernels.flash_attention_launch import config_count

    dtype = torch.bfloat16 if args.dtype == "float32" else getattr(torch, args.dtype)  # as benchmarks/attention.py
    candidates = max(config_count(dim, dtype) for dim in (64, 128))
    return [_niced([sys.executable, "-m", "attnkit.bench.gpu_check", "--prewarm-config", str(index), "--dtype",
                    args.dtype, *(["--quick"] if args.quick else [])]) for index in range(candidates)]


def _test_lines(summary, output):
    """The report's test section: counts, each failure with its excerpt, the tests
    still running when the time ran out, the slowest tests."""
    if summary is None:
        return ["(no test results were recorded)", "", "```", _tail(output), "```", ""]
    counts, failures, unfinished, slowest = summary
    lines = [", ".join(f"{n} {k}" for k, n in counts.items()), ""]
    if failures:
        lines += ["Failing:", ""]
        for name, excerpt in failures:
            lines += [f"- `{name}`", "", "```", _tail(excerpt, 25), "```", ""]
    if unfinished:
        lines += ["Still running when the time ran out (or their worker died):", ""]
        lines += [f"- `{name}`" for name in unfinished] + [""]
    if slowest:
        lines += ["Slowest (seconds, setup + call + teardown):", "", "| test | s |", "|---|---:|"]
        lines += [f"| `{name}` | {seconds:.1f} |" for name, seconds in slowest] + [""]
    return lines


def write_report(path, info, dry_run, steps, tests, bench_doc, bench_output):
    lines = ["# attnkit GPU check", ""]
    if dry_run:
        lines += ["**Dry run: no CUDA GPU visible.** Tests marked `gpu` skip and the benchmarks are the quick "
                  "CPU suite; this checks the pipeline, not the GPU code.", ""]
    lines += [f"Machine: {core.describe_machine(info)}.", "", "| step | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {status} | {taken:.0f} |" for name, status, taken in steps]
    lines += ["", "Full output: gpu-build.log (when built), gpu-tests.log, gpu-tests.jsonl (one line per test "
              "event, written as it happens), gpu-bench.log."]
    lines += ["", "## Tests", ""] + _test_lines(*tests)
    lines += ["## Benchmarks", ""]
    if bench_doc is None:
        lines += ["(the benchmark run wrote no results)", "", "```", _tail(bench_output), "```"]
    else:
        lines.append(f"`python -m attnkit.bench --{bench_doc['mode']} --device {bench_doc['device']} "
                     f"--dtype {bench_doc['dtype']}`, {bench_doc['seconds']:.0f} s. Speedup > 1: attnkit faster.")
        tag = cli.dtype_suffix(bench_doc["dtype"])  # the plots' names carry it
        for name, result in bench_doc["families"].items():
            lines += ["", "#" + report.format_family(name, result).rstrip()]  # one level below "Benchmarks"
            plots = [p for p in (f"{name}{tag}-time.png", f"{name}{tag}-memory.png")
                     if os.path.exists(os.path.join(os.path.dirname(path), p))]
            if plots and result["rows"]:
                lines += [""] + [f"![{p}]({p})" for p in plots]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results", help="report directory (default bench-results/)")
    # 9 minutes: with the Python-only install before it, `make gpu-check` ends inside a 10-minute slot.
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole check (default 540)")
    parser.add_argument("--no-build", action="store_true", help="use the installed attnkit as it is")
    parser.add_argument("--quick", action="store_true", help="quick benchmarks (the default on a dry run)")
    parser.add_argument("--only", action="append", metavar="FAMILY", help="benchmark only this family (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=core.DTYPES)
    parser.add_argument("--tests", nargs="*", default=None, metavar="PATH",
                        help="test paths (default: the checkout's tests/; none: skip the tests)")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    parser.add_argument("--prewarm-config", type=int, default=None, help=argparse.SUPPRESS)  # see prewarm_commands
    args = parser.parse_args(argv)
    families = core.families()
    if args.prewarm_config is not None:
        # Triton kernels only: the build beside may be rewriting the compiled extensions, and
        # loading one mid-write can kill the process (SIGBUS) where it only had to compile.
        os.environ["ATTNKIT_NO_EXTENSIONS"] = "1"
        quick = args.quick or not torch.cuda.is_available()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        core.load_family("attention").prewarm(device, getattr(torch, args.dtype), args.prewarm_config, quick)
        return 0
    for name in args.only or []:
        if name not in families:
            parser.error(f"unknown family {name!r}; valid: {', '.join(families)}")

    deadline = time.perf_counter() + args.budget
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    try:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, ".gpu-check-write-test"), "w"):
            pass
        os.remove(os.path.join(args.out, ".gpu-check-write-test"))
    except OSError as error:  # before minutes of build and tests whose report could not be written
        parser.error(f"--out {args.out!r} is not a writable directory: {error}")
    root = core.repo_root()
    dry_run = not torch.cuda.is_available()
    device = torch.device("cpu" if dry_run else "cuda")
    steps = []
    # The Triton prewarm runs beside the build, or beside the tests where there is no build.
    prewarm = prewarm_commands(args) if not dry_run and "attention" in (args.only or families) else []
    paths = args.tests if args.tests is not None else ([os.path.join(root, "tests")] if root else [])
    not_counted = set()  # steps whose outcome does not decide the check's

    if args.no_build or root is None:
        steps.append(("build", "skipped" + (" (not a source checkout)" if root is None else ""), 0.0))
    else:
        print("gpu-check: building attnkit with the CUDA extension required ...", flush=True)
        warm_up = warm_up_commands(paths, max(1, (os.cpu_count() or 2) - 2)) if paths and not dry_run else []
        status, taken, output, (side_status, side_output), (warm_status, warm_output) = build(
            root, min(300, left() * 0.5), prewarm, warm_up)
        steps.append(("build", status, taken))
        if prewarm:
            steps.append(("Triton prewarm (beside the build)", side_status, taken))
            output += "\n" + side_output
            prewarm = []
        if warm_up:
            name = "Triton warm-up: the GPU tests without the extensions, beside the build, results not counted"
            steps.append((name, warm_status, taken))
            not_counted.add(name)
            output += "\n" + warm_output
        with open(os.path.join(args.out, "gpu-build.log"), "w") as f:
            f.write(output)
        if status != "passed":
            print(_tail(output), file=sys.stderr)

    tests = (None, "")
    if paths:
        print(f"gpu-check: pytest -m '{MARKERS}' {' '.join(paths)} ...", flush=True)
        status, taken, output, summary, (side_status, side_output) = run_tests(
            root, args.out, min(300, left() * 0.5), paths, args.pytest_args.split(), side_commands=prewarm)
        steps.append(("GPU tests", status, taken))
        if prewarm:
            steps.append(("Triton prewarm (beside the tests)", side_status, taken))
            output += "\n" + side_output
        tests = (summary, output)
        print(_tail(output, 3), flush=True)
    else:
        steps.append(("GPU tests", "skipped (no test paths)", 0.0))

    full = not (args.quick or dry_run)
    print(f"gpu-check: {'full' if full else 'quick'} benchmarks on {device} ({left():.0f} s left) ...", flush=True)
    status, taken, bench_output, bench_doc = run_bench(args.out, left() - 5, device, full, args.only, args.dtype)
    steps.append((f"benchmarks ({'full' if full else 'quick'}, {device})", status, taken))
    for log, text in (("gpu-tests.log", tests[1]), ("gpu-bench.log", bench_output)):
        with open(os.path.join(args.out, log), "w") as f:
            f.write(text)

    info = core.machine_info(device)
    path = os.path.join(args.out, "gpu-report.md")
    write_report(path, info, dry_run, steps, tests, bench_doc, bench_output)
    print(f"gpu-check: wrote {path}")
    ok = all(status in ("passed", "no tests selected") or status.startswith("skipped")
             for name, status, _ in steps if name not in not_counted)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
