"""The shared attention test cases: shapes x features, inputs, and the float64
ground truth (autograd through attnkit.reference.attention)."""
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL

import attnkit
from attnkit.reference import attention as ref


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    heads_kv: int
    n_q: int
    n_k: int
    dim: int
    dim_v: int

    def __str__(self):
        gqa = f"/{self.heads_kv}" if self.heads_kv != self.heads else ""
        dv = f"/{self.dim_v}" if self.dim_v != self.dim else ""
        return f"B{self.batch}H{self.heads}{gqa}-{self.n_q}x{self.n_k}-D{self.dim}{dv}"


@dataclass(frozen=True)
class Features:
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    scale: Optional[float] = None
    mask: str = ""  # "", "bool", "float", "bool-2d"
    padding: bool = False
    pad_whole_sequence: bool = False  # one batch entry entirely padding: fully masked rows
    alibi: str = ""  # "", "heads" (H,), "batch" (B, H)
    rotary: str = ""  # "", "half" (halves, rotary_dim = D), "interleaved", "partial" (rotary_dim < D, per-batch offsets)
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def __str__(self):
        parts = []
        if self.causal:
            parts.append("causal")
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]},{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.mask:
            parts.append(f"mask-{self.mask}")
        if self.padding:
            parts.append("pad-all" if self.pad_whole_sequence else "pad")
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        if self.rotary:
            parts.append(f"rope-{self.rotary}")
        return "+".join(parts) or "plain"


S = Shape
CASES = [
    (S(1, 1, 1, 1, 1, 16, 16), Features()),
    (S(1, 1, 1, 1, 1, 16, 16), Features(causal=True)),
    (S(2, 2, 2, 2, 2, 32, 32), Features(causal=True, softcap=1.0)),
    (S(2, 2, 2, 17, 17, 32, 32), Features()),
    (S(2, 2, 2, 17, 17, 32, 32), Features(causal=True)),
    (S(1, 2, 2, 64, 64, 16, 16), Features(causal=True, scale=0.3)),
    # A scale <= 0 keeps the scores' transform in the tile (the kernels' RAW_SCORES path needs scale > 0).
    (S(1, 2, 2, 20, 24, 16, 16), Features(causal=True, scale=-0.4)),
    (S(2, 2, 2, 17, 23, 16, 16), Features(mask="bool", scale=0.0)),
    (S(2, 2, 1, 17, 33, 80, 80), Features(causal=True)),  # MQA, Nq < Nk
    (S(1, 4, 2, 33, 17, 16, 16), Features(causal=True)),  # GQA, Nq > Nk: early rows see nothing
    (S(1, 2, 2, 20, 24, 24, 40), Features()),  # odd head dims, Dv != D
    (S(1, 1, 1, 129, 129, 128, 128), Features(causal=True)),
    (S(2, 2, 2, 40, 40, 16, 16), Features(window=(3, 2))),
    (S(1, 2, 1, 33, 40, 32, 32), Features(causal=True, window=(5, -1))),
    (S(1, 2, 2, 24, 20, 16, 16), Features(window=(-1, 4))),
    (S(2, 2, 2, 17, 23, 32, 32), Features(softcap=2.0)),
    (S(2, 2, 2, 17, 23, 16, 16), Features(mask="bool")),
    (S(2, 2, 2, 17, 23, 16, 16), Features(mask="float")),
    (S(1, 3, 3, 18, 18, 16, 16), Features(mask="bool-2d", causal=True)),
    (S(3, 2, 2, 17, 29, 16, 16), Features(padding=True)),
    (S(2, 2, 1, 17, 29, 16, 16), Features(padding=True, pad_whole_sequence=True, causal=True)),
    (S(2, 4, 2, 33, 33, 96, 96), Features(causal=True, softcap=3.0, padding=True, mask="float")),
    (S(1, 2, 2, 65, 70, 160, 160), Features(window=(8, 8), softcap=1.5)),
    (S(2, 4, 4, 17, 23, 32, 32), Features(alibi="heads")),
    (S(2, 4, 2, 23, 17, 32, 32), Features(alibi="batch", causal=True, softcap=2.0)),
    (S(1, 2, 2, 33, 33, 256, 256), Features(causal=True, alibi="heads", window=(6, -1))),
    (S(2, 2, 2, 17, 23, 32, 32), Features(rotary="half")),
    (S(2, 4, 2, 9, 20, 16, 16), Features(rotary="interleaved", causal=True)),
    (S(2, 2, 1, 17, 17, 80, 80), Features(rotary="partial", causal=True, softcap=2.0)),
    # Several blocks (16 under the interpreter) inside the window and both sequences:
    # tiles the kernels take without bounds or window checks, beside checked ones.
    (S(1, 2, 2, 96, 96, 16, 16), Features(window=(40, 24))),
    (S(2, 2, 1, 50, 70, 16, 16), Features(causal=True, padding=True, mask="bool")),
    (S(1, 2, 2, 48, 64, 16, 16), Features(mask="float", alibi="heads", softcap=2.0)),
]


def case_id(case):
    shape, features = case
    return f"{shape}-{features}"


def case_params():
    return [pytest.param(*case, id=case_id(case)) for case in CASES]


def make_inputs(shape: Shape, features: Features, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + shape.n_q * 131 + shape.n_k * 17 + shape.dim)

    def randn(*dims):
        return torch.randn(*dims, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)

    q = randn(shape.batch, shape.heads, shape.n_q, shape.dim)
    k = randn(shape.batch, shape.heads_kv, shape.n_k, shape.dim)
    v = randn(shape.batch, shape.heads_kv, shape.n_k, shape.dim_v)
    kwargs = dict(causal=features.causal, window_size=features.window, softcap=features.softcap, scale=features.scale)
    if features.mask == "bool":
        kwargs["attn_mask"] = (torch.rand(shape.batch, 1, shape.n_q, shape.n_k, generator=gen) > 0.3).to(device)
    elif features.mask == "bool-2d":
        kwargs["attn_mask"] = (torch.rand(shape.n_q, shape.n_k, generator=gen) > 0.2).to(device)
    elif features.mask == "float":
        kwargs["attn_mask"] = randn(shape.batch, shape.heads, shape.n_q, shape.n_k)
    if features.alibi == "heads":
        kwargs["alibi_slopes"] = torch.rand(shape.heads, generator=gen).to(device)
    elif features.alibi == "batch":
        kwargs["alibi_slopes"] = torch.rand(shape.batch, shape.heads, generator=gen).to(device)
    if features.rotary:
        rotary_dim = shape.dim if features.rotary != "partial" else shape.dim // 2 - (shape.dim // 2) % 2
        offsets = torch.tensor([3, 0][: shape.batch] + [1] * max(0, shape.batch - 2), dtype=torch.int32)
        positions = torch.arange(shape.n_k + 8, dtype=torch.float64)[:, None]
        angles = positions * 10000.0 ** (-torch.arange(rotary_dim // 2, dtype=torch.float64) * 2 / rotary_dim)
        kwargs.update(rotary_cos=angles.cos().to(dtype=dtype, device=device), rotary_sin=angles.sin().to(dtype=dtype, device=device),
                      rotary_interleaved=features.rotary == "interleaved",
                      rotary_seqlen_offsets=offsets.to(device) if features.rotary == "partial" else 2)
    if features.padding:
        lengths = torch.randint(1, shape.n_k + 1, (shape.batch,), generator=gen)
        if features.pad_whole_sequence:
            lengths[0] = 0
        kwargs["key_padding_mask"] = (torch.arange(shape.n_k)[None, :] >= lengths[:, None]).to(device)
    return q, k, v, kwargs


def reference_options(kwargs, n_q=None):
    """flash_attention keyword arguments -> reference.attention keyword arguments."""
    left, right = kwargs.get("window_size", (-1, -1))
    if kwargs.get("causal"):
        right = 0 if right < 0 else min(right, 0)
    return dict(
        window=(left, right), bottom_right=kwargs.get("causal_alignment", "bottom_right") == "bottom_right",
        attn_mask=kwargs.get("attn_mask"), key_padding_mask=kwargs.get("key_padding_mask"),
        softcap=kwargs.get("softcap", 0.0), scale=kwargs.get("scale"), alibi_slopes=_slopes(kwargs.get("alibi_slopes")),
    )


def _slopes(slopes):
    if slopes is None or slopes.dim() == 2:
        return slopes
    return slopes[None]


def ground_truth(q, k, v, kwargs, grad_out, dropout_p=0.0, dropout_keep=None):
    """(out, lse, (dq, dk, dv)) in float64 by autograd through the reference."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    q_used, k_used = rotated(leaves[0], leaves[1], kwargs)
    options = reference_options(kwargs)
    if options["attn_mask"] is not None and options["attn_mask"].is_floating_point():
        options["attn_mask"] = options["attn_mask"].double()
    out, lse = ref.attention(q_used, k_used, leaves[2], **options, dropout_p=dropout_p, dropout_keep=dropout_keep)
    grads = torch.autograd.grad(out, leaves, grad_out.double())
    return out, lse, grads


def run_with_grads(q, k, v, kwargs, grad_out):
    """(out, lse, (dq, dk, dv)) of attnkit.ops.flash_attention on fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = attnkit.ops.flash_attention(*leaves, **kwargs, return_lse=True)
    return out, lse, torch.autograd.grad(out, leaves, grad_out)


def check_backend_matches_ground_truth(q, k, v, kwargs, dtype, backend):
    """Output, lse and the q/k/v gradients of flash_attention, served by `backend`,
    against the float64 reference (helpers.ATTENTION_TOL, gradients helpers.ATTENTION_GRAD_TOL)."""
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64).to(dtype)
    out, lse, grads = run_with_grads(q, k, v, kwargs, grad_out)
    assert attnkit.last_dispatch("flash_attention").backend == backend
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out)
    assert_close(out, out_t, ATTENTION_TOL[dtype], "out")
    assert_close(lse, lse_t, ATTENTION_TOL[dtype], "lse")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


def rotated(q, k, kwargs):
    """q, k rotated in plain PyTorch as the fused RoPE does (differentiable)."""
    if kwargs.get("rotary_cos") is None:
        return q, k
    offsets = kwargs.get("rotary_seqlen_offsets", 0)
    offsets = torch.as_tensor(offsets).long().reshape(-1, 1).to(q.device)
    diag = k.shape[2] - q.shape[2] if kwargs.get("causal_alignment", "bottom_right") == "bottom_right" else 0
    positions_q = torch.arange(q.shape[2], device=q.device)[None, :] + diag + offsets
    positions_k = torch.arange(k.shape[2], device=q.device)[None, :] + offsets
    cos, sin = kwargs["rotary_cos"].double(), kwargs["rotary_sin"].double()
    spin = dict(interleaved=kwargs.get("rotary_interleaved", False))
    return (ref.rotate(q, cos, sin, positions_q.expand(q.shape[0], -1), **spin),
            ref.rotate(k, cos, sin, positions_k.expand(k.shape[0], -1), **spin))


def assert_close(actual, expected, tol, what=""):
    """Max abs error within tol x max(1, max |expected|); NaN never passes."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() or not torch.isfinite(expected).all(), f"{what}: non-finite values"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{what}: infinities differ"
    assert torch.equal(actual[~finite], expected[~finite]), f"{what}: infinities differ"
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    bound = tol * max(1.0, expected[finite].abs().max().item() if finite.any() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"
