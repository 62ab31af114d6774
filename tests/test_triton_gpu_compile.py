"""The Triton kernels compile for real GPUs (sm_80, sm_90) ahead of time, with
no GPU here: the interpreter never runs Triton's GPU compiler. Part of `make cuda-check`."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cuda_build, pytest.mark.aot_compile]

ARCHES = [90, 80]


@pytest.fixture(scope="module")
def compile_runs():
    """Both arches' compile checks started together: each compiles on one core,
    and one after the other they took most of cuda-check (~2 minutes each)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {arch: subprocess.Popen([sys.executable, "-m", "attnkit.triton_kernels.compile_check", "--arch", str(arch)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for arch in ARCHES}
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


@pytest.mark.parametrize("arch", ARCHES)
def test_flash_attention_kernels_compile_and_fit_shared_memory(arch, compile_runs):
    stdout, stderr = compile_runs[arch].communicate(timeout=900)
    assert compile_runs[arch].returncode == 0, stdout[-4000:] + stderr[-4000:]
    from attnkit.triton_kernels.compile_check import COMBOS

    expected = sum(1 for *_, options in COMBOS if arch >= 90 or not options.get("tma"))  # TMA: sm_90 only
    assert stdout.count(": ok in") == expected, stdout
    if arch >= 90:  # the forward's first TMA candidate compiled as well
        assert "USE_TMA" in stdout, stdout
    assert "OVER THE LIMIT" not in stdout  # config 0 of every kernel fits, as the GPU suite launches it
    assert "NOT WARP-SPECIALIZED" not in stdout  # flash_attention_ws's loop got its producer and consumer warps
    # Compiled as a launch specializes (16-byte aligned pointers, pipelined loops), not under-reporting shared
    # memory; compile_check knows how from triton 3.3 on.
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3):
        assert "no launch specialization" not in stderr, stderr[-4000:]
