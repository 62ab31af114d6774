"""Bad-input fuzzing of every public op, run in a subprocess by
tests/test_fuzz_inputs.py so that a segfault fails a test instead of killing pytest.

    python tests/fuzz_cases.py BACKEND [--quick] [OP ...]

Each case starts from a small valid call and breaks or bends one argument:
wrong ndim, one size off by one, a zero size, another dtype (int, bool, complex,
another float), the meta device, not a tensor, None, non-contiguous and expanded
(stride 0) layouts, NaN/Inf entries. The call runs on BACKEND and on the
reference, forward and backward (gradients of the outputs' sum w.r.t. the positional
tensors; forward only for NaN/Inf, decode and in-place rotation). The verdict is
one JSON line per case, after a "START id" line so that a crash names its case:
  ok     both raise a clear error (allowed type, message naming the argument),
         or both return the same values (same NaN/Inf pattern), or BACKEND
         declines the call with the dispatcher's reasons;
  fail   anything else, with the details.
"""
from __future__ import annotations

import copy
import json
import re
import sys
import traceback

import torch

import attnkit
from attnkit import ops

ALLOWED = (ValueError, TypeError, RuntimeError, NotImplementedError)
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_g(seed))


# --------------------------------------------------------------------------- valid calls


def _attention_bases():
    q, k, v = _randn(2, 4, 5, 8, seed=1), _randn(2, 2, 7, 8, seed=2), _randn(2, 2, 7, 6, seed=3)
    mask = _randn(5, 7, seed=4)
    padding = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    return [
        ("mask", ops.flash_attention, [q, k, v], dict(attn_mask=mask), ["q", "k", "v", "attn_mask"]),
        ("padding", ops.flash_attention, [q, k, v], dict(key_padding_mask=padding, alibi_slopes=slopes, causal=True),
         ["q", "k", "v", "key_padding_mask", "alibi_slopes"]),
    ]


