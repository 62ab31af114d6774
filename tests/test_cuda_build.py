"""The CUDA extension: compiled and linked by `make cuda-check` (no GPU needed);
its kernels run in the GPU suite."""
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit import _extensions

pytestmark = pytest.mark.cuda_build


def test_cuda_extension_was_built_and_imports():
    ext, reason = _extensions.load("_C_cuda")
    assert ext is not None, reason
    assert callable(ext.lstm_cell_forward) and callable(ext.lstm_cell_backward)
    assert _extensions.build_info()["extensions"]["attnkit._C_cuda"] is None


def test_the_direct_gemm_finds_cublas_in_what_torch_loaded():
    """ATTNKIT_RNN_CUDA_DIRECT_GEMM=1's cublasGemmEx, looked up in the cuBLAS that
    libtorch_cuda loaded (loaded with torch, GPU or not)."""
    ext, reason = _extensions.load("_C_cuda")
    assert ext is not None, reason
    assert ext.rnn_direct_gemm_available()


def test_cuda_backend_status_is_consistent():
    status = attnkit.available_backends()["cuda"]
    assert status.available == torch.cuda.is_available(), status
    if not torch.cuda.is_available():
        assert status.reason == "attnkit._C_cuda is built, but torch sees no CUDA GPU"


# Each C++ error check runs in a child process: on the lent H200 machine (torch 2.11 wheel,
# Ubuntu's g++ 13.3) a TORCH_CHECK whose message formats a value (", got ", t.sizes()) kills
# the process with SIGSEGV when thrown from any freshly built extension, a minimal one
# from load_inline too, while a message of literals raises (2026-11-27). A child makes such
# a crash one test's outcome; where it crashes, the minimal extension says whose it is.
_CPU_CHECKS = """
import pytest, torch
from attnkit import _extensions
ext, reason = _extensions.load("_C")
assert ext is not None, reason
x = torch.zeros(3, 2, 3)
with pytest.raises(RuntimeError, match="h0 must have shape"):
    ext.lstm_forward(x, x[0, :1, :], x[0], torch.zeros(16, 3), torch.zeros(16, 4), None, None, None, None, False)
print("ok")
"""

_PERSISTENT_CHECKS = """
import pytest, torch
from attnkit import _extensions
ext, reason = _extensions.load("_C_cuda")
assert ext is not None, reason
for name in ("rnn_persistent_unsupported", "lstm_forward_persistent", "gru_forward_persistent", "rnn_cluster_plan",
             "lstm_forward_cluster_save", "gru_forward_cluster_save", "lstm_backward_cluster", "gru_backward_cluster"):
    assert callable(getattr(ext, name)), name
# The checks that come before any device query run without a GPU.
cuda = torch.device("cuda")
with pytest.raises(RuntimeError, match="device must be a CUDA device"):
    ext.rnn_persistent_unsupported(4, 1, 64, torch.float32, torch.device("cpu"))
with pytest.raises(RuntimeError, match="gates must be 4 \\(LSTM\\) or 3 \\(GRU\\)"):
    ext.rnn_persistent_unsupported(5, 1, 64, torch.float32, cuda)
assert "got Double" in ext.rnn_persistent_unsupported(4, 1, 64, torch.float64, cuda)
with pytest.raises(RuntimeError, match="device must be a CUDA device"):
    ext.rnn_cluster_plan(4, 1, 64, torch.float16, torch.device("cpu"))
with pytest.raises(RuntimeError, match="gates must be 4 \\(LSTM\\) or 3 \\(GRU\\)"):
    ext.rnn_cluster_plan(2, 1, 64, torch.float16, cuda)
assert ext.rnn_cluster_plan(4, 1, 64, torch.float32, cuda) == ["0", "the cluster kernel takes float16 and bfloat16, got Float", "0"]
assert ext.rnn_cluster_plan(3, 0, 64, torch.bfloat16, cuda) == ["0", "the cluster kernel takes batch >= 1, got 0", "0"]
x = torch.zeros(2, 1, 3)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.lstm_forward_persistent(x, x[0], x[0], x, x, None, None, None)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.gru_forward_persistent(x, x[0], x, x, None, None, None)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.lstm_forward_cluster_save(x, x[0], x[0], x, x, None, None, None)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.gru_forward_cluster_save(x, x[0], x, x, None, None, None)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.lstm_backward_cluster(x, x[0], x[0], x, x[0], x[0], x, x, None, x, x, x)
with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
    ext.gru_backward_cluster(x, x[0], x, x[0], x, x, None, x, x)
# The layer-norm LSTM / GRU kernels (csrc/cuda/rnn_layernorm.cu).
with pytest.raises(RuntimeError, match="layer-norm rnn: x must be a CUDA tensor"):
    ext.ln_lstm_forward(x, x[0], x[0], x, x, None, None, x, x, x, x, x, x, None, None, False)
with pytest.raises(RuntimeError, match="layer-norm rnn: x must be a CUDA tensor"):
    ext.ln_gru_forward(x, x[0], x, x, None, None, x, x, x, x, None, None, False)
assert callable(ext.ln_lstm_backward) and callable(ext.ln_gru_backward)
print("ok")
"""


