"""attnkit.ops.attention_decode (split-K decoding against a KV cache) on every
backend against the float64 reference, and against flash_attention on a full cache."""
import pytest
import torch
from attention_cases import assert_close
from helpers import ATTENTION_TOL, backend_params, forced, num_threads

import attnkit
from attnkit.ops import attention_decode, flash_attention
from attnkit.reference import attention as ref

OP = "attention_decode"
BACKENDS = backend_params(OP)

CASES = [  # (B, H, H_kv, Nq, N_max, D, lengths, options)
    (1, 1, 1, 1, 1, 16, [1], {}),
    (3, 4, 2, 1, 40, 16, [40, 17, 1], {}),
    (2, 8, 1, 1, 70, 64, [0, 70], dict(softcap=3.0)),  # MQA, an empty cache
    (3, 4, 2, 3, 33, 80, [33, 2, 9], dict(window_left=4)),  # 3 new tokens, one cache shorter than them
    (2, 4, 4, 2, 50, 32, [50, 23], dict(alibi=True, scale=0.3)),
    (2, 8, 2, 1, 300, 80, [300, 129], dict(alibi=True, softcap=5.0, window_left=100)),  # GQA 4, D = 80
    (1, 12, 12, 4, 20, 20, [3], dict(window_left=0)),  # each new token sees only itself; one row sees none
    # Past the CPU kernel's 256-key passes; D with a tail of 8 (72), Dv != D, lengths not
    # multiples of its 4-key blocks, rows whose windows start and end in different passes.
    (2, 4, 2, 3, 600, 72, [600, 259], dict(dv=40)),
    (1, 4, 1, 5, 530, 40, [527], dict(window_left=300, softcap=4.0)),
]


def make(case, dtype, device):
    batch, heads, heads_kv, n_q, n_max, dim, lengths, options = case
    gen = torch.Generator().manual_seed(batch * 100 + n_max)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)  # noqa: E731
    dim_v = options.get("dv", dim)
    q, k, v = rand(batch, heads, n_q, dim), rand(batch, heads_kv, n_max, dim), rand(batch, heads_kv, n_max, dim_v)
    kwargs = {key: value for key, value in options.items() if key not in ("alibi", "dv")}
    if options.get("alibi"):
        kwargs["alibi_slopes"] = torch.rand(heads, generator=gen).to(device)
    return q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device), kwargs


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}/{c[2]}-q{c[3]}-N{c[4]}-D{c[5]}-{c[6]}-{c[7]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(backend, device, case, dtype):
    with forced(OP, backend, device, dtype, alibi=bool(case[7].get("alibi"))) as dev:
        q, k, v, lengths, kwargs = make(case, dtype, dev)
        out, lse = attention_decode(q, k, v, lengths, **kwargs, return_lse=True)
        assert attnkit.last_dispatch(OP).backend == backend
    slopes = kwargs.get("alibi_slopes")
    options = dict(kwargs, alibi_slopes=None if slopes is None else slopes.expand(q.shape[0], -1))
    out_t, lse_t = ref.decode(q.double(), k.double(), v.double(), lengths, **options)
    tol = ATTENTION_TOL[dtype]
    assert_close(out, out_t, tol, "out")
    assert_close(lse, lse_t, tol, "lse")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_full_cache_equals_causal_flash_attention(backend, device):
    with forced(OP, backend, device) as dev:
        q, k, v = torch.randn(2, 4, 3, 32, device=dev), torch.randn(2, 2, 45, 32, device=dev), torch.randn(2, 2, 45, 32, device=dev)
        out = attention_decode(q, k, v, torch.full((2,), 45, dtype=torch.int32, device=dev))
    assert_close(out, flash_attention(q, k, v, causal=True), 1e-4, "out")


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: (a[0][0],) + a[1:], ValueError, "q must be 4-D"),
        (lambda a: a[:3] + (a[3].long(),), TypeError, "cache_seqlens has dtype int64"),
        (lambda a: a[:3] + (torch.tensor([5, 41], dtype=torch.int32),), ValueError, r"cache_seqlens must be within \[0, 40\]"),
        (lambda a: a[:3] + (torch.tensor([5], dtype=torch.int32),), ValueError, r"cache_seqlens must be \(2,\) int32"),
        (lambda a: (a[0], a[1][:, :, :30]) + a[2:], ValueError, "k_cache and v_cache must have the same length"),
        (lambda a: (a[0][:, :3],) + a[1:], ValueError, "must be a multiple of k_cache/v_cache heads"),
        (lambda a: (a[0].requires_grad_(True),) + a[1:], NotImplementedError, "inference-only"),
    ],
)
def test_errors(mutate, error, match):
    args = (torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16), torch.tensor([5, 40], dtype=torch.int32))
    with pytest.raises(error, match=match):
        attention_decode(*mutate(args))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("triton", "reference")])
