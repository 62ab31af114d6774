"""The Triton kernels compile for real GPUs (sm_80, sm_90) ahead of time, with
no GPU here: the interpreter never runs Triton's GPU compiler. Part of `make cuda-check`."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda_build


@pytest.mark.parametrize("arch", [90, 80])
def test_flash_attention_kernels_compile_and_fit_shared_memory(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "attnkit.triton_kernels.compile_check", "--arch", str(arch)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count(": ok in") == 7, result.stdout
    assert "OVER THE LIMIT" not in result.stdout
