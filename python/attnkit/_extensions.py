"""Loads the compiled extensions lazily, keeping the reason when one is missing
so that the package imports everywhere and the dispatcher can explain.

ATTNKIT_EXTENSION_DIR=<dir> loads them from <dir>/<name>*.so instead of the
package (`make test-asan` uses it for a sanitized build kept out of the tree).
ATTNKIT_NO_EXTENSIONS=1 loads none, as it builds none at install time: the
Triton prewarm of `make gpu-check` runs beside a build that rewrites them."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import json
import os
import sys
from types import ModuleType
from typing import Dict, Optional, Tuple

_loaded: Dict[str, Tuple[Optional[ModuleType], str]] = {}


def build_info() -> dict:
    """What setup.py recorded at build time (empty when unknown)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load(name: str) -> Tuple[Optional[ModuleType], str]:
    """(module, "") or (None, why it is missing) for attnkit.<name>."""
    if name not in _loaded:
        _loaded[name] = _import(name)
    return _loaded[name]


def _import_from(directory: str, full_name: str) -> ModuleType:
    short = full_name.rpartition(".")[2]
    found = sorted(glob.glob(os.path.join(directory, f"{short}.*so")))
    if not found:
        raise ImportError(f"ATTNKIT_EXTENSION_DIR={directory!r} holds no {short}*.so", name=full_name)
    spec = importlib.util.spec_from_file_location(full_name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[full_name] = module
    return module


def _import(name: str) -> Tuple[Optional[ModuleType], str]:
    full_name = f"attnkit.{name}"
    if os.environ.get("ATTNKIT_NO_EXTENSIONS", "").lower() not in ("", "0", "false", "no", "off"):  # as setup.py
        return None, f"{full_name} not loaded: ATTNKIT_NO_EXTENSIONS is set"
    directory = os.environ.get("ATTNKIT_EXTENSION_DIR")
    if directory and name == "_C":  # only the CPU extension has a sanitized build
        try:
            return _import_from(directory, full_name), ""
        except ImportError as exc:
            return None, f"{full_name} failed to import from ATTNKIT_EXTENSION_DIR: {exc}"
    try:
        return importlib.import_module(full_name), ""
    except ImportError as exc:
        recorded = build_info().get("extensions", {}).get(full_name)
        if recorded:
            return None, f"{full_name} was not built ({recorded})"
        if isinstance(exc, ModuleNotFoundError) and exc.name == full_name:
            return None, f"{full_name} is not built (reinstall with `pip install --no-build-isolation -e .`)"
        return None, f"{full_name} failed to import: {exc}"


def forget() -> None:
    _loaded.clear()
