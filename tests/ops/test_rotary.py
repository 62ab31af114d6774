"""attnkit.ops.apply_rotary on every backend against a plain-PyTorch rotation
(FlashAttention's `apply_rotary_emb_torch`, written here independently of
attnkit.reference.rotary) and against the reference: values, gradients,
gradcheck, in place, offsets, layouts, bad input. Triton runs here on CPU
tensors under TRITON_INTERPRET=1."""
import pytest
import torch
from helpers import backend_params, forced

import attnkit
from attnkit.ops import apply_rotary
from attnkit.reference import rotary as ref

OP = "rotary"
BACKENDS = backend_params(OP)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rotate_half(x, interleaved):
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def plain_rotary(x, cos, sin, interleaved=False, offsets=0):
    """x (B, N, H, D) rotated by the cos/sin rows at n + offsets[b]; computed in x's dtype."""
    batch, seqlen = x.shape[:2]
    shift = offsets if isinstance(offsets, torch.Tensor) else torch.full((batch,), offsets)
    positions = torch.arange(seqlen)[None, :] + shift.long()[:, None]  # (B, N)
    rd = 2 * cos.shape[-1]
    spread = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat((t, t), -1))
    c, s = (spread(t[positions]).to(x.dtype)[:, :, None, :] for t in (cos, sin))
    rot = x[..., :rd]
    return torch.cat((rot * c + rotate_half(rot, interleaved) * s, x[..., rd:]), dim=-1)