def _varlen_bases():
    q, k, v = _randn(9, 4, 8, seed=1), _randn(11, 2, 8, seed=2), _randn(11, 2, 8, seed=3)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    return [("causal", ops.flash_attention_varlen, [q, k, v, cu_q, cu_k, 5, 6], dict(causal=True),
             ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"])]


def _decode_bases():
    q, kc, vc = _randn(2, 4, 1, 8, seed=1), _randn(2, 2, 6, 8, seed=2), _randn(2, 2, 6, 8, seed=3)
    lengths = torch.tensor([3, 6], dtype=torch.int32)
    return [("cache", ops.attention_decode, [q, kc, vc, lengths], {}, ["q", "k_cache", "v_cache", "cache_seqlens"])]


def _rotary_bases():
    x, cos, sin = _randn(2, 5, 3, 8, seed=1), _randn(6, 2, seed=2), _randn(6, 2, seed=3)
    return [
        ("offset", ops.apply_rotary, [x, cos, sin], dict(seqlen_offsets=1), ["x", "cos", "sin"]),
        ("inplace", ops.apply_rotary, [x, cos, sin], dict(inplace=True, interleaved=True), ["x", "cos", "sin"]),
    ]


def _rnn_bases(gates, cell=False):
    H, I = 5, 3
    x = _randn(2, I, seed=1) if cell else _randn(4, 2, I, seed=1)
    w_ih, w_hh = _randn(gates * H, I, seed=2), _randn(gates * H, H, seed=3)
    b_ih, b_hh = _randn(gates * H, seed=4), _randn(gates * H, seed=5)
    h0, c0 = _randn(2, H, seed=6), _randn(2, H, seed=7)
    hx = (h0, c0) if gates == 4 else h0
    op = ops.lstm_cell if cell else (ops.lstm if gates == 4 else ops.gru)
    names = ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"]
    kwargs = {} if cell else dict(lengths=torch.tensor([4, 2]))
    return [("bias", op, [x, hx, w_ih, w_hh, b_ih, b_hh], kwargs, names + ([] if cell else ["lengths"]))]


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _layer_norm_lstm(x, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, ln_c, zoneout):
    """ops.layer_norm_lstm with its keyword-only LN pairs and zoneout taken positionally, so
    that they are mutated (and differentiated, zoneout aside) as the other tensors."""
    return ops.layer_norm_lstm(x, hx, w_ih, w_hh, b_ih, b_hh, ln_ih=ln_ih, ln_hh=ln_hh, ln_c=ln_c,
                               lengths=torch.tensor([4, 2]), zoneout=_detached(zoneout))


def _layer_norm_gru(x, hx, w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh, zoneout):
    return ops.layer_norm_gru(x, hx, w_ih, w_hh, b_ih, b_hh, ln_ih=ln_ih, ln_hh=ln_hh,
                              lengths=torch.tensor([4, 2]), zoneout=_detached(zoneout))


def _layer_norm_rnn_bases(gates):
    H, I = 5, 3
    x, w_ih, w_hh = _randn(4, 2, I, seed=1), _randn(gates * H, I, seed=2), _randn(gates * H, H, seed=3)
    b_ih, b_hh = _randn(gates * H, seed=4), _randn(gates * H, seed=5)
    h0, c0 = _randn(2, H, seed=6), _randn(2, H, seed=7)
    ln = lambda n, seed: (1 + 0.2 * _randn(n, seed=seed), 0.2 * _randn(n, seed=seed + 1))  # noqa: E731
    zoneout = torch.rand(4, 2, H, generator=_g(12))
    common = ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh", "ln_ih", "ln_hh"]
    if gates == 4:
        return [("zoneout", _layer_norm_lstm, [x, (h0, c0), w_ih, w_hh, b_ih, b_hh, ln(4 * H, 8), ln(4 * H, 10),
                                               ln(H, 13), zoneout], {}, common + ["ln_c", "zoneout"])]
    return [("zoneout", _layer_norm_gru, [x, h0, w_ih, w_hh, b_ih, b_hh, ln(3 * H, 8), ln(3 * H, 10), zoneout], {},
             common + ["zoneout"])]


def _additive_bases():
    if not hasattr(ops, "additive_attention"):
        return []
    query, keys, values = _randn(2, 3, 4, seed=1), _randn(2, 5, 6, seed=2), _randn(2, 5, 7, seed=3)
    w_q, w_k, v_a = _randn(8, 4, seed=4), _randn(8, 6, seed=5), _randn(8, seed=6)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    return [("mask", ops.additive_attention, [query, keys, values, w_q, w_k, v_a], dict(mask=mask),
             ["query", "keys", "values", "W_q", "W_k", "v_a", "mask"])]


def _linear_bases():
    x, w, b = _randn(3, 6, seed=1), _randn(5, 6, seed=2), _randn(5, seed=3)
    return [("bias", ops.linear, [x, w, b], {}, ["input", "weight", "bias"])]


OPS = {
    "flash_attention": _attention_bases,
    "flash_attention_varlen": _varlen_bases,
    "attention_decode": _decode_bases,
    "rotary": _rotary_bases,
    "lstm": lambda: _rnn_bases(4),
    "gru": lambda: _rnn_bases(3),
    "lstm_cell": lambda: _rnn_bases(4, cell=True),
    "layer_norm_lstm": lambda: _layer_norm_rnn_bases(4),
    "layer_norm_gru": lambda: _layer_norm_rnn_bases(3),
    "additive_attention": _additive_bases,
    "linear": _linear_bases,
}


# --------------------------------------------------------------------------- mutations


def _like(t: torch.Tensor, shape, seed) -> torch.Tensor:
    """A tensor of t's dtype with `shape`, valid values for index tensors kept small."""
    if t.dtype == torch.bool:
        return torch.rand(shape, generator=_g(seed)) > 0.3
    if not t.dtype.is_floating_point:
        return torch.randint(0, 3, shape, generator=_g(seed), dtype=t.dtype)
    return torch.randn(shape, generator=_g(seed), dtype=t.dtype)


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other element of a twice-as-wide buffer (no unit stride)."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else None
    if buffer is None:
        return t
    view = buffer[..., ::2]
    view.copy_(t)
    return view


def _poison(t: torch.Tensor, value: float, seed: int) -> torch.Tensor:
    out = t.clone()
    if out.numel():
        flat = out.view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=_g(seed)))] = value
    return out


