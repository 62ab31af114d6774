"""Packaging: the import works without the extensions, triton_kernels lives
inside attnkit, the build recorded what it built."""
import os
import subprocess
import sys
import textwrap

import attnkit
from attnkit import _extensions


def test_triton_kernels_is_a_subpackage_not_top_level(tmp_path):
    import attnkit.triton_kernels as tk

    assert os.path.basename(os.path.dirname(tk.__file__)) == "triton_kernels"
    # From a directory outside the checkout, a top-level `triton_kernels` may be
    # another project's, never ours.
    result = run_isolated(
        "import importlib.util; s = importlib.util.find_spec('triton_kernels'); print(s and s.origin)", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert os.path.dirname(tk.__file__) not in result.stdout


def test_build_info_records_the_extensions():
    info = _extensions.build_info()
    assert info["extensions"]["attnkit._C"] is None  # built
    assert "attnkit._C_cuda" in info["extensions"]


def run_isolated(code, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_import_and_fallback_without_compiled_extensions():
    """Hide attnkit._C and attnkit._C_cuda: the package still imports, says why
    the cpp/cuda backends are missing, and the op runs on the reference."""
    result = run_isolated(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name in ("attnkit._C", "attnkit._C_cuda"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        import torch, attnkit
        status = attnkit.available_backends()
        assert not status["cpp"].available and "attnkit._C" in status["cpp"].reason, status["cpp"]
        assert not status["cuda"].available
        x, h = torch.randn(2, 3), torch.randn(2, 4)
        attnkit.ops.lstm_cell(x, (h, h), torch.randn(16, 3), torch.randn(16, 4))
        assert attnkit.last_dispatch("lstm_cell").backend == "reference"
        print("ok", status["cpp"].reason)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_import_does_not_touch_cuda_or_triton_kernels():
    result = run_isolated("import attnkit, sys; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"  # triton loads lazily, on first use
    assert attnkit.__version__


def test_no_extensions_variable_keeps_the_compiled_extensions_unloaded():
    # What gpu-check's Triton prewarm sets, beside a build that rewrites the extensions.
    result = run_isolated(
        """
        import os, sys
        os.environ["ATTNKIT_NO_EXTENSIONS"] = "1"
        import torch, attnkit
        status = attnkit.available_backends()
        assert not status["cpp"].available and "ATTNKIT_NO_EXTENSIONS" in status["cpp"].reason, status["cpp"]
        assert "attnkit._C" not in sys.modules and "attnkit._C_cuda" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
