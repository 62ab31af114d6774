"""`attnkit.patch(model)`: swap every supported torch.nn module of a model for its
attnkit drop-in, in place; `attnkit.unpatch(model)` and `attnkit.patched(model)` undo it.

Each replacement is built by the drop-in's `from_torch` (or an equivalent share):
a new module object holding the same Parameter objects (so weights, device, dtype,
optimizers and hooks carry over) and the same training flag, set into the parent in
place of the original. Every replacement holds copies of the original's hook and
parameter containers (attnkit.nn._share): a hook, parameter or
parametrization added to one module stays on that one, and unpatch puts back the
original as it was (but for the values of the shared Parameters). Only exact torch.nn
classes are replaced: a user subclass may override forward, so it is skipped (with
the reason) and its children are visited.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

import torch

from . import nn as ak
from .nn._share import shared

_ORIGINALS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _share(cls):
    return lambda module: shared(cls, module)


def _supported() -> Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module]]:
    table = {
        torch.nn.MultiheadAttention: ak.MultiheadAttention.from_torch,
        torch.nn.TransformerEncoderLayer: ak.TransformerEncoderLayer.from_torch,
        torch.nn.TransformerDecoderLayer: ak.TransformerDecoderLayer.from_torch,
        torch.nn.TransformerEncoder: ak.TransformerEncoder.from_torch,
        torch.nn.TransformerDecoder: ak.TransformerDecoder.from_torch,
        torch.nn.Transformer: ak.Transformer.from_torch,
    }
    for name in ("LSTM", "GRU", "LSTMCell", "GRUCell"):  # the recurrent drop-ins this install has
        ours = getattr(ak, name, None)
        if ours is not None:
            table[getattr(torch.nn, name)] = getattr(ours, "from_torch", None) or _share(ours)
    return table


@dataclass
class PatchReport:
    """replaced: (qualified name, torch class, attnkit class); skipped: (qualified name, reason)."""
    replaced: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"attnkit.patch: replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  replaced {name or '<root>'}: {old} -> {new}" for name, old, new in self.replaced]
        lines += [f"  skipped {name or '<root>'}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _selected(table, modules) -> Dict:
    if modules is None:
        return table
    chosen = {}
    for item in modules:
        cls = getattr(torch.nn, item, None) if isinstance(item, str) else item
        if cls not in table:
            raise ValueError(f"attnkit.patch: {item!r} is not a supported module; supported: "
                             f"{sorted(c.__name__ for c in table)}")
        chosen[cls] = table[cls]
    return chosen


def patch(model: torch.nn.Module, *, modules: Optional[Iterable[Union[str, type]]] = None) -> PatchReport:
    """Replaces, in place, each submodule of `model` whose type is exactly a supported torch.nn
    class (MultiheadAttention, Transformer, TransformerEncoder/Decoder(Layer), and LSTM, GRU,
    LSTMCell, GRUCell where attnkit.nn has them), or only those in `modules` (classes or names).
    The root module itself cannot be replaced in place: use attnkit.nn.X.from_torch(model)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attnkit.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    table = _supported()
    chosen = _selected(table, modules)
    report = PatchReport()
    root, prefix = model, ""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # imported by any torch.compile(module)
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        # The wrapper calls the module it was built on, whatever _orig_mod later holds: that is its root.
        root, prefix = model._orig_mod, "_orig_mod."
    if type(root) in table:
        report.skipped.append((prefix[:-1], f"the root {type(root).__name__} cannot be replaced in place; "
                                            f"use attnkit.nn.{type(root).__name__}.from_torch(model)"))
    _visit(root, prefix, table, chosen, report, {})
    return report


def _visit(parent: torch.nn.Module, prefix: str, table, chosen, report: PatchReport, memo: Dict) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        qualified = prefix + name
        cls = type(child)
        if cls in chosen:
            new = memo.get(id(child))
            if new is None:  # a module shared by several parents becomes one attnkit module
                new = memo[id(child)] = chosen[cls](child)
                new.train(child.training)
            parent._modules[name] = new
            _ORIGINALS[new] = child
            report.replaced.append((qualified, f"torch.nn.{cls.__name__}", f"{type(new).__module__}.{type(new).__name__}"))
            child = new
        elif cls in table:
            report.skipped.append((qualified, f"torch.nn.{cls.__name__} not selected by modules="))
        elif isinstance(child, tuple(table)) and not cls.__module__.startswith("attnkit."):
            base = next(t for t in table if isinstance(child, t))
            report.skipped.append((qualified, f"{cls.__name__} subclasses torch.nn.{base.__name__}; its forward may "
                                              f"differ, so it is left as is (its submodules are visited)"))
        _visit(child, qualified + ".", table, chosen, report, memo)


def unpatch(model: torch.nn.Module) -> List[str]:
    """Puts back every original module that attnkit.patch replaced inside `model` (with the
    attnkit module's training flag); returns their qualified names."""
    restored: List[str] = []

    def visit(parent, prefix):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            original = _ORIGINALS.get(child)
            if original is not None:
                original.train(child.training)
                parent._modules[name] = original
                restored.append(prefix + name)
                child = original
            visit(child, prefix + name + ".")

    visit(model, "")
    return restored


@contextlib.contextmanager
def patched(model: torch.nn.Module, *, modules: Optional[Iterable[Union[str, type]]] = None) -> Iterator[PatchReport]:
    """`with attnkit.patched(model) as report:` runs the block with the model patched."""
    report = patch(model, modules=modules)
    try:
        yield report
    finally:
        unpatch(model)
