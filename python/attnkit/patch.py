"""`attnkit.patch(model)`: swap every supported torch.nn module of a model for its
attnkit drop-in, in place; `attnkit.unpatch(model)` and `attnkit.patched(model)` undo it.

Each replacement is built by the drop-in's `from_torch` (or an equivalent share):
a new module object holding the same Parameter objects (so weights, device, dtype,
optimizers and hooks carry over) and the same training flag, set into the parent in
place of the original. Replacements share the originals' hook dicts and hold copies
of their parameter and buffer dicts (attnkit.nn._share, `_tie`); unpatch carries back what
changed while patched: each module's training flag, and Parameters and buffers that
were replaced, added or deleted (load_state_dict(assign=True), to_empty, weight_norm).
Only exact torch.nn classes are replaced: a user subclass may override forward, so it
is skipped (with the reason) and its children are visited.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Type, Union

import torch

from . import nn as ak
from .nn._share import HOOK_CONTAINERS

_ORIGINALS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


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
            table[getattr(torch.nn, name)] = ours.from_torch
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
    if isinstance(modules, (str, type)):  # one name or class: not a string's letters
        modules = [modules]
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
                _tie(child, new, memo)
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


def _tie(original: torch.nn.Module, new: torch.nn.Module, memo: Dict) -> None:
    """Pairs `new` (built by a from_torch) and its inner replacements with their originals:
    each shares its original's hook dicts (from_torch copies them, but a RemovableHandle
    deletes its hook from the one dict it knows, so a copy would keep running a hook its
    owner removed), and an inner original met again elsewhere (a tied attention, one
    layer in two encoders) gets the same replacement."""
    originals = dict(original.named_modules(remove_duplicate=False))
    for name, sub in list(new.named_modules(remove_duplicate=False)):
        inner = originals.get(name)
        if inner is None or inner is sub:
            continue
        known = memo.setdefault(id(inner), sub)
        if known is not sub:
            parent, _, leaf = name.rpartition(".")
            new.get_submodule(parent)._modules[leaf] = known
        else:
            sub.__dict__.update({key: inner.__dict__[key] for key in HOOK_CONTAINERS if key in inner.__dict__})


def _carry_back(replacement: torch.nn.Module, original: torch.nn.Module) -> None:
    """What changed on `replacement` and its submodules while patched, onto `original` and
    its counterparts (the same qualified names; shared submodules are the same objects)."""
    counterparts = dict(original.named_modules(remove_duplicate=False))
    for name, module in replacement.named_modules(remove_duplicate=False):
        target = counterparts.get(name)
        if target is None or target is module:
            continue
        target.training = module.training
        for key in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
            ours, theirs = module.__dict__[key], target.__dict__[key]
            if _differs(ours, theirs):
                theirs.clear()
                theirs.update(ours)
                if hasattr(target, "_init_flat_weights"):  # torch.nn RNNs cache their weights in a list
                    target._init_flat_weights()


def _differs(ours, theirs) -> bool:
    if isinstance(ours, set):
        return ours != theirs
    return ours.keys() != theirs.keys() or any(theirs[key] is not value for key, value in ours.items())


def unpatch(model: torch.nn.Module) -> List[str]:
    """Puts back every original module that attnkit.patch replaced inside `model`, carrying
    back what changed while patched (training flags, replaced Parameters and buffers);
    returns their qualified names. A module parametrized while patched stays (warned): its
    parametrization belongs to its class. The originals are known to this process for the
    patched object itself: a copy or a reloaded patched model keeps its attnkit modules (load
    its state_dict into the torch.nn model instead)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attnkit.unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    restored: List[str] = []

    def visit(parent, prefix):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            original = _ORIGINALS.get(child)
            if original is not None and torch.nn.utils.parametrize.is_parametrized(child):
                warnings.warn(f"attnkit.unpatch: {prefix + name} was parametrized while patched; it stays an "
                              f"attnkit module (remove the parametrizations first to unpatch it)", stacklevel=3)
            elif original is not None:
                _carry_back(child, original)
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
