"""Triton launches on the current CUDA device, whatever its pointers' device: the launchers make
the tensors' GPU current first (a model on cuda:1 under device_map="auto" ran its attention on
cuda:0). Checked without a GPU on fake cuda:1 tensors, the device switch recorded."""
import contextlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")
from attnkit.triton_kernels import _host, flash_attention_launch  # noqa: E402


@pytest.fixture
def switches(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    return entered


def test_a_launch_on_another_gpu_makes_it_current(switches):
    with FakeTensorMode():
        on_gpu1 = torch.empty(2, device="cuda:1")
        on_gpu0 = torch.empty(2, device="cuda:0")
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(list(switches))

    flash_attention_launch._run(Kernel(), (1,), (7, on_gpu1), {}, None)
    flash_attention_launch._run(Kernel(), (1,), (on_gpu0,), {}, None)
    flash_attention_launch._run(Kernel(), (1,), (torch.zeros(1),), {}, None)
    assert launched == [[torch.device("cuda:1")]] * 3  # switched for the first launch only
    assert isinstance(_host.on_tensors_device([3]), contextlib.nullcontext)


def test_grids_keep_axes_1_and_2_within_cudas_limit():
    """CUDA takes at most 65535 blocks on grid axes 1 and 2: batch * heads there failed to launch
    for a batch of 5462 at 12 heads (BERT-base inference), and rotary's batch of 70000."""
    from attnkit.triton_kernels import rotary

    grids = []
    record = lambda kernel, grid, args, kwargs: grids.append(  # noqa: E731
        (kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
         grid(dict(kwargs, BLOCK_M=64, BLOCK_N=64)) if callable(grid) else grid))
    meta = dict(device="meta", dtype=torch.float16)
    q, k, v = (torch.empty(5462, 12, 128, 64, **meta) for _ in range(3))
    options = dict(cu_q=None, cu_k=None, max_q=128, max_k=128, mask=None, pad=None, bottom_right=False,
                   window=(-1, -1), softcap=0.0, scale=0.125, dropout_p=0.0, seed=0)
    out, lse = flash_attention_launch.forward(q, k, v, launch=record, **options)
    flash_attention_launch.backward(torch.empty_like(out), q, k, v, out, lse, launch=record, **options)
    x = torch.empty(70000, 8, 2, 64, **meta)
    table = torch.empty(8, 32, device="meta", dtype=torch.float32)
    rotary.rotary(x, table, table, None, 0, False, False, torch.empty_like(x), launch=record)
    assert {name for name, _ in grids} >= {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq",
                                           "_rotary_kernel"}
    for name, grid in grids:
        assert all(axis <= 65535 for axis in grid[1:]), (name, grid)


# Constexprs that the autotuner's choice covers or that follow from what its key holds.
_NOT_TUNING_KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "USE_TMA", "LOOK_AHEAD", "ACC_DTYPE", "DOT_PRECISION",
                    "UPCAST", "BOTTOM_RIGHT", "RAW_SCORES", "INTERLEAVED"}


@pytest.mark.parametrize("kernel", ["_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"])
def test_the_autotuning_key_holds_every_feature_flag(kernel):
    """A config tuned for one feature combination was reused for another (soft-capping, ALiBi, a
    padding mask, a mask gradient): the flags that change the kernel's body are in the key."""
    fn = getattr(flash_attention_launch, kernel)
    fn = getattr(fn, "fn", fn)
    flags = {name for name, p in inspect.signature(fn).parameters.items()
             if "constexpr" in str(p.annotation)}
    assert flags - _NOT_TUNING_KEYS <= set(flash_attention_launch._TUNE_KEY)
    assert "SOFTCAP" in flags  # the signature was read


def test_wide_offsets_reads_the_strides_only_of_tensors_in_large_storages():
    """int64 offsets exactly where an element lies 2^31 - 1 or more past the tensor's start,
    whichever path (the storage's size, or the strides of a view into a larger one) decides."""
    wide = flash_attention_launch._wide_offsets
    small = torch.empty(4, 16, dtype=torch.float16)
    large = torch.empty(2**31 + 64, dtype=torch.bool)  # pages are committed only when touched
    assert not wide(None, small, small.t())
    assert not wide(large[:64].view(4, 16), large[2**31:].view(4, 16))  # small views of a large storage
    assert wide(large.as_strided((2, 16), (2**31 - 1, 1)))  # its second row 2^31 - 1 past the first
    assert not wide(large.as_strided((2, 16), (2**31 - 17, 1)))  # its last element at 2^31 - 2
    assert wide(small, large.as_strided((3, 4), (2**30, 1)))
    assert not wide(large.as_strided((0, 16), (2**31, 1)))  # no elements
