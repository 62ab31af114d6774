"""The benchmark runner (python -m attnkit.bench), its tables, JSON and plots,
the pytest-benchmark bridge and the GPU check's dry run. Families run at tiny
sizes (monkeypatched) so this takes seconds."""
import json
import os
import sys
import time

import pytest
import torch

import attnkit
from attnkit import _dispatch
from attnkit.bench import cli, core, family_worker, gpu_check, report

TINY = [(2, 8, 8), (4, 8, 8)]  # lstm_cell (batch, input, hidden): the cheapest family


@pytest.fixture
def tiny_lstm_cell(monkeypatch):
    monkeypatch.setattr(core.load_family("lstm_cell"), "QUICK_SHAPES", TINY)


def test_cli_one_family_prints_table_and_writes_json_and_plots(tiny_lstm_cell, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert cli.main(["--only", "lstm_cell", "--json", str(path), "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "## LSTM cell step" in printed
    assert "| case | shape | backend | attnkit ms | baseline ms | speedup (>1: attnkit faster) | max err |" in printed
    assert printed.count("| forward | B=") == len(TINY) and printed.count("| fwd+bwd | B=") == len(TINY)

    document = json.loads(path.read_text())
    assert document["schema"] == 1 and document["mode"] == "quick"
    assert document["device"] == "cpu" and document["dtype"] == "float32" and document["seconds"] > 0
    machine = document["machine"]
    for key in ("date", "commit", "dirty", "cpu", "cores", "logical_cpus", "threads", "torch", "triton", "cuda", "gpu"):
        assert key in machine, key
    assert machine["torch"] == torch.__version__ and machine["cores"] >= 1 and machine["gpu"] is None
    assert list(document["families"]) == ["lstm_cell"]
    family = document["families"]["lstm_cell"]
    assert family["error"] is None and family["title"].startswith("LSTM cell step")
    rows = family["rows"]
    assert len(rows) == 2 * len(TINY)
    for row in rows:
        assert row["ours_ms"] > 0 and row["baseline_ms"] > 0 and row["max_err"] < 1e-4
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ours_ms"])
        assert "ours_peak_mb" not in row  # the CPU keeps no allocator statistics

    if report_has_matplotlib():
        png = tmp_path / "lstm_cell-time.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (tmp_path / "lstm_cell-memory.png").exists()


def report_has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plots_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    results = {"x": {"title": "t", "rows": [dict(case="c", shape="N=1", ours_ms=1.0, baseline_ms=2.0)]}}
    assert cli.write_plots(results, str(tmp_path), "cpu") == []
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--only", "no_such_family"], "invalid choice: 'no_such_family' (choose from 'lstm_cell'"),
    (["--device", "tpu"], "unknown device 'tpu'; valid here: cpu"),
    (["--dtype", "int8"], "invalid choice: 'int8' (choose from 'float32', 'float16', 'bfloat16', 'float64')"),
])
def test_bad_input_lists_the_valid_choices(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_unwritable_json_path_is_refused_before_any_family_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(core, "run_family", lambda *a, **k: pytest.fail("a family ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--only", "linear", "--json", str(tmp_path), "--out", str(tmp_path), "--no-plots"])
    assert exit_info.value.code == 2
    assert f"argument --json: cannot write '{tmp_path}' (a folder)" in capsys.readouterr().err


def test_a_family_that_measures_nothing_here_says_why(tmp_path, capsys):
    argv = ["--only", "linear", "--dtype", "float16", "--out", str(tmp_path), "--no-plots", "--no-progress"]
    assert cli.main(argv) == 0
    assert "(no rows: skipped: the kernel serves CPU float32" in capsys.readouterr().out
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert document["families"]["linear"]["skipped"].startswith("skipped: the kernel serves CPU float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda"])
    assert "device 'cuda' is not available; valid here: cpu (no CUDA GPU is visible" in capsys.readouterr().err


def test_a_failing_family_is_reported_and_the_others_still_run(tiny_lstm_cell, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(core, "families", lambda: ["lstm_cell", "no_such_module"])
    argv = ["--only", "no_such_module", "--only", "lstm_cell", "--out", str(tmp_path), "--no-plots", "--no-progress"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED (no_such_module): ModuleNotFoundError" in captured.out
    assert captured.out.count("| forward | B=") == len(TINY)
    assert "FAILED: no_such_module" in captured.out
    document = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert document["families"]["no_such_module"]["rows"] == []
    assert "ModuleNotFoundError" in document["families"]["no_such_module"]["error"]


def test_table_formatting_optional_columns_and_missing_baseline():
    rows = [
        dict(case="forward vs flash", shape="B=1 N=8", backend="triton", ours_ms=1.0, baseline_ms=2.0, max_err=3e-3,
             ours_tflops=10.0, baseline_tflops=5.0, ours_peak_mb=1.5, baseline_peak_mb=3.0),
        dict(case="forward vs flash-attn", shape="B=1 N=8", backend="triton", ours_ms=1.0, baseline_ms=None,
             max_err=None, note="flash-attn is not installed"),
    ]
    lines = report.format_table(rows).splitlines()
    assert lines[0] == ("| case | shape | backend | attnkit ms | baseline ms | speedup (>1: attnkit faster) | "
                        "attnkit peak MB | baseline peak MB | attnkit TFLOP/s | baseline TFLOP/s | max err | note |")
    assert lines[1] == "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    assert lines[2] == ("| forward vs flash | B=1 N=8 | triton | 1.000 | 2.000 | 2.00x | 1.5 | 3.0 | 10.0 | 5.0 | "
                        "3.0e-03 |  |")
    assert lines[3] == ("| forward vs flash-attn | B=1 N=8 | triton | 1.000 | n/a | - | - | - | - | - | - | "
                        "flash-attn is not installed |")
    plain = report.format_table([dict(case="c", shape="s", backend="cpp", ours_ms=4.0, baseline_ms=1.0, max_err=0.0)])
    assert plain.splitlines()[0].endswith("| speedup (>1: attnkit faster) | max err |")
    assert "| 0.25x | 0.0e+00 |" in plain


def test_peak_memory_comes_from_the_timed_call_the_row_reports():
    peaks = {1.25: 10.0, 2.5: 40.0}
    row = core._complete_row(dict(case="c", shape="s", ours_ms=1.25, baseline_ms=2.5), peaks)
    assert (row["ours_peak_mb"], row["baseline_peak_mb"], row["speedup"]) == (10.0, 40.0, 2.0)
    own = core._complete_row(dict(case="c", shape="s", ours_ms=1.25, baseline_ms=2.5, ours_peak_mb=7.0), peaks)
    assert own["ours_peak_mb"] == 7.0  # a family's own measurement wins


def test_paired_timing_alternates_the_sides_and_interceptors_see_one_call_each():
    timing = core.timing_module()
    calls = []
    ours, theirs = (lambda: calls.append("ours")), (lambda: calls.append("theirs"))
    t_ours, t_theirs = timing.median_pair_ms(ours, theirs, torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["ours", "theirs"] * 4 and t_ours >= 0 and t_theirs >= 0
    seen, calls[:] = [], []

    def hook(fn, device, warmup, repeats, measure):
        seen.append(fn)
        return measure()

    with timing.intercept(hook):
        pair = timing.median_pair_ms(ours, theirs, torch.device("cpu"), warmup=0, repeats=2)
    # One alternating measurement serves both hook calls, each told its own function.
    assert seen == [ours, theirs] and calls == ["ours", "theirs"] * 2 and len(pair) == 2
    calls[:] = []
    third = lambda: calls.append("third")  # noqa: E731
    assert len(timing.median_group_ms([ours, theirs, third], torch.device("cpu"), warmup=0, repeats=2)) == 3
    assert calls == ["ours", "theirs", "third"] * 2


def test_plot_axis_is_the_one_varying_parameter():
    assert report._x_axis(["B=4 N=512 D=64", "B=4 N=2048 D=64"]) == ("N", [512.0, 2048.0])
    assert report._x_axis(["B=4 N=512", "B=2 N=1024"]) is None  # several vary: shapes become categories
    assert report._x_axis(["B=4 N=512"]) is None
    assert report._split_case("fwd+bwd causal vs cudnn") == ("fwd+bwd causal", "cudnn")
    assert report.baseline_label("LSTM cell step: attnkit.ops.lstm_cell vs torch.lstm_cell") == "torch.lstm_cell"


def test_plot_panels_for_several_baselines(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(case=f"forward vs {b}", shape=f"B=1 N={n}", backend="triton", ours_ms=n / 100, baseline_ms=n / 50,
                 max_err=0.0, ours_peak_mb=n / 10, baseline_peak_mb=n / 5) for b in ("flash", "efficient")
            for n in (512, 1024, 4096)]
    paths = report.plot_family("fake", {"title": "Fake: attnkit vs SDPA", "rows": rows}, str(tmp_path), "test")
    assert [os.path.basename(p) for p in paths] == ["fake-time.png", "fake-memory.png"]
    assert report._groups(rows, "SDPA")["forward"].keys() == {"attnkit", "flash", "efficient"}


def test_pytest_benchmark_bridge_times_each_call_on_the_family_inputs(tiny_lstm_cell):
    cases = core.enumerate_cases("lstm_cell", torch.device("cpu"), torch.float32)
    assert len(cases) == 4 * len(TINY)  # forward and fwd+bwd, attnkit and torch, per shape
    assert cases[0] == (1, "forward", "B=2 I=8 H=8", "attnkit")
    assert cases[1] == (2, "forward", "B=2 I=8 H=8", "baseline")
    assert cases[-1] == (len(cases), "fwd+bwd", "B=4 I=8 H=8", "baseline")

    seen = []

    def timer(fn):
        seen.append(torch.is_grad_enabled())
        return fn()

    h, c = core.call_case("lstm_cell", 5, torch.device("cpu"), torch.float32, timer)  # forward, B=4, attnkit
    assert h.shape == (4, 8) and seen == [False]  # the family times the forward under no_grad
    core.call_case("lstm_cell", 3, torch.device("cpu"), torch.float32, timer)  # fwd+bwd
    assert seen == [False, True]
    with pytest.raises(LookupError):
        core.call_case("lstm_cell", len(cases) + 1, torch.device("cpu"), torch.float32, timer)


def test_pytest_benchmark_bridge_warms_up_and_skips_the_gradient_checks(tiny_lstm_cell, monkeypatch):
    torch_cell, calls = torch.lstm_cell, []

    def counted(*args):
        calls.append(1)
        return torch_cell(*args)

    monkeypatch.setattr(torch, "lstm_cell", counted)
    seen = []
    core.call_case("lstm_cell", 2, torch.device("cpu"), torch.float32, lambda fn: seen.append(len(calls)) or fn())
    # Before the timer: the family's error check, then median_pair_ms's 3 warm-up calls.
    assert seen == [1 + 3]
    # Then the timed call and the second shape's error check; no fwd+bwd step for gradient_error.
    assert len(calls) == 4 + 1 + 1
    assert core.timing_module()._checks_skipped is False


def test_families_come_from_benchmarks_run_and_import_as_siblings():
    import attnkit.benchmarks.run as run

    assert core.families() == run.FAMILIES and "lstm_cell" in run.FAMILIES
    assert os.path.samefile(core.benchmarks_dir(), os.path.dirname(run.__file__))
    module = core.load_family("lstm_cell")
    assert module.median_pair_ms.__module__ == "timing" and core.timing_module().median_pair_ms is module.median_pair_ms


def test_gpu_check_dry_run_writes_one_report(tiny_lstm_cell, monkeypatch, tmp_path):
    tests = tmp_path / "gpu_suite" / "test_fake_gpu.py"
    tests.parent.mkdir()
    tests.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n\n"
                     "@pytest.mark.gpu\ndef test_broken():\n    assert False\n\ndef test_unmarked():\n    pass\n")

    def bench_in_process(out_dir, seconds, device, full, only, dtype):
        # The real step runs `python -m attnkit.bench` in a subprocess, where the tiny sizes would not apply.
        path = os.path.join(out_dir, "gpu-report.json")
        argv = ["--device", str(device), "--json", path, "--out", out_dir, "--no-progress", "--only", "lstm_cell"]
        rc = cli.main(argv + (["--full"] if full else []))
        return ("passed" if rc == 0 else f"failed (rc {rc})"), 1.0, "", json.loads(open(path).read())

    monkeypatch.setattr(gpu_check, "run_bench", bench_in_process)
    out = tmp_path / "report"
    rc = gpu_check.main(["--no-build", "--tests", str(tests), "--out", str(out), "--budget", "120"])
    assert rc == 1  # test_broken fails
    text = (out / "gpu-report.md").read_text()
    if not torch.cuda.is_available():
        assert "**Dry run: no CUDA GPU visible.**" in text
        assert "| benchmarks (quick, cpu) | passed |" in text
    assert "| build | skipped | 0 |" in text
    assert "1 passed, 1 failed, 0 errors, 0 skipped" in text  # test_unmarked is deselected by -m
    assert "test_fake_gpu.py::test_broken`" in text and "assert False" in text  # the failure and its excerpt
    assert "## LSTM cell step" in text and "| forward | B=2 I=8 H=8 | cpp |" in text
    if report_has_matplotlib():
        assert "![lstm_cell-time.png](lstm_cell-time.png)" in text


def test_progress_lines_when_stderr_is_not_a_terminal(capsys):
    progress = core.Progress(["lstm_cell", "rnn"])
    assert progress.bar is None  # captured stderr is no terminal: lines, not a tqdm bar
    progress.start("rnn")
    for _ in range(3):
        progress.tick()
    progress.finish("6 rows")
    progress.close()
    err = capsys.readouterr().err
    assert err.startswith("[2/2] rnn ...") and " 6 rows, 3 timings, " in err and err.endswith(" s\n")


def test_panels_share_attnkit_only_where_it_is_one_measurement():
    gpu_style = [dict(case=f"forward vs {b}", shape="N=8", ours_ms=1.0, baseline_ms=2.0) for b in ("flash", "flex")]
    assert list(report._groups(gpu_style, "SDPA")) == ["forward"]
    cpu_style = [dict(case=f"plain vs SDPA {mode}", shape="N=8", ours_ms=t, baseline_ms=2.0)
                 for mode, t in (("forward", 1.0), ("fwd+bwd", 3.0))]
    groups = report._groups(cpu_style, "SDPA")
    assert list(groups) == ["plain vs SDPA forward", "plain vs SDPA fwd+bwd"]
    assert groups["plain vs SDPA fwd+bwd"]["attnkit"]["N=8"][1]["ours_ms"] == 3.0


def test_rows_without_a_time_are_tables_and_json_safe(tmp_path):
    nan = float("nan")
    row = core._complete_row(dict(case="peak memory vs sdpa", shape="N=2048", backend="cpp", ours_ms=nan,
                                  baseline_ms=nan, max_err=nan, ours_peak_mb=5.5, baseline_peak_mb=7.5), {})
    assert row["ours_ms"] is None and row["speedup"] is None
    json.dumps(row, allow_nan=False)
    assert "| peak memory vs sdpa | N=2048 | cpp | n/a | n/a | - | 5.5 | 7.5 | - |" in report.format_table([row])
    if report_has_matplotlib():
        timed = dict(case="forward", shape="N=2048", backend="cpp", ours_ms=1.0, baseline_ms=2.0, max_err=0.0)
        paths = report.plot_family("mixed", {"title": "Mixed vs x", "rows": [timed, row]}, str(tmp_path), "cpu")
        assert [os.path.basename(p) for p in paths] == ["mixed-time.png", "mixed-memory.png"]


def test_gpu_check_refuses_an_unwritable_out_before_any_step(tmp_path, capsys):
    # It used to build and test for minutes, then die on writing the report.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--no-build", "--tests", "--out", str(blocker / "report")])
    assert exit_info.value.code == 2
    assert "--out" in (error := capsys.readouterr().err) and "is not a writable directory" in error


def test_gpu_check_bench_step_survives_a_family_that_cannot_run(tmp_path):
    # A real subprocess per family; this one exits at argument parsing.
    status, taken, output, document = gpu_check.run_bench(str(tmp_path), 60, torch.device("cpu"), False,
                                                          ["no_such_family"], "float32")
    assert status == "failed: no family wrote results" and document is None
    assert "invalid choice: 'no_such_family'" in output
    # Out of time: the family is not started at all.
    status, _, output, _ = gpu_check.run_bench(str(tmp_path), 0, torch.device("cpu"), False, ["lstm_cell"], "float32")
    json_path = tmp_path / "gpu-report-lstm_cell.json"
    assert status == "failed: no family wrote results"
    assert output == (f"$ -m attnkit.bench --device cpu --dtype float32 --only lstm_cell --json {json_path} "
                      f"--out {tmp_path} --no-progress --quick\n")


def test_progress_bar_with_tqdm_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    progress = core.Progress(["lstm_cell"])
    assert progress.bar is not None and progress.bar.total == 1
    progress.start("lstm_cell")
    progress.tick()
    progress.finish("2 rows")
    assert progress.bar.n == 1
    progress.close()
    assert "lstm_cell: 2 rows, 1 timings, " in capsys.readouterr().err


@pytest.mark.parametrize("module,name", [("flash_attn_interface", "flash-attn 3"), ("flash_attn", "flash-attn 2")])
def test_flash_attn_package_baseline_passes_its_layout(monkeypatch, module, name):
    """The attention family's flash-attn baseline hands the package (B, N, H, D) views and
    transposes back; a stand-in package (SDPA on its own layout) checks the round trip."""
    import types

    import torch.nn.functional as F

    def flash_attn_func(q, k, v, causal=False):  # (B, N, H, D), as the real package takes
        assert q.stride(-1) == 1
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal).transpose(1, 2)
        return (out, None) if module == "flash_attn_interface" else out

    for other in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(__import__("sys").modules, other, None)  # import fails: not installed
    monkeypatch.setitem(__import__("sys").modules, module, types.SimpleNamespace(flash_attn_func=flash_attn_func))
    found_name, run = core.load_family("attention")._flash_attn_package()
    assert found_name == name
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    for causal in (False, True):
        torch.testing.assert_close(run(q, k, v, causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_flash_attn_package_missing_is_a_note(monkeypatch, capsys):
    for module in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(__import__("sys").modules, module, None)
    assert core.load_family("attention")._flash_attn_package() is None
    assert "flash-attn package not installed" in capsys.readouterr().out


def test_gpu_check_runs_one_pytest_per_selected_file_in_parallel(tmp_path):
    suite = tmp_path / "gpu_suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_a1():\n    pass\n\n"
                                     "@pytest.mark.gpu\ndef test_a2():\n    assert False\n")
    (suite / "test_b.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_b():\n    pass\n")
    (suite / "test_unmarked.py").write_text("def test_c():\n    pass\n")  # nothing selected: no shard
    out = tmp_path / "out"
    out.mkdir()
    status, _, output, summary, _ = gpu_check.run_tests(str(tmp_path), str(out), 120, [str(suite)], [], jobs=2,
                                                        xdist=False)
    counts, failures, unfinished, slowest = summary
    assert counts == {"passed": 2, "failed": 1, "errors": 0, "skipped": 0} and unfinished == []
    assert status == "failed (rc 1)" and [name.split("::")[-1] for name, _ in failures] == ["test_a2"]
    assert "assert False" in failures[0][1] and len(slowest) == 3
    assert sorted(p.name for p in out.iterdir()) == ["gpu-tests.jsonl"]  # both shards' events in one stream
    assert output.count("$ -m pytest") == 2 and "gpu_suite/test_a.py" in output and "test_unmarked" not in output
    # Out of time: shards still running are killed and reported, not waited for.
    (suite / "test_b.py").write_text("import pytest, time\n\n@pytest.mark.gpu\ndef test_b():\n    time.sleep(60)\n")
    status, taken, _, summary, _ = gpu_check.run_tests(str(tmp_path), str(out), 20, [str(suite)], [], jobs=2,
                                                       xdist=False)
    assert status.startswith("failed (rc 1); timed out after ") and taken < 40
    counts, failures, unfinished, _ = summary  # what finished before the kill is still known
    assert counts["failed"] == 1 and [name.split("::")[-1] for name in unfinished] == ["test_b"]


@pytest.mark.parametrize("xdist", [True, False])
def test_gpu_check_hands_tests_to_xdist_workers_when_it_is_installed(xdist, tmp_path, monkeypatch):
    suite = tmp_path / "gpu_suite"
    suite.mkdir()
    for name in ("test_a.py", "test_b.py"):
        (suite / name).write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    seen = []
    monkeypatch.setattr(gpu_check, "_run_parallel",
                        lambda commands, jobs, *rest: seen.append((commands, jobs)) or [("passed", "")] * len(commands))
    gpu_check.run_tests(str(tmp_path), str(tmp_path), 60, [str(suite)], [], jobs=3, xdist=xdist)
    commands, jobs = seen[0]
    if xdist:  # one pytest, single tests handed to 3 workers
        assert len(commands) == 1 and jobs == 3 and commands[0][-4:] == ["-n", "3", "--dist", gpu_check.xdist_distribution()]
    else:  # one pytest per file, 3 at a time
        assert len(commands) == 2 and jobs == 3 and all("-n" not in c for c in commands)


def test_gpu_check_runs_side_commands_beside_the_shards_and_reports_them_apart(tmp_path):
    suite = tmp_path / "gpu_suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_a():\n    pass\n")
    side = [[sys.executable, "-c", "print('compiled candidate 0')"], [sys.executable, "-c", "raise SystemExit(3)"]]
    status, _, output, summary, (side_status, side_output) = gpu_check.run_tests(
        str(tmp_path), str(tmp_path), 120, [str(suite)], [], jobs=1, side_commands=side)
    assert status == "passed" and summary[0]["passed"] == 1  # a failed side command is not a failed test
    assert side_status == "failed (rc 3)" and "compiled candidate 0" in side_output and "compiled" not in output


def test_attention_prewarm_compiles_one_candidate_per_head_dim(monkeypatch):
    attention = core.load_family("attention")
    monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", "")  # prewarm sets it; monkeypatch restores it
    monkeypatch.setattr(attention, "QUICK", [(16, 16), (32, 16), (16, 32)])
    monkeypatch.setattr(attention, "TOKENS", 16)
    monkeypatch.setattr(attention, "FULL", [(16, 16)])  # the target shape: the warp-specialized forward too
    monkeypatch.delenv("ATTNKIT_TRITON_WS", raising=False)
    calls = []
    real = attnkit.ops.flash_attention

    def recorded(q, k, v, causal):
        calls.append((q.shape, causal, os.environ.get("ATTNKIT_TRITON_WS")))
        return real(q, k, v, causal=causal)

    monkeypatch.setattr(attnkit.ops, "flash_attention", recorded)
    attention.prewarm(torch.device("cpu"), torch.float32, 1, quick=True)
    assert os.environ["ATTNKIT_TRITON_CONFIG"] == "1" and "ATTNKIT_TRITON_WS" not in os.environ
    assert calls == [((1, 16, 16, 16), False, None), ((1, 16, 16, 16), False, "1"), ((1, 16, 16, 16), True, None),
                     ((1, 16, 16, 16), True, "1"), ((1, 16, 16, 32), False, None), ((1, 16, 16, 32), True, None)]
    commands = gpu_check.prewarm_commands(gpu_check.argparse.Namespace(dtype="float32", quick=True))
    assert [c[c.index("--prewarm-config") + 1] for c in commands] == [str(i) for i in range(len(commands))]


def test_families_stop_between_cases_at_the_gpu_check_deadline(monkeypatch):
    timing = core.timing_module()
    rows = []
    monkeypatch.delenv("ATTNKIT_BENCH_DEADLINE", raising=False)
    assert list(timing.within_budget([1, 2], rows, str)) == [1, 2] and rows == []
    monkeypatch.setenv("ATTNKIT_BENCH_DEADLINE", str(time.time() + 3600))
    cases = timing.within_budget([1, 2, 3], rows, lambda case: f"N={case}")
    assert next(cases) == 1 and rows == []
    monkeypatch.setenv("ATTNKIT_BENCH_DEADLINE", str(time.time() - 1))  # the budget runs out mid-family
    assert list(cases) == [] and len(rows) == 1
    assert rows[0]["case"] == "not measured: the time budget ran out" and rows[0]["shape"] == "N=2 and later"
    row = core._complete_row(rows[0], {})
    assert row["ours_ms"] is None and row["speedup"] is None  # an untimed row in the table, not a crash


def test_gpu_check_gives_each_family_a_soft_deadline_within_its_share(monkeypatch, tmp_path):
    deadlines = []

    def fake_run(worker, argv, deadline, seconds):
        deadlines.append((deadline - time.time(), seconds))
        return "failed (rc 1)", 0.0, ""

    monkeypatch.setattr(family_worker.FamilyWorker, "run", fake_run)
    gpu_check.run_bench(str(tmp_path), 400, torch.device("cpu"), True, ["lstm_cell", "rnn", "models"], "float32")
    (first, hard_first), (second, hard_second), (last, hard_last) = deadlines
    # Shares in proportion to each family's full-mode seconds on the H200 (lstm_cell 1, rnn 40, models 45),
    # after the worker's 8 s of start-up (no worker started here: fake_run starts none) and 1 s a family;
    # the soft deadline leaves a quarter (at most 30 s) for the shape in progress.
    assert 6 < first <= 0.75 * (9 + 389 / 86) and 389 < hard_first <= 390  # a restart and 1 s each kept
    assert 150 < second <= 9 + 390 * 40 / 85 - 30 and 390 < hard_second <= 391  # nothing was spent
    assert 365 < last <= 370 and hard_last > 399  # the last family may use all that is left


def test_gpu_check_starts_no_process_for_the_cpu_only_families_on_a_gpu(monkeypatch, tmp_path):
    started = []

    def fake_run(worker, argv, deadline, seconds):
        name = argv[argv.index("--only") + 1]
        started.append(name)
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump({"families": {name: {"title": name, "rows": [], "seconds": 1.0}}}, f)
        return "passed", 1.0, ""

    monkeypatch.setattr(family_worker.FamilyWorker, "run", fake_run)
    names = ["lstm_cell", "attention_cpu", "rnn", "linear"]
    status, _, _, document = gpu_check.run_bench(str(tmp_path), 60, torch.device("cuda"), True, names, "float32")
    assert status == "passed" and started == ["lstm_cell", "rnn"]
    assert list(document["families"]) == names and document["families"]["linear"]["rows"] == []
    for name in gpu_check.CPU_ONLY_FAMILIES:  # what the skip stands for: no rows off the CPU
        assert core.load_family(name).run(torch.device("cuda"), torch.float32, True) == []
    gpu_check.run_bench(str(tmp_path), 60, torch.device("cpu"), True, names, "float32")
    assert started[2:] == names  # the CPU runs all of them


def test_rotary_benchmark_tables_cover_every_position_of_every_shape():
    # The full suite's 8192-token prompt once outran a fixed 4096-row table (seen on the H200).
    positional = core.load_family("positional")
    for batch, seqlen, heads, dim, per_sequence in positional.FULL_SHAPES:
        x, cos, sin, offsets = positional.inputs(1, seqlen, 1, 8, per_sequence, torch.device("cpu"), torch.float32)
        assert cos.shape == sin.shape and cos.shape[0] >= int(offsets.max()) + seqlen, (seqlen, per_sequence)
        attnkit.ops.apply_rotary(x, cos, sin, seqlen_offsets=offsets if per_sequence else 0)  # accepts the table


def test_gpu_check_build_runs_the_prewarm_and_the_test_warm_up_beside_pip(monkeypatch, tmp_path):
    seen = []

    def run_parallel(commands, jobs, seconds, env, cwd, best_effort=0):
        seen.append((commands, jobs, env, best_effort))
        return [("passed", "built"), ("passed", "compiled candidate 0"), ("failed (rc 3)", ""),
                ("failed (rc 1)", "2 failed, 9 passed")]

    monkeypatch.setattr(gpu_check, "_run_parallel", run_parallel)
    side = [[sys.executable, "-c", "candidate 0"], [sys.executable, "-c", "candidate 1"]]
    warm_up = gpu_check.warm_up_commands(["tests"], 4, xdist=True)
    status, _, output, (side_status, side_output), (warm_status, warm_output) = gpu_check.build(
        str(tmp_path), 60, side, warm_up)
    assert status == "passed" and output == "built"  # a failed side command is not a failed build
    assert side_status == "failed (rc 3)" and "compiled candidate 0" in side_output
    assert warm_status == "ran to the end" and "2 failed, 9 passed" in warm_output  # its failures are expected
    commands, jobs, env, best_effort = seen[0]
    assert commands[0][1:4] == ["-m", "pip", "install"] and commands[1:] == side + warm_up and jobs == 4
    assert best_effort == 1 and env["ATTNKIT_REQUIRE_CUDA"] == "1"


def test_gpu_check_lets_idle_xdist_workers_steal_where_xdist_can(monkeypatch):
    for version, mode in (("3.8.0", "worksteal"), ("3.2", "worksteal"), ("3.1.0", "load"), ("2.5.0", "load")):
        monkeypatch.setattr(gpu_check.importlib.metadata, "version", lambda name: version)
        assert gpu_check.xdist_distribution() == mode, version

    def missing(name):
        raise gpu_check.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gpu_check.importlib.metadata, "version", missing)
    assert gpu_check.xdist_distribution() == "load"


def test_gpu_check_test_warm_up_runs_the_triton_tests_without_extensions_at_low_priority(monkeypatch):
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: "/usr/bin/nice")
    (command,) = gpu_check.warm_up_commands(["tests"], 6, xdist=True)
    assert command[:3] == ["nice", "-n", "10"] and "ATTNKIT_NO_EXTENSIONS=1" in command
    assert command[command.index("pytest") + 2] == "gpu and not cuda_build" and command[-5:] == [
        "tests", "-n", "6", "--dist", gpu_check.xdist_distribution()]
    assert gpu_check.warm_up_commands(["tests"], 6, xdist=False)[0][-1] == "tests"
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: None)  # no nice: the command as it is
    assert gpu_check.warm_up_commands(["tests"], 1, xdist=True)[0][:2] == ["env", "ATTNKIT_NO_EXTENSIONS=1"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_gpu_check_stops_the_warm_up_when_the_rest_end_and_kills_whole_process_groups(tmp_path):
    """A best-effort command is stopped once the others end, and a killed command's own
    children (a pytest's xdist workers) go with it, here a sleeping grandchild."""
    spawn = ("import subprocess, sys, time\n"
             "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "open(sys.argv[1], 'w').write(str(child.pid))\n"
             "time.sleep(60)\n")
    pid_files = [tmp_path / "warm.pid", tmp_path / "slow.pid"]
    commands = [[sys.executable, "-c", "import time; time.sleep(2)"], [sys.executable, "-c", spawn, str(pid_files[0])]]
    started = time.perf_counter()
    results = gpu_check._run_parallel(commands, 2, 30, None, str(tmp_path), best_effort=1)
    assert results == [("passed", ""), (gpu_check.STOPPED, "")] and time.perf_counter() - started < 15
    # Past the deadline: the command and its child are killed, the ones after it never start.
    commands = [[sys.executable, "-c", spawn, str(pid_files[1])], [sys.executable, "-c", "print('late')"]]
    results = gpu_check._run_parallel(commands, 1, 3, None, str(tmp_path))
    assert results == [("timed out after 3 s", ""), ("not run: out of time", "")]
    time.sleep(0.5)
    assert not any(_alive(int(path.read_text())) for path in pid_files)


def test_attention_benchmark_steps_time_what_each_mode_names():
    attention = core.load_family("attention")
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    calls = []

    def fn(q, k, v, causal):
        calls.append(torch.is_grad_enabled())
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    assert attention._step(fn, q, k, v, True, "forward")().grad_fn is None and calls == [False]
    backward = attention._step(fn, q, k, v, True, "backward")  # one forward now, none per call
    assert len(calls) == 2 and [g.shape for g in backward()] == [q.shape] * 3 and len(calls) == 2
    both = attention._step(fn, q, k, v, True, "fwd+bwd")
    assert len(both()) == 3 and calls[-2:] == [True, True]


def test_test_stream_summary_counts_as_pytest_does_and_names_the_unfinished(tmp_path):
    from attnkit.bench import pytest_stream

    events = [("ok", "setup", "passed"), ("ok", "call", "passed"), ("ok", "teardown", "passed"),
              ("bad", "setup", "passed"), ("bad", "call", "failed"), ("bad", "teardown", "passed"),
              ("skip", "setup", "skipped"), ("skip", "teardown", "passed"),
              ("fixture", "setup", "passed"), ("fixture", "call", "passed"), ("fixture", "teardown", "failed"),
              ("crash", "setup", "passed"), ("crash", "???", "failed"),  # pytest-xdist: the worker died
              ("hung", "setup", "passed")]  # killed at the deadline: started, never torn down
    lines = [dict(id=name, event="start") for name in dict.fromkeys(name for name, *_ in events)]
    lines += [dict(id=name, event=when, outcome=outcome, seconds=1.0, **({"excerpt": f"E {name}"} if
              outcome == "failed" else {})) for name, when, outcome in events]
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"id": "cut off mid-wri')
    counts, failures, unfinished, slowest = pytest_stream.summarize(str(path))
    assert counts == {"passed": 1, "failed": 2, "errors": 1, "skipped": 1}
    assert failures == [("bad", "E bad"), ("fixture", "E fixture"), ("crash", "E crash")]
    assert unfinished == ["hung"] and dict(slowest)["bad"] == 3.0 and dict(slowest)["hung"] == 1.0
    assert pytest_stream.summarize(str(tmp_path / "missing.jsonl")) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the dry run, where torch sees no GPU")
def test_gpu_check_dry_run_skips_the_real_gpu_tests(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    gpu_tests = os.path.join(root, "tests", "ops", "test_attention_gpu.py")
    status, _, output, summary, _ = gpu_check.run_tests(root, str(tmp_path), 300, [gpu_tests], [], jobs=1)
    counts, failures, unfinished, _ = summary
    assert status == "passed" and failures == [] and unfinished == [], output[-3000:]
    assert counts["skipped"] > 0 and counts["passed"] == 0  # each one skipped by tests/conftest.py, none failed


def test_attention_benchmark_compares_the_warp_specialized_forward(monkeypatch):
    launch = pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")
    if launch.TensorDescriptor is None or not launch._WS_SUPPORTED:
        pytest.skip("this Triton has no host tensor descriptors or no warp_specialize")
    if not _dispatch.interpreter_active():  # the CPU tensors below run Triton's kernels only there
        pytest.skip("triton on cpu: TRITON_INTERPRET is not 1 (make test sets it)")
    from attnkit.triton_kernels import flash_attention_ws

    attention = core.load_family("attention")
    times, queued = iter([2.0, 3.0]), iter([1.0, 1.5])  # warp-specialized first, then the default
    fake_time = lambda fn, q, k, v, causal, mode, dev: (fn(q, k, v, causal), next(times))[1]  # noqa: E731
    monkeypatch.setattr(attention, "_time", fake_time)
    monkeypatch.setattr(attention, "_back_to_back_ms", lambda *args: next(queued))
    monkeypatch.delenv("ATTNKIT_TRITON_WS", raising=False)
    real = flash_attention_ws.forward
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16) for _ in range(3))
    ours = lambda q, k, v, causal: attnkit.ops.flash_attention(q, k, v, causal=causal)  # noqa: E731
    with attnkit.use_backend("triton"):
        assert attention._warp_specialized_rows(ours, q, k, v, True, torch.device("cpu")) == []  # no TMA: no row
        with launch.tma_forced():
            rows = attention._warp_specialized_rows(ours, q, k, v, True, torch.device("cpu"))
    assert [row["case"] for row in rows] == ["forward causal, warp-specialized vs default"]
    assert rows[0]["ours_ms"] == 2.0 and rows[0]["baseline_ms"] == 3.0 and rows[0]["max_err"] < 1e-2
    assert "ATTNKIT_TRITON_WS" not in os.environ and flash_attention_ws.forward is real  # both put back

    def broken(fn, q, k, v, causal, mode, dev):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4\nmore lines")

    monkeypatch.setattr(attention, "_time", broken)  # a failing warp-specialized kernel costs its row only
    with attnkit.use_backend("triton"), launch.tma_forced():
        rows = attention._warp_specialized_rows(ours, q, k, v, False, torch.device("cpu"))
    assert [row["case"] for row in rows] == ["forward, warp-specialized vs default: failed"]
    assert rows[0]["note"] == "RuntimeError: triton.compiler.errors.CompilationError: at 12:4"
    assert "ATTNKIT_TRITON_WS" not in os.environ and flash_attention_ws.forward is real
    row = core._complete_row(rows[0], {})
    assert row["ours_ms"] is None and row["speedup"] is None  # an untimed row in the table