def _run_child(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def _report(result):
    signal = f" (killed by signal {-result.returncode})" if result.returncode < 0 else ""
    return f"rc {result.returncode}{signal}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"


# The same throw from a minimal extension built on the spot with attnkit's flags.
_MINIMAL_CHECKS = """
import pytest, sys, torch
from torch.utils.cpp_extension import load_inline
source = '''
#include <torch/extension.h>
void fail(const at::Tensor& t) { TORCH_CHECK(t.dim() == 5, "probe must have 5 dims, got ", t.sizes()); }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fail", &fail); }
'''
ext = load_inline("attnkit_throw_probe", cpp_sources=[source], extra_cflags=["-O3", "-fopenmp"],
                  extra_ldflags=["-fopenmp"], build_directory=sys.argv[1])
with pytest.raises(RuntimeError, match="probe must have 5 dims"):
    ext.fail(torch.zeros(2))
print("ok")
"""


def _run_checks(code, tmp_path):
    """Runs attnkit's checks in a child. Where the child dies by a signal, builds the
    minimal extension (~30 s) and throws the same way: a crash there too skips (the
    machine's toolchain), a RuntimeError there fails (attnkit's build or code)."""
    result = _run_child(code)
    if result.returncode == 0 and result.stdout.strip().endswith("ok"):
        return
    if result.returncode < 0:
        probe = _run_child(_MINIMAL_CHECKS, str(tmp_path))
        if probe.returncode < 0:
            pytest.skip(f"this machine's toolchain: a minimal load_inline extension's TORCH_CHECK dies by signal "
                        f"{-probe.returncode} too (README, known limitations)")
        assert probe.returncode == 0, "the minimal extension failed otherwise:\n" + _report(probe)
    raise AssertionError(_report(result))


def test_cpu_extension_errors_reach_python_as_runtime_errors(tmp_path):
    _run_checks(_CPU_CHECKS, tmp_path)


def test_persistent_rnn_kernel_is_exported_and_checks_arguments(tmp_path):
    _run_checks(_PERSISTENT_CHECKS, tmp_path)


def test_a_crash_skips_only_where_the_minimal_extension_crashes_too(tmp_path, monkeypatch):
    """_run_checks's verdicts, its children replaced: the probe runs only after a
    death by signal, and only a crash in both skips."""
    crash, fine = subprocess.CompletedProcess([], -11, "", ""), subprocess.CompletedProcess([], 0, "ok\n", "")
    error = subprocess.CompletedProcess([], 1, "", "Traceback")
    for child, probe, verdict in ((fine, None, "pass"), (crash, crash, "skip"), (crash, fine, "fail"),
                                  (error, None, "fail")):
        runs = []
        monkeypatch.setattr(sys.modules[__name__], "_run_child", lambda code, *args: runs.append(code) or
                            (probe if code == _MINIMAL_CHECKS else child))
        if verdict == "pass":
            _run_checks("checks", tmp_path)
        else:
            with pytest.raises(pytest.skip.Exception if verdict == "skip" else AssertionError):
                _run_checks("checks", tmp_path)
        assert runs == ["checks"] + ([_MINIMAL_CHECKS] if probe is not None else [])
