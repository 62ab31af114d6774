"""Bad input to the attention ops: a clear error naming the argument, before any kernel runs."""
import pytest
import torch

import attnkit
from attnkit.ops import flash_attention, flash_attention_varlen


def qkv(b=2, h=4, h_kv=2, n_q=5, n_k=7, d=16, dv=16, dtype=torch.float32):
    return torch.randn(b, h, n_q, d, dtype=dtype), torch.randn(b, h_kv, n_k, d, dtype=dtype), torch.randn(b, h_kv, n_k, dv, dtype=dtype)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q has dtype int64"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k has dtype torch.float64 but q has torch.float32"),
        (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "same batch size"),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, "same head dim"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "k and v must have the same sequence length"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, r"q heads \(3\) must be a multiple of k/v heads \(2\)"),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, "k and v must have the same number of heads"),
        (lambda q, k, v: (torch.randn(1, 1, 2, 300),) * 3, NotImplementedError, "head dim of q/k must be between 1 and 256"),
        (lambda q, k, v: (q, k, v.to("meta")), RuntimeError, "v is on meta but q is on cpu"),
    ],
)
def test_tensor_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*mutate(*qkv()))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(attn_mask=torch.ones(3, 7, dtype=torch.bool)), ValueError, r"attn_mask of shape \(3, 7\) cannot broadcast to \(B, H, Nq, Nk\) = \(2, 4, 5, 7\)"),
        (dict(attn_mask=torch.ones(1, 1, 1, 2, 5, 7)), ValueError, "cannot broadcast"),
        (dict(attn_mask=torch.ones(5, 7, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, Nk\) = \(2, 7\)"),
        (dict(key_padding_mask=torch.zeros(2, 7)), TypeError, "key_padding_mask has dtype float32"),
        (dict(window_size=(2,)), TypeError, "window_size must be a pair"),
        (dict(window_size=(-2, 0)), ValueError, "window_size left must be an int >= -1"),
        (dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0"),
        (dict(softcap=float("inf")), ValueError, "softcap must be finite and >= 0"),
        (dict(softcap=float("nan")), ValueError, "softcap must be finite and >= 0"),
        (dict(dropout_p=0.5, generator="cpu"), TypeError, "flash_attention: generator must be a torch.Generator"),
        (dict(rotary_cos=torch.ones(8, 8), rotary_sin=torch.zeros(8, 8), rotary_seqlen_offsets=2**31), ValueError,
         "rotary_seqlen_offsets must fit in int32"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(scale="x"), TypeError, "scale must be a float"),
        (dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
        (dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(causal_alignment="left"), ValueError, "causal_alignment must be one of"),
        (dict(alibi_slopes=torch.rand(3)), ValueError, r"alibi_slopes must have shape \(H,\) = \(4,\) or \(B, H\)"),
        (dict(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, "alibi_slopes has dtype float64"),
        (dict(alibi_slopes=torch.rand(4, requires_grad=True)), NotImplementedError, "alibi_slopes"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*qkv(), **kwargs)


def packed():
    q, k, v = torch.randn(10, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    return q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: a[:3] + (a[3].long(), a[4], 6, 7), TypeError, "cu_seqlens_q has dtype int64"),
        (lambda a: a[:3] + (torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 6, 12], dtype=torch.int32), 6, 7), ValueError, "cu_seqlens_q must be non-decreasing"),
        (lambda a: a[:3] + (torch.tensor([0, 4, 9], dtype=torch.int32), a[4], 6, 7), ValueError, "must start at 0 and end at the packed length 10"),
        (lambda a: a[:3] + (torch.tensor([1, 4, 10], dtype=torch.int32), a[4], 6, 7), ValueError, "must start at 0"),
        (lambda a: a + (5, 7), ValueError, r"max_seqlen_q = 5 is smaller than the longest sequence \(6\)"),
        # Both tensors' values come back in one transfer: each is still checked, and named.
        (lambda a: a[:4] + (torch.tensor([0, 5, 11], dtype=torch.int32), 6, 7), ValueError,
         "cu_seqlens_k must start at 0 and end at the packed length 12"),
        (lambda a: a + (6, 6), ValueError, r"max_seqlen_k = 6 is smaller than the longest sequence \(7\)"),
        (lambda a: a + (6, 7.0), TypeError, "max_seqlen_k must be a non-negative int"),
        (lambda a: a[:3] + (a[3], torch.tensor([0, 12], dtype=torch.int32), 6, 12), ValueError, "same batch"),
        (lambda a: (a[0][None],) + a[1:] + (6, 7), ValueError, "q must be 3-D"),
    ],
)
def test_varlen_errors(mutate, error, match):
    with pytest.raises(error, match=match):
        flash_attention_varlen(*mutate(packed()))


def test_sdpa_dropin_errors():
    q, k, v = qkv(h_kv=4)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        attnkit.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        attnkit.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match=r"query must have at least 2 dims \(\.\.\., L, E\), got shape \(16,\)"):
        attnkit.scaled_dot_product_attention(q[0, 0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="leading .batch. dims of query .* do not broadcast"):
        attnkit.scaled_dot_product_attention(q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1),
                                             enable_gqa=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 5, 7\) cannot broadcast to the scores' shape"):
        attnkit.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 5, 7, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):  # 1.0 is SDPA's zeros
        attnkit.scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)


