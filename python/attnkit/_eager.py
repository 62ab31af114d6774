"""When an op may run its kernels straight from Python instead of through its
torch.library custom op.

The custom ops are what torch.compile, fake tensors, tracing, functorch and
dispatch modes see, and they stay the path there. In plain eager mode their
dispatch (argument boxing, the Python autograd kernel, a redispatch into the
Python implementation) costs as much as a small kernel: a (1, 4, 32, 64) causal
flash_attention fwd+bwd on the CPU took 223-239 us through it and 136 us here;
the batch-1 LSTM layer, (T, B, H) = (256, 1, 128), saved ~0.03 ms a forward
with autograd and 0.03-0.05 ms a training step (1 thread). There the ops call
the same implementation through a torch.autograd.Function (training) or
directly (inference): same kernels, same backward formula, same backend choice.
"""

import contextvars
import functools
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from ._dispatch import call_with, forced_as_forward, remember_forcing
from ._validate import PLAIN_TENSORS


# Argument types that are plain tensors or no tensor at all: one set lookup per
# distinct type instead of a generator step per argument (an op passes ~20).
_PLAIN_TYPES = frozenset(PLAIN_TENSORS) | {type(None), bool, int, float, str, tuple, list, torch.dtype, torch.device}

# Set while a backward runs on batched gradients (autograd.grad(is_grads_batched=True),
# jacobian(vectorize=True)): torch's legacy vmap hands BatchedTensors that type() calls plain
# torch.Tensors but that have no storage for the kernels; the custom ops loop over them.
_batched_backward = contextvars.ContextVar("attnkit_batched_backward", default=False)
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def plain_call(args: Sequence[Any]) -> bool:
    """True when nothing but eager autograd would see a call with `args`: no
    compile, tracing, functorch transform or dispatch mode, and every tensor
    among them a plain one."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo before torch 2.7 cannot trace ContextVar.get
        and not _batched_backward.get()
        and not torch.jit.is_tracing()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._are_functorch_transforms_active()
        and (
            _PLAIN_TYPES.issuperset(map(type, args))
            or all(type(a) in PLAIN_TENSORS or not isinstance(a, Tensor) for a in args)
        )
    )


def needs_grad(tensors: Iterable[Any]) -> bool:
    """Whether autograd would record a call on `tensors` (None and non-tensors ignored). Under
    a functorch transform (vmap) the tensors seen here are unwrapped and say requires_grad=False
    while autograd records the call outside: then whenever grad mode is on. Under
    torch.jit.trace always: the answer becomes a constant of the traced graph (the RNN ops'
    `save`), which must hold for a traced module called with grad, whatever the trace saw."""
    if torch.jit.is_tracing():
        return True
    if not torch.is_grad_enabled():
        return False
    return torch._C._are_functorch_transforms_active() or any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors)


def call(kernels: Callable, custom_op: Callable, *args: Any) -> Any:
    """`kernels(*args)` where nothing but eager autograd sees the call, else `custom_op(*args)`."""
    if has_tangent(args):
        refuse_forward_ad(_name(kernels, custom_op), args)
    if plain_call(args):
        return kernels(*args)
    refuse_differentiating_transforms(_name(kernels, custom_op))
    return custom_op(*args)


def _name(kernels: Callable, custom_op: Callable) -> str:
    return getattr(custom_op, "_name", None) or getattr(kernels, "__name__", "this op")


def refuse_forward_ad(name: str, args: Sequence[Any]) -> None:
    """NotImplementedError when an argument carries a forward-mode AD tangent (torch.autograd.forward_ad):
    the kernels and the custom ops have no forward-mode formula and would drop it silently."""
    if has_tangent(args):
        name = name if name.startswith("attnkit") else f"attnkit {name}"
        raise NotImplementedError(f"{name}: forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) "
                                  f"is not implemented: the op would drop the tangent; use reverse mode "
                                  f"(torch.autograd.grad)")


def has_tangent(args: Sequence[Any]) -> bool:
    """Whether a tensor among `args` carries a forward-mode AD tangent."""
    if getattr(forward_ad, "_current_level", 0) < 0:  # no dual level entered: one attribute read
        return False
    return any(isinstance(arg, Tensor) and forward_ad.unpack_dual(arg).tangent is not None for arg in _flat(args))


def _flat(values: Iterable[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def refuse_differentiating_transforms(name: str) -> None:
    """NotImplementedError naming `name` under torch.func's grad / jvp transforms."""
    if differentiating_transform():
        raise NotImplementedError(
            f"attnkit {name}: torch.func's grad, jacrev, jacfwd and jvp transforms are not supported (the ops' "
            f"gradients are autograd formulas, not functorch rules); use torch.autograd.grad, or vmap alone")