def test_lengths_outside_the_cache_count_as_its_bounds(backend, device):
    """On a GPU attention_decode does not read cache_seqlens on the host (a sync per layer
    and token): the Triton kernel and the reference take a length above N_max as N_max and
    a negative one as 0, never reading past the cache. Called below the op's CPU check."""
    from attnkit.backends.decode import DECODE

    with forced(OP, backend, device) as dev:
        q, k, v = torch.randn(3, 4, 2, 16, device=dev), torch.randn(3, 2, 40, 16, device=dev), torch.randn(3, 2, 40, 16, device=dev)
        bad = torch.tensor([41, -3, 1000], dtype=torch.int32, device=dev)
        out, lse = DECODE.implementations[backend].forward(q, k, v, bad, 0.25, 0.0, -1, None)
        clamped = bad.clamp(0, 40)
    out_t, lse_t = ref.decode(q.double(), k.double(), v.double(), clamped, scale=0.25)
    assert_close(out, out_t, 1e-4, "out")
    assert_close(lse, lse_t, 1e-4, "lse")
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()


@pytest.mark.gpu
def test_cuda_lengths_are_not_read_on_the_host():
    """No host sync for CUDA cache_seqlens: an out-of-range length passes the op's checks
    (and is taken as the nearest bound by the kernel) instead of raising."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    q = torch.randn(2, 4, 1, 16, device="cuda")
    k, v = torch.randn(2, 2, 40, 16, device="cuda"), torch.randn(2, 2, 40, 16, device="cuda")
    out = attention_decode(q, k, v, torch.tensor([5, 41], dtype=torch.int32, device="cuda"))
    full = attention_decode(q, k, v, torch.tensor([5, 40], dtype=torch.int32, device="cuda"))
    assert_close(out, full, 0.0, "out")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_an_empty_batch_gives_empty_outputs(backend, device):
    """Batch 0: empty outputs of the right shapes, as flash_attention gives (the CPU length
    check took min() of no lengths, and the reference concatenated no sequences)."""
    with forced(OP, backend, device) as dev:
        q, k, v = torch.randn(0, 4, 2, 16, device=dev), torch.randn(0, 2, 9, 16, device=dev), torch.randn(0, 2, 9, 8, device=dev)
        out, lse = attention_decode(q, k, v, torch.zeros(0, dtype=torch.int32, device=dev), return_lse=True)
    assert out.shape == (0, 4, 2, 8) and out.dtype == q.dtype
    assert lse.shape == (0, 4, 2) and lse.dtype == torch.float32


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_query_rows_give_empty_outputs(backend, device):
    """Nq = 0: empty outputs (the Triton launch divided by the row count and read the empty q:
    a segfault under the interpreter, out of bounds on a GPU)."""
    with forced(OP, backend, device) as dev:
        q, k, v = torch.randn(2, 4, 0, 16, device=dev), torch.randn(2, 2, 9, 16, device=dev), torch.randn(2, 2, 9, 8, device=dev)
        out, lse = attention_decode(q, k, v, torch.tensor([3, 9], dtype=torch.int32, device=dev), return_lse=True)
    assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)


def test_window_left_errors_name_it():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="attention_decode: window_left must be an int >= -1"):
        attention_decode(q, k, k, torch.tensor([5], dtype=torch.int32), window_left=-2)


def test_cpp_entry_point_checks_its_scalars():
    """attention_decode_forward took window_left=-5, a NaN softcap and an infinite scale, which
    attention_forward refuses; the op checks them in Python, a direct call now gets the same."""
    ext, reason = attnkit._extensions.load("_C")
    if ext is None:
        pytest.skip(reason)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    lengths = torch.tensor([4], dtype=torch.int32)
    ext.attention_decode_forward(q, k, k, lengths, 0.3, 0.0, -1, None)
    for scale, softcap, window, match in ((float("inf"), 0.0, -1, "scale"), (0.3, float("nan"), -1, "softcap"),
                                          (0.3, -1.0, -1, "softcap"), (0.3, 0.0, -5, "window_left")):
        with pytest.raises(RuntimeError, match=match):
            ext.attention_decode_forward(q, k, k, lengths, scale, softcap, window, None)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_leaves_the_kernel_in_its_inputs_dtype(backend, device):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen).to(device)
    k, v = (torch.randn(2, 2, 40, 16, generator=gen).to(device) for _ in range(2))
    lengths = torch.tensor([7, 40], dtype=torch.int32, device=device)
    with forced(OP, backend, device):
        plain = attention_decode(q, k, v, lengths)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            under_autocast = attention_decode(q, k, v, lengths)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_rows_split_over_threads_give_the_same_result(threads):
    """With fewer (sequence, KV head) pairs than threads (MQA at batch 1) the cpp kernel splits
    a pair's query rows over tasks: each row is computed as it is unsplit, bit for bit."""
    if "cpp" not in attnkit.available_backends() or not attnkit.available_backends()["cpp"].available:
        pytest.skip("attnkit._C is not built")
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 7, 3, 24, generator=gen), torch.randn(1, 1, 90, 24, generator=gen), torch.randn(1, 1, 90, 16, generator=gen)
    lengths = torch.tensor([77], dtype=torch.int32)
    with attnkit.use_backend("cpp", op=OP):
        with num_threads(1):
            whole = attention_decode(q, k, v, lengths, softcap=2.0, window_left=30)
        with num_threads(threads):
            split = attention_decode(q, k, v, lengths, softcap=2.0, window_left=30)
    assert torch.equal(split, whole)
    out_t, _ = ref.decode(q.double(), k.double(), v.double(), lengths, softcap=2.0, window_left=30)
    assert_close(split, out_t, ATTENTION_TOL[torch.float32], "out")
