"""A drop-in made from a torch.nn module (from_torch, attnkit.patch): a new object of
the drop-in's class holding the same Parameter and submodule objects, so optimizers
holding them keep working, with the hooks carried over."""
from __future__ import annotations

import copy

import torch

# The containers torch.nn.Module.__init__ makes in this torch version: the parameter,
# buffer and module dicts, every hook dict, the non-persistent buffer set.
MODULE_CONTAINERS = tuple(key for key, value in vars(torch.nn.Module()).items() if isinstance(value, (dict, set)))
HOOK_CONTAINERS = tuple(key for key in MODULE_CONTAINERS if key.endswith("_hooks") or "_hooks_" in key)


def shared(cls, module: torch.nn.Module) -> torch.nn.Module:
    """A `cls` instance with `module`'s attributes and shallow copies of its containers:
    the same Parameters, submodules and hooks, but a hook, parameter or parametrization
    added to one (weight_norm deletes a Parameter and adds two and a pre-hook) stays
    off the other. (attnkit.patch then shares the hook dicts themselves: see there.)"""
    if torch.nn.utils.parametrize.is_parametrized(module):  # its weights are properties of a dynamic class
        raise TypeError(f"{cls.__name__}.from_torch: the module has parametrizations "
                        f"({', '.join(module.parametrizations)}); convert it first, then register them on the "
                        f"attnkit module")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for key in MODULE_CONTAINERS:
        if key in module.__dict__:
            new.__dict__[key] = copy.copy(module.__dict__[key])
    return new


def check_from_torch(cls, module, torch_cls) -> None:
    """A clear TypeError for `cls.from_torch` given anything but a `torch_cls` (a subclass may
    override forward; attnkit takes it anyway, as torch.nn's own layout)."""
    if not isinstance(module, torch_cls):
        raise TypeError(f"{cls.__name__}.from_torch: expected a torch.nn.{torch_cls.__name__}, "
                        f"got {type(module).__name__}")