def tables(positions=16, half=4, dtype=torch.float32):
    return torch.rand(positions, half, dtype=dtype), torch.rand(positions, half, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rotary_cos=tables()[0]), ValueError, "pass both rotary_cos and rotary_sin"),
        (dict(rotary_cos=torch.rand(16), rotary_sin=torch.rand(16)), ValueError, "rotary_cos must be 2-D"),
        (dict(rotary_cos=tables(half=9)[0], rotary_sin=tables(half=9)[1]), ValueError, "rotary_dim = 18, which must be between 2 and the head dim 16"),
        (dict(rotary_cos=tables()[0], rotary_sin=tables(half=3)[1]), ValueError, "rotary_cos and rotary_sin must match"),
        (dict(rotary_cos=torch.ones(16, 4, dtype=torch.int32), rotary_sin=tables()[1]), TypeError, "rotary_cos has dtype int32"),
        (dict(rotary_cos=tables(positions=6)[0], rotary_sin=tables(positions=6)[1]), ValueError, "cover 6 positions but sequence 0 reaches position 6"),
        (dict(rotary_cos=tables()[0], rotary_sin=tables()[1], rotary_seqlen_offsets=torch.zeros(3, dtype=torch.int32)), ValueError, r"rotary_seqlen_offsets must be \(2,\) int32"),
        (dict(rotary_cos=tables()[0], rotary_sin=tables()[1], rotary_seqlen_offsets=1.5), TypeError, "rotary_seqlen_offsets must be an int"),
        (dict(rotary_cos=tables()[0].requires_grad_(True), rotary_sin=tables()[1]), NotImplementedError, "rotary_cos"),
    ],
)
def test_rotary_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*qkv(), **kwargs)


def test_rotary_needs_non_negative_positions():
    cos, sin = tables()
    with pytest.raises(ValueError, match="non-negative positions"):
        flash_attention(*qkv(n_q=7, n_k=5), rotary_cos=cos, rotary_sin=sin)


