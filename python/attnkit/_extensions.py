"""Loads the compiled extensions lazily, keeping the reason when one is missing
so that the package imports everywhere and the dispatcher can explain."""
from __future__ import annotations

import importlib
import json
import os
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


def _import(name: str) -> Tuple[Optional[ModuleType], str]:
    full_name = f"attnkit.{name}"
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