def test_flex_baseline_builds_each_causal_block_mask_once(monkeypatch):
    """Flex's causal mask is made once per shape, not inside every timed call."""
    flex_module = pytest.importorskip("torch.nn.attention.flex_attention")
    made, seen = [], []
    monkeypatch.setattr(flex_module, "create_block_mask", lambda fn, b, h, nq, nk, device: made.append((nq, nk)) or
                        f"mask {nq}x{nk}")
    monkeypatch.setattr(flex_module, "flex_attention", lambda q, k, v, block_mask: seen.append(block_mask))
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    import contextlib

    import torch._functorch.config as functorch_config

    # _flex switches donated_buffer off for the process; the config's own patch() restores it (a
    # monkeypatch of the config module deletes the entry on undo, breaking every later compile).
    restore = (functorch_config.patch(donated_buffer=functorch_config.donated_buffer)
               if hasattr(functorch_config, "donated_buffer") else contextlib.nullcontext())
    with restore:
        run = core.load_family("attention")._flex()
    q, k = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 6, 4)
    for _ in range(3):
        run(q, k, k, True)
    run(q, k, k, False)
    run(k, k, k, True)
    assert made == [(8, 6), (6, 6)] and seen == ["mask 8x6"] * 3 + [None, "mask 6x6"]