def tables(seqlen_ro, rotary_dim, dtype=torch.float32, device="cpu"):
    angles = torch.rand(seqlen_ro, rotary_dim // 2, dtype=torch.float64) * 2 * torch.pi
    return angles.cos().to(dtype=dtype, device=device), angles.sin().to(dtype=dtype, device=device)


# (B, N, H, D, rotary_dim, seqlen_ro, interleaved, offsets): N=1 (decoding), rotary_dim < D, D=80.
CASES = [
    (2, 7, 3, 64, 64, 7, False, 0),
    (2, 7, 3, 64, 64, 7, True, 0),
    (1, 1, 4, 80, 80, 20, False, 13),
    (3, 5, 2, 80, 32, 12, True, "tensor"),
    (2, 9, 1, 40, 24, 16, False, "tensor"),
    (2, 1, 3, 16, 8, 4, True, "tensor"),
]


def case_inputs(case, dtype, device):
    batch, seqlen, heads, dim, rotary_dim, seqlen_ro, interleaved, offsets = case
    x = torch.randn(batch, seqlen, heads, dim, dtype=torch.float64).to(dtype)
    cos, sin = tables(seqlen_ro, rotary_dim)
    if offsets == "tensor":
        offsets = torch.randint(0, seqlen_ro - seqlen + 1, (batch,), dtype=torch.int32)
    return x.to(device), cos, sin, interleaved, offsets


def _on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_gradients_match_plain_pytorch(backend, device, case):
    with forced(OP, backend, device) as dev:
        x, cos, sin, interleaved, offsets = case_inputs(case, torch.float64, "cpu")
        x32 = x.float().requires_grad_()
        expected = plain_rotary(x32, cos, sin, interleaved, offsets)
        grad = torch.randn_like(expected)
        (expected_dx,) = torch.autograd.grad(expected, x32, grad)
        leaf = x.float().to(dev).requires_grad_()
        cos_d, sin_d, offsets_d = _on(dev, cos, sin, offsets)
        out = apply_rotary(leaf, cos_d, sin_d, interleaved=interleaved, seqlen_offsets=offsets_d)
        (dx,) = torch.autograd.grad(out, leaf, grad.to(dev))
        assert attnkit.last_dispatch(OP).backend == backend
        torch.testing.assert_close(out.cpu(), expected, atol=TOL[torch.float32], rtol=TOL[torch.float32])
        torch.testing.assert_close(dx.cpu(), expected_dx, atol=TOL[torch.float32], rtol=TOL[torch.float32])
        if x.shape[-1] > 2 * cos.shape[-1]:  # the pass-through dims are copied exactly
            assert torch.equal(out[..., 2 * cos.shape[-1]:].cpu(), x32[..., 2 * cos.shape[-1]:].detach())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("table_dtype", ["same", torch.float32], ids=str)
def test_half_precision_matches_reference(backend, device, dtype, table_dtype):
    with forced(OP, backend, device, dtype) as dev:
        x, cos, sin, interleaved, offsets = case_inputs(CASES[3], dtype, dev)
        table_dtype = dtype if table_dtype == "same" else table_dtype
        cos, sin, offsets = _on(dev, cos.to(table_dtype), sin.to(table_dtype), offsets)
        out = apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
        expected = ref.rotary(x.cpu().double(), cos.cpu(), sin.cpu(), offsets.cpu(), 0, interleaved)
        assert out.dtype == dtype
        torch.testing.assert_close(out.cpu().double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(backend, device, interleaved):
    with forced(OP, backend, device, torch.float64) as dev:
        x = torch.randn(2, 3, 2, 6, dtype=torch.float64, device=dev, requires_grad=True)
        cos, sin = tables(5, 4, torch.float64, dev)
        offsets = torch.tensor([0, 2], dtype=torch.int32, device=dev)
        fn = lambda x: apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)  # few launches: the interpreter is slow
        if backend == "reference":  # the backward is the op again, so double backward works too
            assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_gradients_flow_to_cos_and_sin(backend, device, interleaved):
    with forced(OP, backend, device, torch.float64) as dev:
        x = torch.randn(2, 3, 2, 6, dtype=torch.float64, device=dev, requires_grad=True)
        cos, sin = (t.requires_grad_() for t in tables(5, 4, torch.float64, dev))
        offsets = torch.tensor([0, 3], dtype=torch.int32, device=dev)  # the last row of sequence 1 is past cos
        fn = lambda x, c, s: apply_rotary(x, c, s, interleaved=interleaved, seqlen_offsets=offsets)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, cos, sin), fast_mode=True)
        per_sequence = [t.detach()[None].repeat(2, 1, 1).requires_grad_() for t in (cos, sin)]
        assert torch.autograd.gradcheck(lambda x, c, s: apply_rotary(x, c, s, interleaved=interleaved),
                                        (x, *per_sequence), fast_mode=True)
        # Against autograd through the plain rotation, in float32 with int offsets.
        x32, cos32, sin32 = (t.detach().float().cpu().requires_grad_() for t in (x, cos, sin))
        grad = torch.randn(2, 3, 2, 6)
        expected = torch.autograd.grad(plain_rotary(x32, cos32, sin32, interleaved, 1), (x32, cos32, sin32), grad)
        leaves = [t.detach().to(dev).requires_grad_() for t in (x32, cos32, sin32)]
        out = apply_rotary(*leaves, interleaved=interleaved, seqlen_offsets=1)
        for got, want in zip(torch.autograd.grad(out, leaves, grad.to(dev)), expected):
            torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_inplace_mutates_x_and_keeps_gradients(backend, device, layout):
    with forced(OP, backend, device) as dev:
        x, cos, sin, interleaved, offsets = case_inputs(CASES[3], torch.float32, dev)
        cos, sin, offsets = _on(dev, cos, sin, offsets)
        if layout == "bhnd":
            x = x.transpose(1, 2).contiguous()
        expected = apply_rotary(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, layout=layout)
        leaf = x.clone().requires_grad_()
        y = leaf * 1  # in place needs a non-leaf
        out = apply_rotary(y, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, inplace=True, layout=layout)
        assert out is y
        torch.testing.assert_close(y, expected, atol=0, rtol=0)
        grad = torch.randn_like(y)
        out.backward(grad)
        leaf2 = x.clone().requires_grad_()
        apply_rotary(leaf2, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, layout=layout).backward(grad)
        torch.testing.assert_close(leaf.grad, leaf2.grad, atol=0, rtol=0)
        with torch.no_grad():
            z = x.clone()
            apply_rotary(z, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, inplace=True, layout=layout)
        torch.testing.assert_close(z, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_head_dim_and_broadcast_gradient(backend, device, interleaved):
    # A head dim with a stride (every other element) and out.sum()'s broadcast (stride 0) gradient.
    with forced(OP, backend, device) as dev:
        base = torch.randn(2, 5, 3, 64, device=dev)
        x = base[..., ::2].requires_grad_()
        cos, sin = tables(8, 24, device=dev)
        out = apply_rotary(x, cos, sin, interleaved=interleaved)
        x_ref = x.detach().cpu().requires_grad_()
        expected = plain_rotary(x_ref, cos.cpu(), sin.cpu(), interleaved)
        torch.testing.assert_close(out.cpu(), expected.detach())
        (grad,) = torch.autograd.grad(out.sum(), x)
        (grad_ref,) = torch.autograd.grad(expected.sum(), x_ref)
        torch.testing.assert_close(grad.cpu(), grad_ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layouts_strides_and_per_sequence_tables(backend, device):
    with forced(OP, backend, device) as dev:
        qkv = torch.randn(2, 6, 3, 4, 32, device=dev)  # (B, N, 3, H, D): q is a strided view
        q = qkv[:, :, 0]
        cos, sin = tables(10, 32, device=dev)
        expected = plain_rotary(q.cpu(), cos.cpu(), sin.cpu(), False, 3)
        torch.testing.assert_close(apply_rotary(q, cos, sin, seqlen_offsets=3).cpu(), expected)
        sdpa = apply_rotary(q.transpose(1, 2), cos, sin, seqlen_offsets=3, layout="bhnd")
        assert sdpa.shape == (2, 4, 6, 32)
        torch.testing.assert_close(sdpa.transpose(1, 2).cpu(), expected)
        # Arbitrary position ids: one table per sequence (B, N, R/2), as RotaryEmbedding passes them.
        positions = torch.tensor([[5, 1, 0, 9, 9, 2], [0, 1, 2, 3, 4, 5]], device=dev)
        out = apply_rotary(q, cos[positions], sin[positions])
        expected = torch.cat([plain_rotary(q[b:b + 1, i:i + 1].cpu(), cos.cpu(), sin.cpu(), False, int(positions[b, i]))
                              for b in range(2) for i in range(6)]).view(2, 6, 4, 32)
        torch.testing.assert_close(out.cpu(), expected)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_positions_past_the_table_are_left_unrotated(backend, device):
    # As FlashAttention: per-sequence offsets are not checked (a sync); rows past cos stay as they are.
    with forced(OP, backend, device) as dev:
        x = torch.randn(2, 4, 2, 8, device=dev)
        cos, sin = tables(5, 8, device=dev)
        out = apply_rotary(x, cos, sin, seqlen_offsets=torch.tensor([0, 3], dtype=torch.int32, device=dev))
        torch.testing.assert_close(out[1, 2:], x[1, 2:], atol=0, rtol=0)
        torch.testing.assert_close(out[1, :2].cpu(), plain_rotary(x[1:, :2].cpu(), cos.cpu(), sin.cpu(), False, 3)[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("interleaved,per_sequence", [(False, False), (True, True)])
def test_varlen_matches_each_sequence(backend, device, interleaved, per_sequence):
    with forced(OP, backend, device) as dev:
        lengths = [3, 0, 5]
        cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=dev)
        x = torch.randn(8, 2, 12, device=dev)
        cos, sin = tables(9, 8, device=dev)
        offsets = torch.tensor([4, 1, 2], dtype=torch.int32, device=dev)
        if per_sequence:  # one table per sequence, no offsets
            cos, sin = (t[None].repeat(3, 1, 1) for t in (cos, sin))
            offsets = 0
        leaf = x.clone().requires_grad_()
        out = apply_rotary(leaf, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=5)
        grad = torch.randn_like(x)
        (dx,) = torch.autograd.grad(out, leaf, grad)
        start = 0
        for b, n in enumerate(lengths):
            seq = slice(start, start + n)
            shift = offsets[b:b + 1].cpu() if isinstance(offsets, torch.Tensor) else 0
            table = (cos[b], sin[b]) if per_sequence else (cos, sin)
            x_b = x[seq][None].cpu().requires_grad_()
            want = plain_rotary(x_b, *(t.cpu() for t in table), interleaved, shift)
            (want_dx,) = torch.autograd.grad(want, x_b, grad[seq][None].cpu())
            torch.testing.assert_close(out[seq].cpu(), want[0])
            torch.testing.assert_close(dx[seq].cpu(), want_dx[0])
            start += n
        y = x.clone()
        apply_rotary(y, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=5,
                     inplace=True)
        torch.testing.assert_close(y, out.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_varlen_gradcheck_with_table_gradients(backend, device):
    with forced(OP, backend, device, torch.float64) as dev:
        x = torch.randn(5, 1, 4, dtype=torch.float64, device=dev, requires_grad=True)
        cos, sin = (t.requires_grad_() for t in tables(4, 4, torch.float64, dev))
        cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=dev)
        offsets = torch.tensor([2, 1], dtype=torch.int64, device=dev)  # sequence 0's second row is past cos
        fn = lambda x, c, s: apply_rotary(x, c, s, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=3)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, cos, sin), fast_mode=True)


@pytest.mark.gpu
def test_compiles_with_inductor_on_the_triton_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.randn(2, 64, 4, 64, device="cuda", requires_grad=True)
    cos, sin = tables(80, 48, device="cuda")
    fn = torch.compile(lambda x: apply_rotary(x, cos, sin, seqlen_offsets=5, interleaved=True) * 2, fullgraph=True)
    with attnkit.use_backend("triton", op=OP):
        out = fn(x)
        out.sum().backward()
    assert attnkit.last_dispatch(OP).backend == "triton"
    torch.testing.assert_close(out.cpu(), 2 * plain_rotary(x.detach().cpu(), cos.cpu(), sin.cpu(), True, 5))
    torch.testing.assert_close(x.grad.cpu(), 2 * plain_rotary(torch.ones(2, 64, 4, 64), cos.cpu(), -sin.cpu(), True, 5))


def test_compiles_without_graph_breaks():
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    cos, sin = tables(8, 16)
    fn = torch.compile(lambda x: apply_rotary(x, cos, sin, seqlen_offsets=2) * 2, fullgraph=True, backend="aot_eager")
    with attnkit.use_backend("reference", op=OP):
        out = fn(x)
        out.sum().backward()
    torch.testing.assert_close(out, 2 * plain_rotary(x.detach(), cos, sin, False, 2))
    torch.testing.assert_close(x.grad, 2 * plain_rotary(torch.ones_like(x), cos, -sin, False, 2))


def test_custom_ops_pass_opcheck():
    from attnkit.ops import rotary as module

    x = torch.randn(2, 3, 2, 8, requires_grad=True)
    cos, sin = tables(4, 6)
    offsets = torch.tensor([0, 1], dtype=torch.int32)
    with attnkit.use_backend("reference", op=OP):
        torch.library.opcheck(module._rotary, (x, cos, sin, offsets, 0, True, False, None, 0))
        torch.library.opcheck(module._rotary_, (x.detach().clone(), cos, sin, None, 1, False, None, 0))
        packed, cu = torch.randn(5, 2, 8, requires_grad=True), torch.tensor([0, 2, 5], dtype=torch.int32)
        torch.library.opcheck(module._rotary, (packed, cos, sin, offsets, 0, False, False, cu, 3))


def test_explain_names_the_backend():
    cos, sin = tables(4, 8)
    decision = attnkit.explain(OP, torch.randn(1, 4, 2, 8), cos, sin, interleaved=True)
    assert decision.backend in ("cpp", "reference", "triton")


def _bad(**overrides):
    args = dict(x=torch.randn(2, 4, 3, 16), cos=torch.randn(6, 4), sin=torch.randn(6, 4))
    args.update(overrides)
    x, cos, sin = args.pop("x"), args.pop("cos"), args.pop("sin")
    return lambda: apply_rotary(x, cos, sin, **args)


BAD_INPUT = [
    ("cos wrong shape", _bad(cos=torch.randn(6, 4, 1)), ValueError, "cos must have shape"),
    ("sin shape differs", _bad(sin=torch.randn(6, 3)), ValueError, "sin must match cos"),
    ("cos 1-D", _bad(cos=torch.randn(6), sin=torch.randn(6)), ValueError, "cos must have shape"),
    ("cos per-sequence wrong batch", _bad(cos=torch.randn(3, 6, 4), sin=torch.randn(3, 6, 4)), ValueError, "B = 2"),
    ("cos int dtype", _bad(cos=torch.ones(6, 4, dtype=torch.int64)), TypeError, "cos has dtype"),
    ("cos float64 for float32 x", _bad(cos=torch.randn(6, 4, dtype=torch.float64),
                                       sin=torch.randn(6, 4, dtype=torch.float64)), TypeError, "cos has dtype"),
    ("rotary dim > head dim", _bad(cos=torch.randn(6, 9), sin=torch.randn(6, 9)), ValueError, "rotary_dim"),
    ("rotary dim 0", _bad(cos=torch.randn(6, 0), sin=torch.randn(6, 0)), ValueError, "rotary_dim"),
    ("table too short", _bad(cos=torch.randn(3, 4), sin=torch.randn(3, 4)), ValueError, "seqlen_offsets"),
    ("offset past the table", _bad(seqlen_offsets=3), ValueError, "seqlen_offsets"),
    ("negative offset", _bad(seqlen_offsets=-1), ValueError, "seqlen_offsets"),
    ("offsets wrong shape", _bad(seqlen_offsets=torch.zeros(3, dtype=torch.int32)), ValueError, "seqlen_offsets"),
    ("offsets float", _bad(seqlen_offsets=torch.zeros(2)), TypeError, "seqlen_offsets"),
    ("offsets float scalar", _bad(seqlen_offsets=1.0), TypeError, "seqlen_offsets"),
    ("x 3-D", _bad(x=torch.randn(4, 3, 16)), ValueError, "x must be 4-D"),
    ("x int", _bad(x=torch.ones(2, 4, 3, 16, dtype=torch.int32)), TypeError, "x has dtype"),
    ("bad layout", _bad(layout="nbhd"), ValueError, "layout"),
    ("inplace not bool", _bad(inplace=1), TypeError, "inplace"),
    ("cu_seqlens int64", _bad(x=torch.randn(5, 3, 16), cu_seqlens=torch.tensor([0, 5]), max_seqlen=5), TypeError,
     "cu_seqlens has dtype"),
    ("cu_seqlens not ending at total", _bad(x=torch.randn(5, 3, 16), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
                                            max_seqlen=5), ValueError, "cu_seqlens must rise"),
    ("max_seqlen too small", _bad(x=torch.randn(5, 3, 16), cu_seqlens=torch.tensor([0, 1, 5], dtype=torch.int32),
                                  max_seqlen=3), ValueError, "max_seqlen = 3"),
    ("max_seqlen missing", _bad(x=torch.randn(5, 3, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32)),
     TypeError, "max_seqlen"),
    ("max_seqlen without cu_seqlens", _bad(max_seqlen=4), ValueError, "max_seqlen goes with cu_seqlens"),
    ("packed x with bhnd layout", _bad(x=torch.randn(5, 3, 16), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                                       max_seqlen=5, layout="bhnd"), ValueError, "layout"),
    ("packed x 4-D", _bad(cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), max_seqlen=4), ValueError,
     "x must be 3-D"),
    ("cos requires grad in place", _bad(cos=torch.randn(6, 4, requires_grad=True), inplace=True), NotImplementedError,
     "cos"),
]


