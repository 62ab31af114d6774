"""Loading and running the benchmark families (benchmarks/<family>.py,
installed as attnkit.benchmarks), machine information, and the hooks that
observe or take over a family's timed calls through benchmarks/timing.py."""
from __future__ import annotations

import datetime
import importlib
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

DTYPES = ("float32", "float16", "bfloat16", "float64")


def benchmarks_dir() -> str:
    import attnkit.benchmarks as package

    return os.path.dirname(os.path.abspath(package.__file__))


def _ensure_sys_path() -> None:
    """The families import their helpers as siblings (`from timing import
    median_ms`), as when run as scripts: their directory must be importable."""
    directory = benchmarks_dir()
    if directory not in sys.path:
        sys.path.insert(0, directory)


def families() -> list:
    """FAMILIES as benchmarks/run.py lists them: the one list owners append to."""
    _ensure_sys_path()
    from attnkit.benchmarks.run import FAMILIES

    return list(FAMILIES)


def load_family(name: str):
    _ensure_sys_path()
    return importlib.import_module(f"attnkit.benchmarks.{name}")


def timing_module():
    """The `timing` module the families imported (by its sibling name): the
    interceptors must be installed on that very module object."""
    _ensure_sys_path()
    return importlib.import_module("timing")


def repo_root():
    """The source checkout holding benchmarks/, or None for a regular install."""
    parent = os.path.dirname(benchmarks_dir())
    return parent if os.path.exists(os.path.join(parent, "setup.py")) else None


def _git(*args) -> str:
    root = repo_root()
    if root is None:
        return ""
    try:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_info() -> dict:
    """Model name, physical cores (distinct (package, core) pairs), logical CPUs."""
    model, cores = None, set()
    package = core = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model is None:
                    model = value
                elif key == "physical id":
                    package = value
                elif key == "core id":
                    core = value
                elif not key and core is not None:
                    cores.add((package, core))
                    package = core = None
        if core is not None:
            cores.add((package, core))
    except OSError:
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cores": len(cores) or os.cpu_count(),
        "logical_cpus": os.cpu_count(),
    }


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    commit = _git("rev-parse", "--short", "HEAD")
    info["commit"] = commit or "unknown"
    # The checkout may hold uncommitted changes: a number is only tied to a commit when clean.
    info["dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    info.update(cpu_info())
    info["threads"] = torch.get_num_threads()
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return info


def describe_machine(info: dict) -> str:
    cpu = f"{info['cpu']}, {info['cores']} cores"
    where = f"{info['gpu']} (host {cpu})" if info.get("gpu") else f"{cpu}, no GPU in use"
    commit = info["commit"] + (" + uncommitted changes" if info.get("dirty") else "")
    versions = f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}"
    return f"{where}; {versions}; commit {commit}; {info['date']}"


class Progress:
    """A tqdm bar over the families when tqdm is installed and stderr is a
    terminal (its redraws garble logs), else one line per family with a dot
    per timed call."""

    def __init__(self, names, enabled=True):
        self.names, self.enabled, self.bar, self.count = list(names), enabled, None, 0
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=len(self.names), unit="family", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def start(self, name):
        self.name, self.count, self.started = name, 0, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(name)
        elif self.enabled:
            position = self.names.index(name) + 1 if name in self.names else "?"
            sys.stderr.write(f"[{position}/{len(self.names)}] {name} ")
            sys.stderr.flush()

    def tick(self):
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.count} timings")
        elif self.enabled:
            sys.stderr.write(".")
            sys.stderr.flush()

    def finish(self, status):
        seconds = time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(f"{self.name}: {status}, {self.count} timings, {seconds:.1f} s", file=sys.stderr)
        elif self.enabled:
            sys.stderr.write(f" {status}, {self.count} timings, {seconds:.1f} s\n")
        return seconds

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _NoProgress(Progress):
    def __init__(self):
        super().__init__([], enabled=False)