def mutations(t: torch.Tensor, seed: int):
    """(name, replacement) pairs for one tensor argument."""
    yield "ndim+1", t.unsqueeze(0)
    if t.dim() >= 1:
        yield "ndim-1", t[0] if t.shape[0] else t.sum(0)
    for d in range(t.dim()):
        bigger = list(t.shape)
        bigger[d] += 1
        yield f"size{d}+1", _like(t, bigger, seed + d)
        empty = list(t.shape)
        empty[d] = 0
        yield f"size{d}=0", _like(t, empty, seed + d)
    wrong = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.float64, torch.float16]
    if not t.dtype.is_floating_point:
        wrong = [torch.float32, torch.int16, torch.int64 if t.dtype != torch.int64 else torch.int32]
    for dtype in wrong:
        if dtype != t.dtype:
            yield f"dtype={str(dtype).replace('torch.', '')}", t.to(dtype)
    yield "meta", t.to("meta")
    yield "list", t.tolist()
    yield "none", None
    if t.dim() >= 1:
        yield "noncontig", _strided_copy(t)
    if t.dim() >= 2:
        yield "transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if t.shape[0] > 1:
            yield "expanded", t[:1].expand(t.shape)
    if t.dtype.is_floating_point and t.numel():
        for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
            yield name, _poison(t, value, seed)


def _tensor_slots(args, kwargs, names):
    """(name, getter/setter path) for each tensor argument, tuple members (hx) included."""
    slots, index = [], 0
    for i, value in enumerate(args):
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            for j in range(len(value)):
                slots.append((f"{names[index]}[{j}]", ("args", i, j)))
            index += 1
        elif isinstance(value, torch.Tensor):
            slots.append((names[index], ("args", i)))
            index += 1
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            slots.append((key, ("kwargs", key)))
    return slots


def _replace(args, kwargs, path, value):
    args, kwargs = list(args), dict(kwargs)
    if path[0] == "kwargs":
        kwargs[path[1]] = value
    elif len(path) == 3:
        member = list(args[path[1]])
        member[path[2]] = value
        args[path[1]] = tuple(member)
    else:
        args[path[1]] = value
    return args, kwargs


def cases(op_name: str):
    """(case id, function, args, kwargs, argument name, mutation, every argument name)."""
    for base, fn, args, kwargs, names in OPS[op_name]():
        yield f"{op_name}/{base}/valid", fn, args, kwargs, None, "valid", names
        for seed, (arg, path) in enumerate(_tensor_slots(args, kwargs, names)):
            current = args[path[1]][path[2]] if len(path) == 3 else (kwargs if path[0] == "kwargs" else args)[path[1]]
            for mutation, value in mutations(current, 100 * seed):
                if op_name.startswith("layer_norm_") and arg in ("w_ih", "w_hh") and mutation == "expanded":
                    # Equal weight rows make W x's entries equal: the layer norm's std is 0, 1/std
                    # ~316, and every backend's float32 gradients are rounding noise (~1e-4, vs
                    # exact zeros): no reference to compare with. Stride 0 is fuzzed on the others.
                    continue
                new_args, new_kwargs = _replace(args, kwargs, path, value)
                yield f"{op_name}/{base}/{arg}/{mutation}", fn, new_args, new_kwargs, arg, mutation, names


# --------------------------------------------------------------------------- running and judging


def _with_grad(value):
    """Floating tensors (tuple members too) as leaves requiring grad, strides kept."""
    if isinstance(value, tuple):
        return tuple(_with_grad(v) for v in value)
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta:
        return value.detach().requires_grad_()
    return value


def _run(fn, args, kwargs, backend, op_name, grad):
    """("ok", outputs + gradients of their sum) or ("raised", exception); forward and
    backward both run on `backend` (the backward of a call is dispatched again)."""
    args, kwargs = copy.deepcopy((args, kwargs)) if not _has_meta(args, kwargs) else (args, kwargs)
    if grad:  # positional tensors and a float attn_mask (a learned bias); ALiBi slopes and lengths take none
        args = [_with_grad(a) for a in args]
        if "attn_mask" in kwargs:
            kwargs = dict(kwargs, attn_mask=_with_grad(kwargs["attn_mask"]))
    try:
        with attnkit.use_backend(backend, op=op_name):
            out = fn(*args, **kwargs)
            leaves = [t for t in _flat(args) + [kwargs.get("attn_mask")] if isinstance(t, torch.Tensor) and t.requires_grad]
            outputs = [o for o in _flat(out) if o.requires_grad]
            if grad and leaves and outputs:
                grads = torch.autograd.grad(sum(o.sum() for o in outputs), leaves, allow_unused=True)
                out = _flat(out) + [torch.zeros(0) if g is None else g for g in grads]
        return "ok", out
    except BaseException as exc:  # judged below; KeyboardInterrupt would end the batch anyway
        return "raised", exc


