"""The LOOK_AHEAD loops, autotune candidates on GPUs (a product issued one key block
ahead: the forward's q k^T, flash_attention_forward._fwd_run_pipelined; dQ's dO V^T,
flash_attention._dq_blocks), on the Triton backend under the interpreter, where
flash_attention_launch.look_ahead_forced() takes them: values, lse and gradients
against the float64 reference."""
import pytest
import torch
from attention_cases import Features, Shape, assert_close, ground_truth, make_inputs
from helpers import ATTENTION_GRAD_TOL, ATTENTION_TOL, forced

from attnkit.ops import flash_attention
from attnkit.reference import attention as ref

OP = "flash_attention"

# The interpreter's blocks are 16 x 16: a query block sees the checked blocks first, then the run.
CASES = [
    (Shape(2, 2, 2, 70, 75, 32, 32), Features()),  # several run blocks, partial query and key tails
    (Shape(2, 4, 2, 50, 64, 32, 32), Features(causal=True)),  # GQA, Nq != Nk: the diagonal checked
    (Shape(1, 2, 2, 40, 40, 80, 80), Features(window=(20, 5))),  # head dim padded to 128
    (Shape(2, 2, 2, 48, 48, 16, 16), Features(mask="bool", padding=True)),  # masks inside the run
    (Shape(1, 2, 2, 48, 33, 16, 16), Features(mask="float", softcap=4.0, alibi="batch")),
    (Shape(1, 2, 2, 32, 16, 16, 16), Features()),  # a run of one block: the look-ahead reloads it
    (Shape(1, 2, 2, 32, 8, 16, 16), Features()),  # no whole key block: no run
    (Shape(2, 2, 2, 33, 47, 16, 16), Features(padding=True, pad_whole_sequence=True)),  # rows that see nothing
    (Shape(1, 1, 1, 1, 40, 16, 16), Features()),  # one query
]


def _launch():
    return pytest.importorskip("attnkit.triton_kernels.flash_attention_launch")


def _spy_forward_options(monkeypatch, launch):
    """The keyword arguments of each forward and dQ kernel launch."""
    launched = []
    real = launch._run

    def spy(kernel, grid, args, kwargs, run_launch):
        if kernel is launch._attn_fwd or kernel is launch._attn_bwd_dq:
            launched.append(kwargs)
        return real(kernel, grid, args, kwargs, run_launch)

    monkeypatch.setattr(launch, "_run", spy)
    return launched


def _check(q, k, v, kwargs, dtype, **extra):
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64).to(dtype)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = flash_attention(*leaves, **kwargs, return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad_out)
    out_t, lse_t, grads_t = ground_truth(q, k, v, kwargs, grad_out, **extra)
    assert_close(out, out_t, ATTENTION_TOL[dtype], "out")
    if not extra:
        assert_close(lse, lse_t, ATTENTION_TOL[dtype], "lse")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, ATTENTION_GRAD_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("shape,features", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CASES])
def test_look_ahead_matches_reference(monkeypatch, shape, features):
    launch = _launch()
    launched = _spy_forward_options(monkeypatch, launch)
    with forced(OP, "triton", "cpu") as dev, launch.look_ahead_forced():
        q, k, v, kwargs = make_inputs(shape, features, torch.float32, dev)
        _check(q, k, v, kwargs, torch.float32)
    assert [options.get("LOOK_AHEAD") for options in launched] == [True, True]  # the forward, then dQ


def test_look_ahead_with_dropout_draws_the_reference_mask(monkeypatch):
    launch = _launch()
    launched = _spy_forward_options(monkeypatch, launch)
    shape, features = Shape(2, 2, 1, 40, 57, 32, 32), Features(causal=True)
    with forced(OP, "triton", "cpu") as dev, launch.look_ahead_forced():
        q, k, v, kwargs = make_inputs(shape, features, torch.float32, dev)
        kwargs = dict(kwargs, dropout_p=0.3, generator=torch.Generator().manual_seed(5))
        seed = int(torch.randint(0, 1 << 40, (), generator=torch.Generator().manual_seed(5))) << 20
        keep = ref.dropout_keep_mask(seed, 2, 2, 40, 57, 0.3, q.device)
        truth_kwargs = {key: value for key, value in kwargs.items() if key not in ("dropout_p", "generator")}
        grad_out = torch.randn(2, 2, 40, 32, dtype=torch.float64).float()
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = flash_attention(*leaves, **kwargs)
        grads = torch.autograd.grad(out, leaves, grad_out)
    out_t, _, grads_t = ground_truth(q, k, v, truth_kwargs, grad_out, dropout_p=0.3, dropout_keep=keep)
    assert_close(out, out_t, 1e-4, "out")
    for name, g, g_t in zip("qkv", grads, grads_t):
        assert_close(g, g_t, 4e-4, f"d{name}")
    assert launched and all(options.get("LOOK_AHEAD") for options in launched)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_look_ahead_through_tensor_descriptors(monkeypatch, dtype):
    launch = _launch()
    if launch.TensorDescriptor is None:
        pytest.skip("this Triton has no host tensor descriptors")
    launched = _spy_forward_options(monkeypatch, launch)
    shape, features = Shape(2, 4, 2, 33, 47, 64, 64), Features(causal=True)
    with forced(OP, "triton", "cpu", dtype) as dev, launch.look_ahead_forced(), launch.tma_forced():
        q, k, v, kwargs = make_inputs(shape, features, dtype, dev)
        _check(q, k, v, kwargs, dtype)
    assert [(o.get("LOOK_AHEAD"), o.get("USE_TMA")) for o in launched] == [(True, True)] * 2


def _key(config):
    return sorted(config.kwargs.items()), config.num_warps, config.num_stages


def test_look_ahead_candidates_are_the_forward_and_dq_lists():
    """The forward's and dQ's autotune list ends with the LOOK_AHEAD candidates (2-byte
    types, D <= 128, no RoPE); the dK/dV kernel's list has none."""
    launch = _launch()
    forward = launch._configs(128, 2, look_ahead=True)
    plain = launch._configs(128, 2)
    pipelined = [c for c in forward if c.kwargs.get("LOOK_AHEAD")]
    same = lambda a, b: [_key(c) for c in a] == [_key(c) for c in b]  # noqa: E731  (Config has no == before triton 3.3)
    assert same(forward[: len(plain)], plain) and same(forward[len(plain):], pipelined) and pipelined
    assert not any(c.kwargs.get("LOOK_AHEAD") for c in launch._configs(128, 2, dkdv=True))
    assert not any(c.kwargs.get("USE_TMA") for c in pipelined)  # no descriptors on this machine
    with_tma = [c for c in launch._configs(128, 2, tma=True, look_ahead=True) if c.kwargs.get("LOOK_AHEAD")]
    assert any(c.kwargs.get("USE_TMA") and c.pre_hook is not None for c in with_tma)
    for no_candidates in (launch._configs(256, 2, look_ahead=True), launch._configs(128, 4, look_ahead=True),
                          launch._configs(128, 2, rotary=True, look_ahead=True)):
        assert not any(c.kwargs.get("LOOK_AHEAD") for c in no_candidates)
    assert launch._config_count(128, 2, False) == len(forward)
