"""The Triton kernels compile for real GPUs (sm_80, sm_90) ahead of time, with
no GPU here: the interpreter never runs Triton's GPU compiler. Part of `make cuda-check`."""
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.cuda_build, pytest.mark.aot_compile]

ARCHES = [90, 80]


@pytest.fixture(scope="module")
def compile_runs():
    """Both arches' compile checks started together: each compiles on one core,
    and one after the other they took most of cuda-check (~2 minutes each)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {arch: subprocess.Popen([sys.executable, "-m", "attnkit.triton_kernels.compile_check", "--arch", str(arch)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for arch in ARCHES}
    yield runs
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


@pytest.mark.parametrize("arch", ARCHES)
def test_flash_attention_kernels_compile_and_fit_shared_memory(arch, compile_runs):
    stdout, stderr = compile_runs[arch].communicate(timeout=900)
    assert compile_runs[arch].returncode == 0, stdout[-4000:] + stderr[-4000:]
    from attnkit.triton_kernels.compile_check import COMBOS

    expected = sum(1 for *_, options in COMBOS if arch >= 90 or not options.get("tma"))  # TMA: sm_90 only
    assert stdout.count(": ok in") == expected, stdout
    if arch >= 90:  # the forward's first TMA candidate compiled as well
        assert "USE_TMA" in stdout, stdout
    assert "OVER THE LIMIT" not in stdout  # config 0 of every kernel fits, as the GPU suite launches it
    assert "NOT WARP-SPECIALIZED" not in stdout  # flash_attention_ws's loop got its producer and consumer warps
    # Compiled as a launch specializes (16-byte aligned pointers, pipelined loops), not under-reporting shared
    # memory; compile_check knows how from triton 3.3 on.
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3):
        assert "no launch specialization" not in stderr, stderr[-4000:]


def _ptxas():
    """Triton's bundled ptxas, or None where this Triton does not say where it is."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        return None


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("kernel_name", ["_attn_fwd", "_attn_bwd_dq"])
def test_look_ahead_keeps_its_product_in_flight(tmp_path, kernel_name, causal):
    """The LOOK_AHEAD loops (the forward's q k^T, flash_attention_forward._fwd_run_pipelined;
    dQ's dO V^T, flash_attention._dq_blocks) overlap the next block's product with this
    block's exponentials only while the product stays asynchronous: Triton must leave it in
    flight at the loop's end, and ptxas must not serialize the tensor cores, which it
    announces with C7514 / C7515 (both seen while the loops were written)."""
    import torch
    import triton

    from attnkit.triton_kernels import compile_check, flash_attention_launch as launch

    ptxas = _ptxas()
    if ptxas is None or not os.path.exists(ptxas):
        pytest.skip("this Triton does not say where its ptxas is")
    compiled = []
    real_compile = triton.compile

    def keep(source, target=None, options=None):
        kernel = real_compile(source, target=target, options=options)
        compiled.append(kernel)
        return kernel

    q, k, v, kwargs = compile_check._inputs(torch.bfloat16, 128, False, dict(window=(-1, 0)) if causal else {})
    first = next(i for i, c in enumerate(launch._configs(128, 2, look_ahead=True)) if c.kwargs.get("LOOK_AHEAD"))
    env = {"ATTNKIT_TRITON_CONFIG": str(first), "TRITON_INTERPRET": None}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.delenv(name, raising=False) if value is None else mp.setenv(name, value)
        mp.setattr(compile_check.triton, "compile", keep)
        compiler = compile_check.Compiler(90, all_configs=False)
        if kernel_name == "_attn_fwd":
            launch.forward(q, k, v, launch=compiler, **kwargs)
        else:
            lse = torch.empty(q.shape[:-1], device="meta", dtype=torch.float32)
            launch.backward(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, launch=compiler, **kwargs)
    (kernel,) = [c for c in compiled if c.name == kernel_name]
    ttgir = kernel.asm["ttgir"]
    in_flight = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line and "isAsync = true" in line
                 and "-> tensor<128x64xf32" in line]
    waited = {line.split("ttng.warp_group_dot_wait ")[1].split(",")[0].split(" ")[0]
              for line in ttgir.splitlines() if "ttng.warp_group_dot_wait " in line}
    products = [line.split("=")[0].strip() for line in in_flight]
    assert any(name not in waited for name in products), "no look-ahead product left in flight in the loop"
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(kernel.asm["ptx"])
    run = subprocess.run([ptxas, "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "C7514" not in run.stderr and "C7515" not in run.stderr, run.stderr
    assert "0 bytes spill stores" in run.stderr, run.stderr


def test_scale_and_softcap_reach_the_kernels_as_float64(monkeypatch):
    """Both are Python floats; a plain float parameter compiles as float32, which left float64 inputs
    3e-8 off (the interpreter keeps float64, so only a real compile shows it)."""
    import torch
    import triton

    from attnkit.triton_kernels import compile_check, decode, flash_attention_launch as launch

    signatures = {}
    real_compile = triton.compile

    def keep(source, target=None, options=None):
        signatures[source.fn.__name__] = dict(source.signature)
        return real_compile(source, target=target, options=options)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ATTNKIT_TRITON_CONFIG", "0")
    monkeypatch.setattr(compile_check.triton, "compile", keep)
    q, k, v, kwargs = compile_check._inputs(torch.float64, 16, False, dict(softcap=0.7, scale=0.3))
    compiler = compile_check.Compiler(90, all_configs=False)
    lse = torch.empty(q.shape[:-1], device="meta", dtype=torch.float64)
    launch.forward(q, k, v, launch=compiler, **kwargs)
    launch.backward(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, launch=compiler, **kwargs)
    lengths = torch.empty(q.shape[0], device="meta", dtype=torch.int32)
    decode.decode(q[:, :, :1], k, v, lengths, scale=0.3, softcap=0.7, window_left=-1, splits=2, launch=compiler)
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_decode_partial"):
        assert (signatures[name]["scale"], signatures[name]["softcap"]) == ("fp64", "fp64"), (name, signatures[name])