def test_fwd_bwd_rows_check_gradients_and_flag_differing_results(monkeypatch):
    """A backward that computed nothing timed as a speedup with the forward's error beside it:
    the fwd+bwd rows' max err covers the gradients, and a row above DIFFERS_ABOVE is marked."""
    family = core.load_family("lstm_cell")
    monkeypatch.setattr(family, "QUICK_SHAPES", TINY)
    real = attnkit.ops.lstm_cell

    def no_gradient(*args, **kwargs):
        h, c = real(*args, **kwargs)
        return h.detach(), c.detach() + 0 * args[0].sum()

    honest = {row["case"]: row["max_err"] for row in family.run(torch.device("cpu"), torch.float32)}
    assert honest["fwd+bwd"] < 1e-4
    monkeypatch.setattr(family.attnkit.ops, "lstm_cell", no_gradient)
    rows = family.run(torch.device("cpu"), torch.float32)
    broken = {row["case"]: row["max_err"] for row in rows}  # the last shape's
    assert broken["forward"] < 1e-4 and broken["fwd+bwd"] > report.DIFFERS_ABOVE
    assert "(!)" in report.format_table(rows)
    assert report.differing_rows({"lstm_cell": {"rows": rows}}) == [
        f"lstm_cell: fwd+bwd ({row['shape']}): max err {row['max_err']:.2g}" for row in rows if row["case"] == "fwd+bwd"]


