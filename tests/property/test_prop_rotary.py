"""Property tests: attnkit.ops.apply_rotary (dense in both layouts, packed varlen, int and
per-sequence offsets incl. positions past the table, shared and per-sequence tables, partial
rotary_dim, interleaved, in place) against a rotation written as complex multiplication in
float64, independent of attnkit.reference.rotary; gradients of x and of the tables."""
import torch
from helpers import TOLERANCES, forced
from hypothesis import given
from hypothesis import strategies as st
from prop_common import examples, seeds

from attnkit.ops import apply_rotary

OP = "rotary"


def complex_rotation(x, cos, sin, positions, interleaved):
    """x (B, N, H, D) with row n of sequence b at positions[b, n]: the first 2 * cos.shape[-1]
    dims, as complex numbers (pairs i, i + R/2, or 2i, 2i + 1), times e^(i angle); rows whose
    position is outside the table pass through."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    pairs = rot.unflatten(-1, (half, 2)) if interleaved else torch.stack(rot.split(half, dim=-1), dim=-1)
    inside = (positions >= 0) & (positions < cos.shape[-2])
    index = positions.clamp(0, cos.shape[-2] - 1)
    if cos.dim() == 2:
        c, s = cos[index], sin[index]  # (B, N, R/2)
    else:
        c, s = (torch.gather(t, 1, index[..., None].expand(-1, -1, half)) for t in (cos, sin))
    turn = torch.complex(torch.where(inside[..., None], c, 1.0), torch.where(inside[..., None], s, 0.0))
    z = torch.view_as_complex(pairs.contiguous()) * turn[:, :, None, :]
    out = torch.view_as_real(z)
    out = out.flatten(-2) if interleaved else torch.cat(out.unbind(-1), dim=-1)
    return torch.cat((out, rest), dim=-1)


@st.composite
def rotary_problems(draw, max_n=12, dims=(2, 4, 8, 16, 24, 40)):
    dim = draw(st.sampled_from(dims))
    batch = draw(st.integers(1, 3))
    return dict(batch=batch, heads=draw(st.integers(1, 3)), dim=dim, rotary_dim=2 * draw(st.integers(1, dim // 2)),
                lengths=draw(st.lists(st.integers(0, max_n), min_size=batch, max_size=batch)),
                seqlen_ro=draw(st.integers(1, 2 * max_n)), interleaved=draw(st.booleans()),
                offsets=draw(st.sampled_from(["int", "tensor"])), per_sequence_tables=draw(st.booleans()),
                varlen=draw(st.booleans()), layout=draw(st.sampled_from(["bnhd", "bhnd"])),
                inplace=draw(st.booleans()), table_grads=draw(st.booleans()), seed=draw(seeds))


def check(backend, p, dtype):
    gen = torch.Generator().manual_seed(p["seed"])
    n = max(p["lengths"]) if p["varlen"] else p["lengths"][0]
    lengths = p["lengths"] if p["varlen"] else [n] * p["batch"]
    seqlen_ro = max(p["seqlen_ro"], n) if p["offsets"] == "int" else p["seqlen_ro"]
    table_shape = ((p["batch"],) if p["per_sequence_tables"] else ()) + (seqlen_ro, p["rotary_dim"] // 2)
    angles = torch.rand(table_shape, generator=gen, dtype=torch.float64) * 2 * torch.pi
    table_dtype = torch.float32 if dtype != torch.float64 else dtype
    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
    if p["offsets"] == "int":
        offset = int(torch.randint(0, seqlen_ro - n + 1, (), generator=gen))
        shifts = torch.full((p["batch"],), offset)
    else:  # may run past the table: those rows pass through unrotated
        shifts = torch.randint(-2, seqlen_ro + 2, (p["batch"],), generator=gen)
        offset = shifts.to(torch.int32)
    xs = [torch.randn(1, length, p["heads"], p["dim"], generator=gen, dtype=torch.float64).to(dtype) for length in lengths]
    grads_in = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).double() for x in xs]
    table_grads = p["table_grads"] and not p["inplace"]
    tables = [t.clone().requires_grad_(table_grads) for t in (cos, sin)]
    kwargs = dict(interleaved=p["interleaved"], seqlen_offsets=offset, inplace=p["inplace"])
    if p["varlen"]:
        x = torch.cat([t[0] for t in xs])
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        kwargs.update(cu_seqlens=cu, max_seqlen=n)
        grad = torch.cat([g[0] for g in grads_in]).to(dtype)
    else:
        x = torch.cat(xs)
        grad = torch.cat(grads_in).to(dtype)
        if p["layout"] == "bhnd":
            x, grad = x.transpose(1, 2).contiguous(), grad.transpose(1, 2)
            kwargs["layout"] = "bhnd"
    leaf = x.clone().requires_grad_(True)
    with forced(OP, backend, "cpu", dtype):
        out = apply_rotary(leaf.clone() if p["inplace"] else leaf, *tables, **kwargs)
        wrt = [leaf] + (tables if table_grads else [])
        got_grads = torch.autograd.grad(out, wrt, grad)
    if not p["varlen"] and p["layout"] == "bhnd":
        out, got_grads = out.transpose(1, 2), [got_grads[0].transpose(1, 2)] + list(got_grads[1:])
    # Truth per sequence in float64, by autograd through the complex rotation.
    truth_tables = [t.detach().double().requires_grad_(True) for t in (cos, sin)]
    outs, dxs = [], []
    for b, (x_b, g_b) in enumerate(zip(xs, grads_in)):
        x_b = x_b.double().requires_grad_(True)
        tab = truth_tables if not p["per_sequence_tables"] else [t[b : b + 1] for t in truth_tables]
        positions = torch.arange(x_b.shape[1])[None, :] + shifts[b]
        out_b = complex_rotation(x_b, *tab, positions, p["interleaved"])
        outs.append(out_b)
        dxs.append(torch.autograd.grad(out_b, x_b, g_b, retain_graph=True)[0])
    total = sum((o * g).sum() for o, g in zip(outs, grads_in))
    table_truth = torch.autograd.grad(total, truth_tables, allow_unused=True) if table_grads else ()
    atol, rtol = TOLERANCES[dtype]
    flat = (lambda ts: torch.cat([t[0] for t in ts])) if p["varlen"] else torch.cat  # noqa: E731
    torch.testing.assert_close(out.double(), flat(outs), atol=atol, rtol=rtol)
    torch.testing.assert_close(got_grads[0].double(), flat(dxs), atol=atol, rtol=rtol)
    for name, g, g_t in zip(("d_cos", "d_sin"), got_grads[1:], table_truth):
        g_t = torch.zeros_like(tables[0], dtype=torch.float64) if g_t is None else g_t
        torch.testing.assert_close(g.double(), g_t, atol=atol * 10, rtol=rtol * 10, msg=name)


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


@examples(40)
@given(p=rotary_problems(), dtype=DTYPES, backend=st.sampled_from(["cpp", "reference"]))
def test_cpu_backends_match_complex_rotation(p, dtype, backend):
    check(backend, p, dtype)


@examples(8)
@given(p=rotary_problems(max_n=6, dims=(2, 8, 24)), dtype=DTYPES)
def test_triton_matches_complex_rotation(p, dtype):
    check("triton", p, dtype)