def test_triton_config_env_picks_a_fixed_config_or_names_what_is_wrong(monkeypatch):
    """ATTNKIT_TRITON_CONFIG (set by the GPU suite) replaces autotuning by one
    candidate; a bad value is an error naming the variable, not a silent autotune."""
    launch = pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter always takes its own small blocks
    count = launch.config_count(128, torch.bfloat16)
    tma = launch._tma_device()  # an sm_90 GPU adds the forward's TMA candidates
    # The forward's list is the longest: the others' entries, then its LOOK_AHEAD ones.
    assert count == len(launch._configs(128, 2, tma=tma, look_ahead=True)) > len(launch._configs(128, 2, tma=tma)) > 1
    for index in (0, count - 1):
        monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(index))
        kernel, options = launch._kernel(launch._attn_fwd, 128, 2, tma=tma)
        config = launch._configs(128, 2, tma=tma, look_ahead=True)[index]
        assert kernel is launch._attn_fwd  # the plain kernel, not an Autotuner
        assert options == dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    # The dK/dV kernel has its own list, shorter: past its end it keeps its last entry.
    dkdv_configs = launch._configs(128, 2, dkdv=True)
    key = lambda c: (sorted(c.kwargs.items()), c.num_warps, c.num_stages)  # noqa: E731  (no Config == before 3.3)
    assert list(map(key, dkdv_configs)) != list(map(key, launch._configs(128, 2))) and len(dkdv_configs) <= count
    for index, expected in ((0, dkdv_configs[0]), (count - 1, dkdv_configs[-1])):
        monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(index))
        kernel, options = launch._kernel(launch._attn_bwd_dkdv, 128, 2)
        assert options == dict(expected.kwargs, num_warps=expected.num_warps, num_stages=expected.num_stages)
    monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(count))
    with pytest.raises(ValueError, match=f"ATTNKIT_TRITON_CONFIG={count}: only {count} configs"):
        launch._kernel(launch._attn_fwd, 128, 2)
    monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", "fast")
    with pytest.raises(ValueError, match="ATTNKIT_TRITON_CONFIG must be a config index"):
        launch._kernel(launch._attn_fwd, 128, 2)
    monkeypatch.delenv("ATTNKIT_TRITON_CONFIG")
    try:
        kernel, options = launch._kernel(launch._attn_fwd, 128, 2)
    except RuntimeError as error:  # triton 3.2's Autotuner asks for the GPU driver when built
        if "active drivers" not in str(error) or torch.cuda.is_available():
            raise
        pytest.skip(f"the autotuned kernel: this Triton builds no Autotuner without a GPU ({error})")
    assert options == {} and kernel is not launch._attn_fwd  # autotuned


def test_fixed_config_indices_reach_the_tma_candidates(monkeypatch):
    """Where TMA can run, the GPU suite's per-index sweep covers the forward's TMA
    candidates; the other kernels (and forwards without descriptors) keep their last config."""
    launch = pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")
    if launch.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plain, with_tma = launch._configs(128, 2), launch._configs(128, 2, tma=True)
    assert len(with_tma) > len(plain) and all("USE_TMA" not in c.kwargs for c in plain)
    with launch.tma_forced():
        count = launch.config_count(128, torch.bfloat16)
        assert count == len(launch._configs(128, 2, tma=True, look_ahead=True)) > len(with_tma)
        monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", str(count - 1))
        _, options = launch._kernel(launch._attn_fwd, 128, 2, tma=True)
        assert options["USE_TMA"] is True
        _, options = launch._kernel(launch._attn_fwd, 128, 2)  # no descriptors for this call
        last_plain = launch._configs(128, 2, look_ahead=True)[-1]
        assert "USE_TMA" not in options and options == dict(last_plain.kwargs, num_warps=last_plain.num_warps,
                                                            num_stages=last_plain.num_stages)
        _, options = launch._kernel(launch._attn_bwd_dq, 128, 2)
        assert "USE_TMA" not in options
    assert launch.config_count(128, torch.float32) == len(launch._configs(128, 4))  # no TMA for 4-byte types


