"""Backend dispatch: each op has implementations in several backends; every call
picks the first that supports it, or the one the user forced.

Backends, in order of preference:
  GPU tensors: triton -> cuda_persistent -> cuda -> cpp -> reference
  CPU tensors: cpp -> reference -> triton (CPU tensors only under TRITON_INTERPRET=1)
cuda_persistent is the persistent small-batch LSTM/GRU kernel of attnkit._C_cuda
(inference only; ATTNKIT_RNN_PERSISTENT=0 switches it off, see backends/rnn.py).

An implementation states why it cannot serve a call (xformers'
`not_supported_reasons`); the dispatcher keeps those reasons so that
`attnkit.explain(...)`, `attnkit.last_dispatch(op)` and the debug log
(`logging.getLogger("attnkit.dispatch")`) can say which backend ran and why the
others were skipped.

Forcing, strongest first: `with attnkit.use_backend(name[, op=...])`,
`attnkit.set_backend(name[, op=...])`, the ATTNKIT_BACKEND environment
variable (`cpp`, or per op: `lstm_cell=cpp,flash_attention=triton`).

Threads: `use_backend` is a contextvar, so it holds in its own thread (or asyncio
task) only; a new thread starts without it (submit `contextvars.copy_context().run`
to carry it). `set_backend` is process-wide. `last_dispatch` is the latest call
from any thread. Ops themselves may be called from several threads at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import os
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import _extensions

BACKENDS = ("triton", "cuda_persistent", "cuda", "cpp", "reference")
_ORDER_BY_DEVICE = {
    "cuda": ("triton", "cuda_persistent", "cuda", "cpp", "reference"),
    "cpu": ("cpp", "reference", "triton", "cuda_persistent", "cuda"),
}
_ALL_OPS = "*"  # key under which a backend forced for every op is stored

log = logging.getLogger("attnkit.dispatch")


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What this install can run: `available` with a note, or the reason it cannot."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name:9s} {'yes' if self.available else 'no '}  {self.reason}"


def _probe_triton() -> BackendStatus:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install
        return BackendStatus("triton", False, f"triton is not importable ({exc})")
    if torch.cuda.is_available():
        return BackendStatus("triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if interpreter_active():
        return BackendStatus("triton", True, f"triton {triton.__version__}, interpreter on CPU (TRITON_INTERPRET=1)")
    return BackendStatus("triton", False, f"triton {triton.__version__} imports, but there is no GPU and TRITON_INTERPRET is not 1")


def _probe_cuda(name: str = "cuda") -> BackendStatus:
    ext, reason = _extensions.load("_C_cuda")
    if ext is None:
        return BackendStatus(name, False, reason)
    if not torch.cuda.is_available():
        return BackendStatus(name, False, "attnkit._C_cuda is built, but torch sees no CUDA GPU")
    return BackendStatus(name, True, f"attnkit._C_cuda on {torch.cuda.get_device_name()}")


def _probe_cpp() -> BackendStatus:
    ext, reason = _extensions.load("_C")
    if ext is None:
        return BackendStatus("cpp", False, reason)
    return BackendStatus("cpp", True, "attnkit._C")


_PROBES: Dict[str, Callable[[], BackendStatus]] = {
    "triton": _probe_triton,
    "cuda_persistent": lambda: _probe_cuda("cuda_persistent"),
    "cuda": _probe_cuda,
    "cpp": _probe_cpp,
    "reference": lambda: BackendStatus("reference", True, "plain PyTorch, always available"),
}


_ENCODED_NAMES: Dict[str, bytes] = {}


def getenv(name: str) -> Optional[str]:
    """os.environ.get(name), faster for a variable that is not set (the usual
    case): every dispatch reads a few (they take part in the choice), and
    os.environ.get encodes the key in Python and, when the variable is unset,
    raises and catches a KeyError: 0.56 us against 0.14 here (0.25 and 0.24 for
    a set one). On POSIX os.environ keeps the encoded pairs in its `_data`
    dict, which every write through os.environ updates; read that."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get(name)
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = os.fsencode(name)
    value = data.get(key)
    return None if value is None else os.fsdecode(value)


