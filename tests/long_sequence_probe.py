"""Long-sequence runs measured in a fresh process: peak resident memory above the inputs,
time, and the error against a float64 truth. tests/test_stability.py runs it in a
subprocess (torch's CPU allocator keeps no statistics, tracemalloc does not see it);
by hand it prints the figures:

    .venv/bin/python tests/long_sequence_probe.py attention:32768 attention:8192:backward lstm:10000 gru:10000

Peak memory: the high-water mark during the run (VmHWM, reset through /proc/self/clear_refs
once the inputs exist, after malloc_trim so that memory freed by an earlier run in the same
process counts again when reused) minus the resident size then, in MiB.
"""
import argparse
import ctypes
import gc
import json
import resource
import time

import torch

import attnkit
from attnkit.ops import flash_attention

MIB = 2**20


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> bool:
    try:  # Linux >= 4.0: "5" resets the peak resident size (VmHWM) to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_free_memory() -> None:
    """Hands memory freed by earlier runs back to the OS, so that reusing it counts again."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measured(fn):
    """(fn(), seconds, peak MiB above the resident size before the call)."""
    _release_free_memory()
    before = _resident()
    if not _reset_peak():  # no reset: ru_maxrss since start, an upper bound of the call's peak
        before = min(before, _peak())
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, max(0, _peak() - before) / MIB


def attention(n: int, dim: int, backward: bool, rows: int = 64) -> dict:
    """Causal self-attention B = H = 1 at length n on the cpp backend, fp32; the error on
    `rows` query rows (spread over the sequence) against exact float64 rows, and with
    `backward` dq on those rows and dk, dv everywhere against a chunked float64 backward."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, dim, generator=gen) for _ in range(3))
    grad_out = torch.randn(1, 1, n, dim, generator=gen)
    for t in (q, k, v):
        t.requires_grad_(backward)
    with attnkit.use_backend("cpp", op="flash_attention"):
        # Warm-up: threads, extension, and with `backward` torch's lazy imports in autograd.grad (sympy, ~33 MiB
        # resident), which the forward's custom-op dispatch used to trigger before the eager route skipped it.
        warm = flash_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], causal=True)
        if backward:
            torch.autograd.grad(warm, (q, k, v), torch.ones_like(warm))

        def run():
            out = flash_attention(q, k, v, causal=True)
            grads = torch.autograd.grad(out, (q, k, v), grad_out) if backward else ()
            return out.detach(), grads

        (out, grads), seconds, peak = measured(run)
    assert attnkit.last_dispatch("flash_attention").backend == "cpp"
    index = torch.linspace(0, n - 1, rows).long()
    qd, kd, vd, god = (t.detach()[0, 0].double() for t in (q, k, v, grad_out))
    scale = dim**-0.5
    errors = {"out": 0.0}
    dk, dv = torch.zeros_like(kd), torch.zeros_like(vd)
    chunk = 1024 if backward else None
    for start in range(0, n, chunk) if backward else [None]:
        rows_here = torch.arange(start, min(start + chunk, n)) if backward else index
        s = (qd[rows_here] @ kd.T) * scale
        s = s.masked_fill(torch.arange(n)[None, :] > rows_here[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        o = p @ vd
        errors["out"] = max(errors["out"], (out[0, 0, rows_here].double() - o).abs().max().item())
        if backward:
            dp = god[rows_here] @ vd.T
            ds = p * (dp - (god[rows_here] * o).sum(-1, keepdim=True))
            dk += ds.T @ qd[rows_here] * scale
            dv += p.T @ god[rows_here]
            picked = torch.isin(rows_here, index)
            if picked.any():
                dq = ds[picked] @ kd * scale
                errors["dq"] = max(errors.get("dq", 0.0), (grads[0][0, 0, rows_here[picked]].double() - dq).abs().max().item())
    if backward:
        errors["dk"] = (grads[1][0, 0].double() - dk).abs().max().item() / max(1.0, dk.abs().max().item())
        errors["dv"] = (grads[2][0, 0].double() - dv).abs().max().item() / max(1.0, dv.abs().max().item())
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    input_mib = sum(t.numel() * t.element_size() for t in (q, k, v, grad_out)) / MIB
    return dict(kind="attention", n=n, dim=dim, backward=backward, seconds=seconds, peak_mib=peak,
                input_mib=input_mib, dense_scores_mib=n * n * 4 / MIB, finite=finite, errors=errors)


def rnn(kind: str, steps: int, batch: int = 2, input_size: int = 8, hidden: int = 32) -> dict:
    """One attnkit.nn.LSTM/GRU layer over `steps` steps on the cpp backend in fp32, forward and
    backward, against torch.nn in float64 with the same weights."""
    torch.manual_seed(0)
    module = getattr(attnkit.nn, kind.upper())(input_size, hidden)
    truth = getattr(torch.nn, kind.upper())(input_size, hidden, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    weights = torch.linspace(-1, 1, steps * batch * hidden).view(steps, batch, hidden)
    with attnkit.use_backend("cpp", op=kind):
        module(x[:2])  # warm-up

        def run():
            out, _ = module(x)
            loss = (out * weights).sum()
            nodes = _graph_size(loss.grad_fn)
            return out.detach(), torch.autograd.grad(loss, [x] + list(module.parameters())), nodes

        (out, grads, nodes), seconds, peak = measured(run)
    assert attnkit.last_dispatch(kind).backend == "cpp"
    x64 = x.detach().double().requires_grad_(True)
    out64, _ = truth(x64)
    grads64 = torch.autograd.grad((out64 * weights.double()).sum(), [x64] + list(truth.parameters()))
    grad_error = max((g.double() - e).abs().max().item() / max(1.0, e.abs().max().item()) for g, e in zip(grads, grads64))
    gates = 4 if kind == "lstm" else 3
    # What the kernels save for the backward (gates, cell states, output) plus the output:
    activations = steps * batch * (gates + 1 + 3) * hidden * 4 / MIB
    return dict(kind=kind, t=steps, batch=batch, hidden=hidden, seconds=seconds, peak_mib=peak,
                activation_mib=activations, input_mib=x.numel() * 4 / MIB, autograd_nodes=nodes,
                finite=bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads),
                errors={"out": (out.double() - out64.detach()).abs().max().item(), "grad": grad_error})


def _graph_size(fn) -> int:
    """Nodes of the autograd graph under fn (iteratively: a per-step graph would be deep)."""
    seen, stack = set(), [fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def parse_spec(spec: str) -> tuple:
    """'attention:N', 'attention:N:backward', 'lstm:T' or 'gru:T' -> (kind, size, backward);
    argparse's type, so that a bad spec is a usage error before any run."""
    kind, _, rest = spec.partition(":")
    size, _, flag = rest.partition(":")
    usable = kind in ("attention", "lstm", "gru") and size.isdigit() and int(size) > 0 and (
        flag in ("", "backward") if kind == "attention" else flag == "")
    if not usable:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: expected attention:N, attention:N:backward, lstm:T or gru:T with N, T >= 1")
    return kind, int(size), flag == "backward"


def run_spec(spec: str) -> dict:
    kind, size, backward = parse_spec(spec)
    if kind == "attention":
        return attention(size, 64, backward)
    return rnn(kind, size)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", type=_checked_spec,
                        help="attention:N[:backward], lstm:T, gru:T (one JSON line each)")
    for spec in parser.parse_args(argv).specs:
        print(json.dumps(dict(run_spec(spec), spec=spec)), flush=True)


def _checked_spec(spec: str) -> str:
    parse_spec(spec)
    return spec


if __name__ == "__main__":
    main()