def run_family(name: str, device: torch.device, dtype: torch.dtype, quick: bool = True, progress=None) -> dict:
    """Runs one family: {"title", "rows", "seconds", "error"}. Peak memory is
    measured by one extra call of every timed function where the device keeps
    allocator statistics, unless the family reports it itself. A family that
    raises is reported, not fatal: the other families still run."""
    progress = progress or _NoProgress()
    progress.start(name)
    result = {"title": name, "rows": [], "seconds": 0.0, "error": None}
    try:
        module = load_family(name)
        result["title"] = module.TITLE
        # A family that measures nothing here says why (the table and the JSON show it).
        reason = module.skip_reason(device, dtype) if hasattr(module, "skip_reason") else None
        if reason:
            result["skipped"] = reason
            result["seconds"] = round(progress.finish("skipped"), 2)
            return result
        timing = timing_module()
        peaks = {}

        def observe(fn, device_, warmup, repeats, measure):
            ms = measure()
            peak = timing.peak_mb(fn, device_)
            if peak is not None:
                peaks[ms] = peak  # rows carry the returned float itself: it identifies the call
            progress.tick()
            return ms

        with timing.intercept(observe):
            rows = module.run(device, dtype, quick=quick)
        result["rows"] = [_complete_row(row, peaks) for row in rows]
        status = f"{len(rows)} rows"
    except Exception as exc:  # one broken family must not hide the others' numbers
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
        status = "FAILED"
    result["seconds"] = round(progress.finish(status), 2)
    return result


def _complete_row(row: dict, peaks: dict) -> dict:
    # NaN (a family's "not measured") becomes None and an infinite error (a NaN result) "inf":
    # JSON has neither.
    row = {key: None if isinstance(value, float) and value != value else
           "inf" if isinstance(value, float) and math.isinf(value) else value for key, value in row.items()}
    for side in ("ours", "baseline"):
        if f"{side}_peak_mb" not in row and row.get(f"{side}_ms") in peaks:
            row[f"{side}_peak_mb"] = peaks[row[f"{side}_ms"]]
    ours, base = row.get("ours_ms"), row.get("baseline_ms")
    row["speedup"] = base / ours if ours and base is not None else None
    return row


# pytest-benchmark: the same cases, each timed by pytest-benchmark itself.


def enumerate_cases(name: str, device: torch.device, dtype: torch.dtype, quick: bool = True) -> list:
    """[(index, case, shape, side)] for each timed call the family's run()
    makes, 1-based in call order. The family runs with every timed call
    skipped: each returns its own index, so the rows say which call produced
    which number."""
    timing = timing_module()
    calls = 0

    def count(fn, device_, warmup, repeats, measure):
        nonlocal calls
        calls += 1
        return float(calls)

    with timing.intercept(count), timing.checks_skipped():
        rows = load_family(name).run(device, dtype, quick=quick)
    labels = {}
    for row in rows:
        for side, key in (("attnkit", "ours_ms"), ("baseline", "baseline_ms")):
            value = row.get(key)
            if isinstance(value, float) and value.is_integer() and 1 <= value <= calls:
                labels.setdefault(int(value), (row["case"], row["shape"], side))
    return [(i, *labels.get(i, (f"timed call {i}", "", "unreported"))) for i in range(1, calls + 1)]


class CaseSkipped(Exception):
    """The family caught the error of the call it was asked to time (e.g. a
    baseline that refuses this shape) and went on."""


def call_case(name: str, index: int, device: torch.device, dtype: torch.dtype, timer, quick: bool = True):
    """Reruns the family with its timed calls skipped except the index-th,
    which timer(fn) times instead (pytest-benchmark's fixture) after the
    family's warm-up calls: inputs, grad mode and closures are exactly those
    the family set up for that call. The gradient and memory checks are
    skipped (pytest-benchmark reports times only)."""
    timing = timing_module()
    calls, outcome = 0, {}

    def take_over(fn, device_, warmup, repeats, measure):
        nonlocal calls
        calls += 1
        if calls == index:
            def synchronized():
                out = fn()
                if device_.type == "cuda":
                    torch.cuda.synchronize(device_)
                return out

            try:
                for _ in range(warmup):  # as median_ms: no Triton compile or first-call allocation in a round
                    synchronized()
                outcome["result"] = timer(synchronized)
            except Exception as exc:
                outcome["error"] = exc
                raise
        return float(calls)

    with timing.intercept(take_over), timing.checks_skipped():
        load_family(name).run(device, dtype, quick=quick)
    if "error" in outcome:
        raise CaseSkipped(f"{type(outcome['error']).__name__}: {outcome['error']}") from outcome["error"]
    if "result" not in outcome:
        raise LookupError(f"{name} made {calls} timed calls on this run, not {index}")
    return outcome["result"]