def test_last_tuned_configs_names_each_kernels_winner(monkeypatch):
    """The attention benchmark notes which autotune candidate won at each shape."""
    launch = pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")
    triton = pytest.importorskip("triton")

    class Tuned:  # what the benchmark reads off triton's Autotuner
        def __init__(self, config):
            self.best_config = config

    fwd = triton.Config(dict(BLOCK_M=128, BLOCK_N=64), num_warps=8, num_stages=2)
    dkdv = triton.Config(dict(BLOCK_M=32, BLOCK_N=128), num_warps=8, num_stages=3)
    dq = triton.Config(dict(BLOCK_M=64, BLOCK_N=64, USE_TMA=True), num_warps=4, num_stages=2)
    tuned = {(launch._attn_fwd, False, False, False, False): Tuned(fwd),
             (launch._attn_bwd_dkdv, False, False, False, False): Tuned(dkdv),
             (launch._attn_bwd_dq, False, False, False, False): Tuned(None),  # not launched yet
             (launch._attn_bwd_dq, False, False, False, True): Tuned(dq)}
    monkeypatch.setattr(launch, "_tuned", tuned)
    assert launch.last_tuned_configs() == "fwd 128x64 w8 s2; dkdv 32x128 w8 s3; dq 64x64 w4 s2 TMA"


def test_varlen_self_attention_cu_seqlens_passed_twice_is_checked():
    """Self-attention passes one cu_seqlens tensor as both; it is read once and checked as each."""
    q = torch.randn(10, 4, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0 and end at the packed length 10"):
        flash_attention_varlen(q, q, q, cu, cu, 5, 5)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen_k = 5 is smaller than the longest sequence \(6\)"):
        flash_attention_varlen(q, q, q, cu, cu, 6, 5)


def test_varlen_cu_seqlens_checked_once_reads_them_once(monkeypatch):
    """Inside cu_seqlens_checked_once (a model's layers), a cu_seqlens tensor is read (a GPU
    sync) once; another tensor, other totals or max_seqlen, or an in-place change read it again,
    and bad values still raise."""
    from attnkit.ops import attention_validation as check

    reads = []
    real_read = check._read_cu_seqlens
    monkeypatch.setattr(check, "_read_cu_seqlens", lambda *a: reads.append(1) or real_read(*a))
    q = torch.randn(10, 4, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with check.cu_seqlens_checked_once():
        for _ in range(3):
            flash_attention_varlen(q, q, q, cu, cu, 6, 6)
        assert len(reads) == 1
        flash_attention_varlen(q, q, q, cu, cu, 7, 7)  # another max_seqlen: read again
        flash_attention_varlen(q, q, q, cu.clone(), cu, 6, 6)  # another tensor
        assert len(reads) == 3
        cu[1] = 7  # in place: the version moves on, and the new values are wrong for max_seqlen 6
        with pytest.raises(ValueError, match=r"max_seqlen_q = 6 is smaller than the longest sequence \(7\)"):
            flash_attention_varlen(q, q, q, cu, cu, 6, 6)
    flash_attention_varlen(q, q, q, torch.tensor([0, 4, 10], dtype=torch.int32), cu.new_tensor([0, 4, 10]), 6, 6)
    flash_attention_varlen(q, q, q, cu, cu, 7, 7)  # outside the block: every call reads
    assert len(reads) == 6


def test_host_block_arithmetic_matches_triton():
    import triton

    from attnkit.triton_kernels._host import cdiv, next_power_of_2

    assert [next_power_of_2(n) for n in range(1, 600)] == [triton.next_power_of_2(n) for n in range(1, 600)]
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))


@pytest.mark.parametrize("max_seqlen", [2**27, 2**31, 2**63, 2**70])
def test_varlen_max_seqlen_is_an_upper_bound_of_any_size(max_seqlen):
    """max_seqlen only bounds the longest sequence (as FlashAttention's): cpp refused it from
    2^31 ("bad max_seqlen"), pybind from 2^63, and a large one made cpp loop over empty blocks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 2, 8, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    want = flash_attention_varlen(q, k, v, cu, cu, 3, 3, causal=True)
    got = flash_attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), q), torch.autograd.grad(want.sum(), q))
