"""ATTNKIT_EXTENSION_DIR (how make test-asan swaps in the sanitized attnkit._C):
the extension comes from that directory, and a directory without it makes the
cpp backend unavailable with the reason instead of silently using the package's."""
import os
import subprocess
import sys

import pytest

import attnkit

PROBE = "import attnkit; s = attnkit.available_backends()['cpp']; print(s.available); print(s.reason)\n" \
        "import attnkit._extensions as e; m, _ = e.load('_C'); print(m.__file__ if m else None)"


def _probe(directory):
    env = dict(os.environ, ATTNKIT_EXTENSION_DIR=str(directory))
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    return out.splitlines()


def test_empty_directory_makes_cpp_unavailable(tmp_path):
    available, reason, _ = _probe(tmp_path)
    assert available == "False" and "ATTNKIT_EXTENSION_DIR" in reason and "_C" in reason


def test_extension_loads_from_the_directory():
    package_dir = os.path.dirname(attnkit.__file__)
    if not attnkit.available_backends()["cpp"].available:
        pytest.skip("attnkit._C is not built")
    available, _, path = _probe(package_dir)
    assert available == "True" and os.path.dirname(path) == package_dir