@pytest.mark.parametrize("make,error,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUT])
def test_bad_input_names_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_cpp_entry_point_refuses_an_out_that_overlaps_x():
    """rotary_apply read and wrote rows in one pass: an out sharing part of x's memory, or an
    expanded out, silently got wrong values."""
    ext, reason = attnkit._extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    storage = torch.randn(2 * 4 * 2 * 8 + 8)
    x = storage[: 2 * 4 * 2 * 8].view(2, 4, 2, 8)
    cos, sin = torch.randn(4, 4), torch.randn(4, 4)
    offsets = torch.zeros(2, dtype=torch.int32)
    for out in (storage[8:].view(2, 4, 2, 8), torch.empty(1, 1, 1, 8).expand(2, 4, 2, 8)):
        with pytest.raises(RuntimeError, match="out must be x itself or not overlap it"):
            ext.rotary_apply(x, cos, sin, offsets, 0, False, False, out, None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_packed_cu_seqlens_may_be_a_strided_view(backend, device, inplace):
    """Triton read a strided cu_seqlens as contiguous; in place it corrupted the heap."""
    with forced(OP, backend, device) as dev:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(7, 2, 8, generator=gen).to(dev)
        cos, sin = (torch.randn(6, 4, generator=gen).to(dev) for _ in range(2))
        table = torch.tensor([[0, 9], [3, 9], [3, 9], [7, 9]], dtype=torch.int32, device=dev)
        want = apply_rotary(x, cos, sin, cu_seqlens=table[:, 0].contiguous(), max_seqlen=4)
        got = apply_rotary(x.clone(), cos, sin, cu_seqlens=table[:, 0], max_seqlen=4, inplace=inplace)
        torch.testing.assert_close(got, want)