def test_a_nan_result_is_an_infinite_error_flagged_in_the_report():
    """A NaN max err showed as "-" (not measured) and was saved as null, never flagged; a NaN
    gradient hid behind a finite forward error (max() drops NaN after a number)."""
    timing = core.timing_module()
    ones, nan = torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])
    assert timing.max_error(nan, ones) == float("inf") and timing.max_error(nan, nan.clone()) == 0.0
    assert timing.max_error([ones, nan], [ones, ones]) == float("inf")
    assert timing.max_error(torch.tensor([float("inf")]), torch.tensor([float("inf")])) == 0.0
    leaf = torch.ones(3, requires_grad=True)

    def broken():
        (leaf * float("nan")).sum().backward()

    def honest():
        leaf.sum().backward()

    assert timing.gradient_error(broken, honest, [leaf], forward_error=1e-7) == float("inf")
    row = core._complete_row(dict(case="fwd+bwd", shape="(3,)", ours_ms=1.0, baseline_ms=2.0, max_err=float("inf")), {})
    assert json.loads(json.dumps(row))["max_err"] == "inf"
    assert "inf (!)" in report.format_table([row])
    assert report.differing_rows({"rnn": {"rows": [row]}}) == ["rnn: fwd+bwd ((3,)): max err inf"]


def test_default_results_name_carries_the_dtype_and_families(tiny_lstm_cell, tmp_path, capsys):
    """Every run of a day wrote <date>-<device>.json (and <family>-time.png): a second run with
    another --dtype or --only replaced the first's results."""
    assert cli.main(["--only", "lstm_cell", "--dtype", "float64", "--out", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["--only", "lstm_cell", "--out", str(tmp_path), "--no-progress", "--no-plots"]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    day = names[0][:10]
    assert f"{day}-cpu-float64-lstm_cell.json" in names and f"{day}-cpu-lstm_cell.json" in names
    if report_has_matplotlib():
        assert "lstm_cell-float64-time.png" in names