def differentiating_transform() -> bool:
    """Whether a torch.func grad or jvp transform is active: there the custom op's autograd
    formula fails with a message about torch.autograd.Function internals (vmap alone works)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a torch without these: let the op raise its own error
        return False
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def forward(function: type, kernels: Callable, custom_op: Callable, *args: Any, training: bool) -> Any:
    """An op's forward: `custom_op` where the call is not plain, else `function` (an
    autograd_function) when autograd records it (`training`), else `kernels` alone."""
    return call(function.apply if training else kernels, custom_op, *args)


def autograd_function(
    name: str, kernels: Callable, setup_context: Callable, backward: Callable, once: bool = True
) -> type:
    """A torch.autograd.Function running `kernels` with a custom op's autograd
    formula (`setup_context(ctx, inputs, output)`, `backward(ctx, *grads)`).
    `once`: the formula calls kernels without an autograd formula of their own
    (no double backward, as through the custom op); else it is differentiable.
    The backward runs under the forward's backend forcing, as `register_autograd`'s."""
    setup_context = remember_forcing(setup_context)
    backward = _batched_grads_through_custom_ops(forced_as_forward(backward))

    def forward(ctx, *args):  # not forward + setup_context: apply() would then bind the arguments with inspect
        output = kernels(*args)
        setup_context(ctx, args, output)
        if once:  # leaves (the weights) and vectors (biases: unsaved, small) held, the rest weakly:
            # a checkpointed region frees them, and the ops save those they need
            ctx.graph_links = [t if t.is_leaf or t.dim() <= 1 else weakref.ref(t) for t in _differentiable_tensors(args)]
        return output

    backward = _first_order_only(name, backward) if once else backward
    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


def register_autograd(custom_op: Any, backward: Callable, setup_context: Callable) -> None:
    """custom_op.register_autograd, with the backward run under the forward's backend forcing."""
    custom_op.register_autograd(_batched_grads_through_custom_ops(forced_as_forward(backward)),
                                setup_context=remember_forcing(setup_context))


def _batched_grads_through_custom_ops(backward: Callable) -> Callable:
    """`backward`, calling the custom ops (not the kernels) when its gradients are legacy-vmap batched."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not any(isinstance(g, Tensor) and _is_legacy_batched(g) for g in grads):
            return backward(ctx, *grads)
        return call_with(_batched_backward, True, backward, ctx, *grads)

    return wrapper


def _first_order_only(name: str, backward: Callable) -> Callable:
    """torch's once_differentiable, except that a backward run with create_graph=True
    always returns gradients whose own backward raises. once_differentiable does so
    only where the incoming gradients require grad: a gradient penalty on
    grad(out.sum(), q, create_graph=True) then took the first-order gradient for
    a constant and silently dropped its second-order term. The raising node hangs
    from the forward's differentiable inputs (and the incoming gradients): autograd.grad
    runs only the nodes that lead to its `inputs`, so a node on detached leaves alone
    never ran there and a gradient penalty w.r.t. the weights lost its term silently.
    Non-leaf inputs other than vectors are linked while alive only: holding them would keep
    what activation checkpointing frees (an op saves those it needs, which keeps them alive)."""
    label = name.strip("_").removesuffix("Function")
    message = (f"attnkit {label}: its backward is not differentiable: second-order gradients (double backward, "
               f"create_graph=True) are not implemented").encode()

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        inputs = (link if isinstance(link, Tensor) else link() for link in getattr(ctx, "graph_links", ()))
        graph_links = _differentiable_tensors(grads) + tuple(t for t in inputs if t is not None)
        error = torch._C._functions.DelayedError(message, len(outputs) + len(graph_links))
        detached = [None if t is None else t.detach().requires_grad_(True) for t in outputs]
        return error(*detached, *graph_links)[:len(outputs)]

    return wrapper


def _differentiable_tensors(values: Iterable[Any]) -> tuple:
    """The tensors among `values` (and inside lists/tuples among them) that require grad."""
    found = []
    for value in values:
        if isinstance(value, (list, tuple)):
            found.extend(_differentiable_tensors(value))
        elif isinstance(value, Tensor) and value.requires_grad:
            found.append(value)
    return tuple(found)