def interpreter_active() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _status(name: str) -> BackendStatus:
    return _PROBES[name]()


# Environment variables that a backend's not_supported_reasons reads (besides
# ATTNKIT_BACKEND, part of every decision's key anyway): cached decisions are
# keyed on their values too. Backends add theirs with choice_depends_on_env.
_CHOICE_ENV: List[str] = ["TRITON_INTERPRET"]


def choice_depends_on_env(name: str) -> None:
    if name not in _CHOICE_ENV:
        _CHOICE_ENV.append(name)


def available_backends() -> Dict[str, BackendStatus]:
    """Every backend with whether this install can run it, and why not."""
    statuses = {name: _status(name) for name in BACKENDS}
    cpp = statuses["cpp"]
    if cpp.available:  # the count now, not at the (cached) probe: torch.set_num_threads changes it
        statuses["cpp"] = dataclasses.replace(cpp, reason=f"{cpp.reason}, {torch.get_num_threads()} threads")
    return statuses


def refresh() -> None:
    """Forget cached probes (after building an extension or changing TRITON_INTERPRET)."""
    _status.cache_clear()
    _extensions.forget()
    for op in _OPS.values():
        op.decisions.clear()


# --------------------------------------------------------------------------- forcing

_forced_by_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("attnkit_backend", default={})
_forced_globally: Dict[str, str] = {}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attnkit: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


# Public names that dispatch under another op's name.
_OP_ALIASES = {"apply_rotary": "rotary", "flash_attention_varlen": "flash_attention",
               "scaled_dot_product_attention": "flash_attention"}


def _op_key(op: Optional[str], who: str, aliases: bool = True) -> str:
    """The dispatch name of `op` (None: all ops); an unknown name is an error, not a no-op."""
    if op is None:
        return _ALL_OPS
    key = _OP_ALIASES.get(op, op) if isinstance(op, str) and aliases else op
    if key not in _OPS:
        raise ValueError(f"{who}: unknown op {op!r}; known ops: {', '.join(sorted(_OPS))} "
                         f"(and {', '.join(sorted(_OP_ALIASES))}, which dispatch as another op)")
    return key


def set_backend(name: Optional[str], op: Optional[str] = None) -> None:
    """Force backend `name` for `op` (all ops when None); `name=None` lifts it."""
    key = _op_key(op, "attnkit.set_backend")
    if name is None:
        _forced_globally.pop(key, None)
    else:
        _forced_globally[key] = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str, op: Optional[str] = None) -> Iterator[None]:
    """Force backend `name` for `op` (all ops when None) inside the block. The innermost block
    wins: one for all ops also lifts, inside it, what outer blocks forced for single ops."""
    key = _op_key(op, "attnkit.use_backend")
    forced = {} if key == _ALL_OPS else dict(_forced_by_context.get())
    forced[key] = _check_name(name)
    with _forcing(forced):
        yield


@contextlib.contextmanager
def _forcing(mapping: Mapping[str, str]) -> Iterator[None]:
    """The `use_backend` blocks' forcing is `mapping` (op -> backend) inside the block."""
    token = _forced_by_context.set(mapping)
    try:
        yield
    finally:
        _forced_by_context.reset(token)


def keep_backend_forcing() -> Tuple[ContextManager[None], ContextManager[None]]:
    """`context_fn` for torch.utils.checkpoint.checkpoint(..., use_reentrant=False): the forward
    it recomputes inside the backward runs under the `use_backend` blocks that were around the
    checkpointed call (a block around the call does not reach the recomputation, which runs in
    loss.backward(), and the recomputed ops' backward would follow it)."""
    return contextlib.nullcontext(), _forcing(context_forcing())


def context_forcing() -> Mapping[str, str]:
    """The backends that `use_backend` blocks force here and now (op -> backend)."""
    return _forced_by_context.get()