def _has_meta(args, kwargs):
    leaves = list(args) + list(kwargs.values())
    leaves += [m for a in args if isinstance(a, tuple) for m in a]
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return _flat(list(out.values()))
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else []


def _compare(got, want) -> str:
    got, want = _flat(got), _flat(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, reference has {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return f"output {i}: {tuple(a.shape)} {a.dtype} {a.device} vs reference {tuple(b.shape)} {b.dtype} {b.device}"
        if a.is_meta or not a.is_floating_point():
            continue
        for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            if not torch.equal(fn(a), fn(b)):
                return f"output {i}: {what} at {fn(a).sum()} places, reference {fn(b).sum()}"
        # No output is more precise than the op computes, which its first output's dtype says: a
        # float64 mask's gradient from a float32 call carries float32 rounding.
        tol = max(TOL[a.dtype], TOL.get(got[0].dtype, 0.0))
        finite = torch.isfinite(b)
        if not torch.allclose(a[finite].double(), b[finite].double(), atol=tol, rtol=tol):
            return f"output {i}: max difference {(a[finite].double() - b[finite].double()).abs().max():.3g}"
    return ""


def _names_argument(message: str, arg: str) -> bool:
    """The message names the argument (hx[0] may be called hx[0] or hx)."""
    names = {arg, arg.split("[")[0]}
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_(])", message) for n in names)


def judge(case_id, fn, args, kwargs, arg, mutation, names, backend, op_name) -> dict:
    # Gradients too, except for the inference-only decode and in-place rotation, and
    # with NaN/Inf inputs (the outputs' NaN/Inf pattern is compared; the gradients'
    # depends on each backend's order of operations, e.g. 0 * inf in a GEMM).
    grad = (op_name != "attention_decode" and not kwargs.get("inplace", False)
            and mutation not in ("nan", "inf", "-inf"))
    status, got = _run(fn, args, kwargs, backend, op_name, grad)
    ref_status, want = _run(fn, args, kwargs, "reference", op_name, grad) if backend != "reference" else (status, got)
    result = {"id": case_id, "verdict": "ok", "detail": ""}

    def fail(detail):
        result.update(verdict="fail", detail=detail)
        return result

    if status == "raised":
        message = f"{type(got).__name__}: {got}"
        if not isinstance(got, ALLOWED):
            return fail(f"raised {message}")
        if "was forced" in str(got) and "cannot run this call" in str(got):
            result["detail"] = "declined: " + str(got)
            return result  # the backend refuses with its reasons, before any kernel
        if ref_status == "ok":
            return fail(f"raised {message} but the reference returns a result")
        # A size that disagrees with another argument may be reported under either name.
        named = names if mutation.startswith("size") else [arg]
        if not str(got).startswith("attnkit") or (arg and mutation != "none" and
                                                 not any(_names_argument(str(got), n) for n in named)):
            return fail(f"message does not come from attnkit's checks or name {arg!r}: {message}")
        result["detail"] = message
        return result
    if ref_status == "raised":
        return fail(f"returned a result but the reference raised {type(want).__name__}: {want}")
    mismatch = _compare(got, want)
    return fail(mismatch) if mismatch else result


# Op names as the dispatcher knows them (use_backend's op=).
DISPATCH_NAME = {"flash_attention_varlen": "flash_attention", "additive_attention": "additive_attention"}


# The few cases run on Triton under the interpreter (slow): the first valid call of
# each op and the layout/value changes that must run, plus two rejections.
QUICK = ("valid", "noncontig", "transposed", "expanded", "nan", "-inf", "ndim+1", "dtype=int32")


def main(argv):
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    backend, op_names = argv[0], argv[1:] or list(OPS)
    torch.manual_seed(0)
    for op_name in op_names:
        for case_id, fn, args, kwargs, arg, mutation, names in cases(op_name):
            if quick and (mutation not in QUICK or case_id.split("/")[1] != next(iter(OPS[op_name]()))[0]):
                continue
            print("START " + case_id, flush=True)
            try:
                result = judge(case_id, fn, args, kwargs, arg, mutation, names, backend,
                               DISPATCH_NAME.get(op_name, op_name))
            except Exception:  # a bug in this harness, reported as a failure of the case
                result = {"id": case_id, "verdict": "fail", "detail": "harness: " + traceback.format_exc(limit=3)}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