def remember_forcing(setup_context: Callable) -> Callable:
    """Wrap an autograd formula's setup_context to keep the `use_backend` blocks around the forward,
    so that the backward (see `forced_as_forward`) runs where the forward did."""

    @functools.wraps(setup_context)
    def wrapper(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.attnkit_forcing = context_forcing()

    return wrapper


def forced_as_forward(backward: Callable) -> Callable:
    """Wrap an autograd formula's backward to run under the `use_backend` blocks that were around its
    forward: `.backward()` usually runs outside the block (a training loop's loss.backward()), and a
    forward forced to the reference would otherwise get its backward from the default backend. Where
    the forward had no block, the backward's own blocks hold."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        forcing = getattr(ctx, "attnkit_forcing", None)
        if not forcing:
            return backward(ctx, *grads)
        return call_with(_forced_by_context, forcing, backward, ctx, *grads)

    return wrapper


def call_with(variable: contextvars.ContextVar, value: Any, function: Callable, *args: Any) -> Any:
    """function(*args) with the context variable set to value, reset after."""
    token = variable.set(value)
    try:
        return function(*args)
    finally:
        variable.reset(token)


def _forced_by_env() -> Dict[str, str]:
    return _parse_forced(getenv("ATTNKIT_BACKEND") or "")


@functools.lru_cache(maxsize=8)  # read on every call; parsed once per value
def _parse_forced(value: str) -> Dict[str, str]:
    value = value.strip()
    forced: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        op, _, name = (part.strip() for part in item.partition("=")) if "=" in item else ("", "", item)
        if name not in BACKENDS:
            raise ValueError(
                f"attnkit: ATTNKIT_BACKEND={value!r} names unknown backend {name!r}; "
                f"expected one of {', '.join(BACKENDS)}, optionally as op=backend"
            )
        forced[_op_key(op or None, f"attnkit: ATTNKIT_BACKEND={value!r}")] = name
    return forced


def forced_backend(op: str) -> Optional[tuple]:
    """(backend, who forced it) for `op`, or None when the choice is automatic."""
    for source, forced in (
        ("use_backend", _forced_by_context.get()),
        ("set_backend", _forced_globally),
        ("ATTNKIT_BACKEND", _forced_by_env()),
    ):
        for key in (op, _ALL_OPS):
            if key in forced:
                return forced[key], source
    return None


def forced_to(op: str, backend: str) -> bool:
    """Whether `backend` is forced by name for `op`: a backend that the automatic choice
    skips (opt-in, switched off, a choice of speed) still runs then."""
    forced = forced_backend(op)
    return forced is not None and forced[0] == backend


# --------------------------------------------------------------------------- per-op dispatch


class Implementation:
    """One backend's implementation of one op. Subclasses set `backend` and
    override `not_supported_reasons`; the op calls their methods."""

    backend: str = ""

    def not_supported_reasons(self, call: Mapping[str, Any]) -> List[str]:
        return []


def device_reasons(call: Mapping[str, Any], backend: str) -> List[str]:
    """Reasons a backend cannot take tensors on `call['device']`."""
    device = call["device"].type
    if backend == "cpp" and device != "cpu":
        return [f"tensors are on {device}; the cpp backend runs on CPU"]
    if backend in ("cuda", "cuda_persistent") and device != "cuda":
        return [f"tensors are on {device}; the {backend} backend runs on CUDA GPUs"]
    if backend == "triton" and device == "cpu" and not interpreter_active():
        return ["tensors are on cpu; Triton runs CPU tensors only under TRITON_INTERPRET=1"]
    if backend == "triton" and device not in ("cpu", "cuda"):
        return [f"tensors are on {device}; Triton runs on CUDA GPUs"]
    return []


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which backend serves a call, and why each other one was skipped."""

    op: str
    backend: Optional[str]
    skipped: Dict[str, List[str]]
    forced_by: Optional[str] = None

    def __str__(self) -> str:
        how = f"forced by {self.forced_by}" if self.forced_by else "automatic"
        lines = [f"{self.op}: {self.backend} ({how})"]
        lines += [f"  skipped {name}: {'; '.join(reasons)}" for name, reasons in self.skipped.items()]
        return "\n".join(lines)


_last_decisions: Dict[str, Decision] = {}


class Op:
    """The backends of one op and the choice among them."""

    # Decisions kept per op: calls of one model repeat a handful of descriptions.
    MAX_DECISIONS = 256

    def __init__(self, name: str, implementations: List[Implementation]):
        self.name = name
        self.implementations = {impl.backend: impl for impl in implementations}
        # (call description, forcing, environment) -> Decision: a choice is a
        # function of these (and of the probes, which refresh() forgets with it).
        # Deciding afresh took 4-8 us a call, as much as a small kernel.
        self.decisions: Dict[tuple, Decision] = {}
        _OPS[name] = self

    def reasons(self, backend: str, call: Mapping[str, Any]) -> List[str]:
        status = _status(backend)
        if not status.available:
            return [status.reason]
        impl = self.implementations.get(backend)
        if impl is None:
            return [f"no {self.name} implementation in the {backend} backend"]
        return device_reasons(call, backend) + impl.not_supported_reasons(call)

    def decide(self, call: Mapping[str, Any]) -> Decision:
        forced = forced_backend(self.name)
        try:
            key = (tuple(call.items()), forced, tuple(map(getenv, _CHOICE_ENV)))
            decision = self.decisions.get(key)
        except TypeError:  # an unhashable value in the description: decide every time
            key = decision = None
        if decision is None:
            decision = self._decide(call, forced)
            if key is not None:
                if len(self.decisions) >= self.MAX_DECISIONS:
                    self.decisions.clear()
                self.decisions[key] = decision
        return decision

    def _decide(self, call: Mapping[str, Any], forced: Optional[tuple]) -> Decision:
        order = _ORDER_BY_DEVICE.get(call["device"].type, BACKENDS)
        skipped: Dict[str, List[str]] = {}
        if forced is not None:
            name, source = forced
            reasons = self.reasons(name, call)
            if reasons:
                raise RuntimeError(
                    f"attnkit: backend {name!r} was forced (by {source}) for {self.name} but cannot run this call: "
                    + "; ".join(reasons)
                )
            for other in order:
                if other != name:
                    skipped[other] = [f"{name!r} forced by {source}"]
            return Decision(self.name, name, skipped, source)
        chosen = None
        for name in order:
            reasons = self.reasons(name, call)
            if chosen is None and not reasons:
                chosen = name
            else:
                skipped[name] = reasons or [f"{chosen} comes first in the order for {call['device'].type} tensors"]
        if chosen is None:  # the reference serves every call, so only a bug gets here
            raise RuntimeError(f"attnkit: no backend can run {self.name}: {skipped}")
        return Decision(self.name, chosen, skipped)

    def select(self, call: Mapping[str, Any]) -> Implementation:
        decision = self.decide(call)
        _last_decisions[self.name] = decision
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", decision)
        return self.implementations[decision.backend]


_OPS: Dict[str, Op] = {}
# op name -> function mapping the public op's arguments to a call description
_DESCRIBERS: Dict[str, Callable[..., Dict[str, Any]]] = {}


def register_describer(op: str, describe: Callable[..., Dict[str, Any]]) -> None:
    """`describe(*args, **kwargs)`: the call of `op` (or of an alias, with its own arguments)
    as the implementations' not_supported_reasons see it."""
    _DESCRIBERS[op] = describe


def explain(op: str, *args: Any, **kwargs: Any) -> Decision:
    """The backend that a call of `op` with these arguments would run, and why
    the others would be skipped; runs nothing."""
    key = _op_key(op, "attnkit.explain")
    describe = _DESCRIBERS[op if op in _DESCRIBERS else key]  # an alias takes its own arguments
    try:
        inspect.signature(describe).bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"attnkit.explain({op!r}, ...): these are not {op}'s arguments: {error}") from None
    return _OPS[key].decide(describe(*args, **kwargs))


def last_dispatch(op: str) -> Optional[Decision]:
    """The decision of the most recent call of `op` in this process (None before any)."""
    return _last_decisions.get(_op_key(op, "attnkit.last_dispatch"))
