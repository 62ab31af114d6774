"""Whole-sequence LSTM / GRU (attnkit.nn.LSTM / GRU, automatic backend) vs
torch.nn.LSTM / GRU with the same weights, forward (no grad) and
forward+backward, on the same inputs (on a GPU in float16 where --dtype is
the default float32); plus a training step on an unsorted
PackedSequence. On CPU torch.nn.LSTM runs oneDNN (fp32): a strong baseline.
attnkit.nn.LayerNormLSTM has no torch.nn counterpart: it is timed against the
same module on the plain-PyTorch reference backend.

On CUDA, also issue 6's inference figure: the persistent small-batch kernel
(backend cuda_persistent, forced, so the row says what it measures) against
torch.nn (cuDNN) and against the per-step cuda backend, batch 1..8, T = 256,
H = 128 / 256 / 512 in float16 and 256 / 512 in float32 whatever --dtype says;
in float16 also the opt-in cluster kernel (ATTNKIT_RNN_CLUSTER=1)."""
from __future__ import annotations

import contextlib
import os
import time as time_module

import torch
from timing import gradient_error, max_error, median_ms, median_pair_ms, within_budget
from torch.nn.utils.rnn import pack_padded_sequence

import attnkit
from attnkit import _extensions

TITLE = "LSTM / GRU layer over a sequence: attnkit.nn vs torch.nn"
QUICK_SHAPES = [(32, 128, 256), (64, 100, 512), (1, 256, 128)]  # (batch, time, input = hidden)
FULL_SHAPES = QUICK_SHAPES + [(8, 256, 256), (128, 64, 1024)]
TRAINING_TARGET = (64, 100, 512)  # issue 6: training at least as fast as cuDNN there, float16
# T = 256. Half precision first (where the cluster kernel runs), H = 128 there too
# (the size at which cuDNN beat the grid kernel on an H200).
PERSISTENT_CASES = [(kind, dtype, batch, hidden) for dtype in (torch.float16, torch.float32) for kind in ("LSTM", "GRU")
                    for hidden in ((128, 256, 512) if dtype == torch.float16 else (256, 512))
                    for batch in (1, 2, 4, 8)]


def modules(kind, hidden, device, dtype):
    ours = getattr(attnkit.nn, kind)(hidden, hidden, device=device, dtype=dtype)
    theirs = getattr(torch.nn, kind)(hidden, hidden, device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def training_step(module, x, lengths=None):
    """zero_grad, forward, backward; with `lengths`, packs x (unsorted) first."""

    def step():
        module.zero_grad(set_to_none=True)
        out, _ = module(x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False))
        data = out.data if hasattr(out, "batch_sizes") else out
        data.sum().backward()

    return step


def run(device: torch.device, dtype: torch.dtype, quick: bool = True):
    # Quick mode keeps the shapes but times fewer repeats: a training step
    # at (64, 100, 512) takes seconds on a 2-core CPU.
    # A GPU step takes milliseconds: there quick mode can afford more repeats (the H200's first
    # run, at 3, gave cuDNN figures that need re-measuring).
    if not quick:
        timing = dict(repeats=7)
    elif device.type == "cuda":
        timing = dict(warmup=3, repeats=10)
    else:
        timing = dict(warmup=1, repeats=3)
    rows = []
    # On a GPU the training figure is in float16 (cuDNN's tensor cores);
    # the persistent rows below cover float32 too.
    main_dtype = torch.float16 if device.type == "cuda" and dtype == torch.float32 else dtype
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if device.type == "cuda":
        # Issue 6's GPU targets first (inference at batch 1..8, training at (64, 100, 512)): gpu-check
        # gives the family a share of its time, and what runs past it is not measured.
        rows += persistent_rows(device, timing)
        shapes = sorted(shapes, key=lambda shape: shape != TRAINING_TARGET)
    for batch, time, hidden in within_budget(shapes, rows, lambda case: "B={} T={} I=H={}".format(*case)):
        # A batch-1 call takes about a millisecond on a CPU: more repeats cost nothing there and
        # steady a median that three would leave to the machine's noise.
        shape_timing = dict(timing, repeats=max(timing.get("repeats", 15), 21)) if batch * time * hidden <= 1 << 16 \
            else timing
        shape = f"B={batch} T={time} I=H={hidden}" + (" float16" if main_dtype != dtype else "")
        x = torch.randn(time, batch, hidden, device=device, dtype=main_dtype, requires_grad=True)
        for kind in ("LSTM", "GRU"):
            ours, theirs = modules(kind, hidden, device, main_dtype)
            with torch.no_grad():
                error = max_error(ours(x)[0], theirs(x)[0])
                backend = attnkit.last_dispatch(kind.lower()).backend
                t_ours, t_theirs = median_pair_ms(lambda: ours(x), lambda: theirs(x), device, **shape_timing)
            common = dict(shape=shape, backend=backend, max_err=error)
            rows.append(dict(case=f"{kind} forward", ours_ms=t_ours, baseline_ms=t_theirs, **common))
            if device.type == "cuda":
                rows += cluster_forward_rows(kind, ours, theirs, x, shape, shape_timing)
            t_ours, t_theirs = median_pair_ms(training_step(ours, x), training_step(theirs, x), device,
                                              **shape_timing)
            # Training may take another backend than inference (cuda, not cuda_persistent).
            common["backend"] = attnkit.last_dispatch(kind.lower()).backend
            common["max_err"] = gradient_error(training_step(ours, x), training_step(theirs, x),
                                               [x, *ours.parameters()], [x, *theirs.parameters()], error)
            rows.append(dict(case=f"{kind} fwd+bwd", ours_ms=t_ours, baseline_ms=t_theirs, **common))
            if device.type == "cuda":
                rows += graphs_rows(kind, ours, theirs, x, shape, shape_timing)
        if batch > 1:  # training on an unsorted PackedSequence of lengths spread over [T/4, T]
            lengths = torch.randint(time // 4, time + 1, (batch,))
            lengths[0] = time
            packed = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
            ours, theirs = modules("LSTM", hidden, device, main_dtype)
            error = max_error(ours(packed)[0].data, theirs(packed)[0].data)
            backend = attnkit.last_dispatch("lstm").backend
            t_ours, t_theirs = median_pair_ms(training_step(ours, x.detach(), lengths),
                                              training_step(theirs, x.detach(), lengths), device, **timing)
            error = gradient_error(training_step(ours, x.detach(), lengths), training_step(theirs, x.detach(), lengths),
                                   list(ours.parameters()), list(theirs.parameters()), error)
            rows.append(dict(case="LSTM fwd+bwd, unsorted PackedSequence", shape=shape, backend=backend,
                             ours_ms=t_ours, baseline_ms=t_theirs, max_err=error))
    sections = [("LayerNorm LSTM/GRU", lambda: layer_norm_rows(device, dtype, quick, timing))]
    if device.type == "cuda":
        sections.append(("per-step cuda loops", lambda: cuda_loop_rows(device, timing)))
    for _, section in within_budget(sections, rows, lambda case: case[0]):
        rows += section()
    return rows


def cuda_loop_rows(device, timing, shape=(64, 100, 512), dtype=torch.float16):
    """The per-step cuda backend's fused time loops (a cuBLAS call and a kernel a step, on raw
    pointers) against the shared loop of rnn_sequence.h (tensors per step), which
    ATTNKIT_RNN_CUDA_GENERIC_LOOP=1 selects; and the fused loops with their GEMMs on cuBLAS
    directly (ATTNKIT_RNN_CUDA_DIRECT_GEMM=1, opt-in) against them through ATen's addmm_.
    max err: the outputs (forward) or W_hh's gradients (fwd+bwd) of the two. The note gives
    each side's host time per call (the call returning, unsynchronized): where it is about
    the whole time, the host sets the pace."""
    batch, time, hidden = shape
    x = torch.randn(time, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    text = f"B={batch} T={time} I=H={hidden} {str(dtype).replace('torch.', '')}"
    rows = []
    for kind in ("LSTM", "GRU"):
        ours, _ = modules(kind, hidden, device, dtype)
        step = training_step(ours, x)

        def forward():
            with torch.no_grad(), attnkit.use_backend("cuda", op=kind.lower()):
                return ours(x)[0]

        def train():
            step()
            return ours.weight_hh_l0.grad

        for mode, fn in (("forward", forward), ("fwd+bwd", train)):
            runs = {}
            for loop, variables in (("shared", {"ATTNKIT_RNN_CUDA_GENERIC_LOOP": "1"}), ("fused", {}),
                                    ("direct", {"ATTNKIT_RNN_CUDA_DIRECT_GEMM": "1"})):
                with _environment(variables):
                    runs[loop] = (fn().clone(), median_ms(fn, device, **timing), _host_ms(fn, device))
            for (ours_loop, base_loop), what in ((("fused", "shared"), "fused loop vs shared loop"),
                                                 (("direct", "fused"), "direct cuBLAS vs ATen addmm_")):
                (out, t_ours, host_ours), (base, t_base, host_base) = runs[ours_loop], runs[base_loop]
                rows.append(dict(case=f"{kind} {mode}, cuda: {what}", shape=text, backend="cuda", ours_ms=t_ours,
                                 baseline_ms=t_base, max_err=max_error(out, base),
                                 note=f"host {host_ours:.3f} vs {host_base:.3f} ms a call"))
    return rows


def _host_ms(fn, device, repeats=5):
    """Median host time of fn() with the GPU idle at its start: until the call returns, unsynchronized."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        started = time_module.perf_counter()
        fn()
        times.append((time_module.perf_counter() - started) * 1e3)
    torch.cuda.synchronize(device)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def _environment(variables):
    """The switches of csrc/cuda/rnn.cu, rnn_cluster.cu, backends/cuda_graphs.py and the cuda
    layer-norm kernels set as given inside the block, the others unset; they are read per call."""
    names = ("ATTNKIT_RNN_CUDA_GENERIC_LOOP", "ATTNKIT_RNN_CUDA_DIRECT_GEMM", "ATTNKIT_RNN_CLUSTER",
             "ATTNKIT_RNN_CUDA_GRAPHS", "ATTNKIT_RNN_LN_CUDA")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
            if saved[name] is not None:
                os.environ[name] = saved[name]


def persistent_rows(device, timing, time=256):
    rows = []
    describe = lambda case: f"{case[0]} {str(case[1]).replace('torch.', '')} B={case[2]} H={case[3]}"  # noqa: E731
    for kind, dtype, batch, hidden in within_budget(PERSISTENT_CASES, rows, describe):
        op = kind.lower()
        ours, theirs = modules(kind, hidden, device, dtype)
        x = torch.randn(time, batch, hidden, device=device, dtype=dtype)
        shape = f"B={batch} T={time} I=H={hidden} {str(dtype).replace('torch.', '')}"

        def on(backend):
            def call():
                with attnkit.use_backend(backend, op=op):
                    return ours(x)
            return call

        with torch.no_grad():
            try:
                error = max_error(on("cuda_persistent")()[0], theirs(x)[0])
            except RuntimeError as exc:  # forced but refused (W_hh off chip on this GPU): say so
                rows.append(dict(case=f"{kind} inference, persistent: not run ({exc})", shape=shape,
                                 backend="cuda_persistent", ours_ms=float("nan"), baseline_ms=float("nan"),
                                 max_err=float("nan")))
                continue
            t_persistent = median_ms(on("cuda_persistent"), device, **timing)
            t_cudnn = median_ms(lambda: theirs(x), device, **timing)
            t_per_step = median_ms(on("cuda"), device, **timing)
            cluster = cluster_plan(op, batch, hidden, dtype, device)
            if cluster[0] != "0":
                with _environment({"ATTNKIT_RNN_CLUSTER": "1"}):
                    cluster_error = max_error(on("cuda_persistent")()[0], theirs(x)[0])
                    t_cluster = median_ms(on("cuda_persistent"), device, **timing)
        common = dict(shape=shape, backend="cuda_persistent", ours_ms=t_persistent, max_err=error)
        rows.append(dict(case=f"{kind} inference, persistent vs cuDNN", baseline_ms=t_cudnn, **common))
        rows.append(dict(case=f"{kind} inference, persistent vs per-step cuda", baseline_ms=t_per_step, **common))
        if cluster[0] != "0":
            common = dict(shape=shape, backend="cuda_persistent", ours_ms=t_cluster, max_err=cluster_error,
                          note=f"ATTNKIT_RNN_CLUSTER=1: a cluster of {cluster[0]} blocks")
            rows.append(dict(case=f"{kind} inference, cluster kernel vs cuDNN", baseline_ms=t_cudnn, **common))
            rows.append(dict(case=f"{kind} inference, cluster kernel vs grid kernel", baseline_ms=t_persistent,
                             **common))
        elif dtype != torch.float32:
            rows.append(dict(case=f"{kind} inference, cluster kernel: not run ({cluster[1]})", shape=shape,
                             backend="cuda_persistent", ours_ms=float("nan"), baseline_ms=float("nan"),
                             max_err=float("nan")))
    return rows


def graphs_rows(kind, ours, theirs, x, shape, timing):
    """The opt-in ways around the per-step cuda loop's host time, against cuDNN: its kernel
    calls replayed from CUDA graphs (ATTNKIT_RNN_CUDA_GRAPHS=1; forward and training step),
    and training on the cluster kernels (ATTNKIT_RNN_CLUSTER=1: forward and backward). max
    err: against the default loop's result."""
    op, rows = kind.lower(), []
    step = training_step(ours, x)

    def train():
        step()
        return ours.weight_hh_l0.grad

    def forward():
        with torch.no_grad():
            return ours(x)[0]

    variants = [("forward", forward, lambda: theirs(x), {"ATTNKIT_RNN_CUDA_GRAPHS": "1"}),
                ("fwd+bwd", train, training_step(theirs, x), {"ATTNKIT_RNN_CUDA_GRAPHS": "1"}),
                ("fwd+bwd", train, training_step(theirs, x), {"ATTNKIT_RNN_CLUSTER": "1"})]
    with attnkit.use_backend("cuda", op=op):
        default = {"forward": forward().clone(), "fwd+bwd": train().clone()}
        for mode, fn, theirs_fn, variables in variants:
            if "ATTNKIT_RNN_CLUSTER" in variables and cluster_plan(op, x.shape[1], x.shape[2], x.dtype, x.device)[0] == "0":
                continue
            with _environment(variables):
                error = max_error(fn(), default[mode])
                t_ours, t_theirs = median_pair_ms(fn, theirs_fn, x.device, **timing)
            switches = " ".join(f"{name}=1" for name in variables)
            rows.append(dict(case=f"{kind} {mode}, {switches}", shape=shape, backend="cuda", ours_ms=t_ours,
                             baseline_ms=t_theirs, max_err=error, note="max err: against the default loop"))
    return rows


def cluster_forward_rows(kind, ours, theirs, x, shape, timing):
    """The inference forward on the opt-in cluster kernel (any batch), where it runs."""
    time, batch, hidden = x.shape
    size, why, at_once = cluster_plan(kind.lower(), batch, hidden, x.dtype, x.device)
    if size == "0":
        return [dict(case=f"{kind} forward, cluster kernel: not run ({why})", shape=shape, backend="cuda_persistent",
                     ours_ms=float("nan"), baseline_ms=float("nan"), max_err=float("nan"))]
    with torch.no_grad(), _environment({"ATTNKIT_RNN_CLUSTER": "1"}):
        error = max_error(ours(x)[0], theirs(x)[0])
        backend = attnkit.last_dispatch(kind.lower()).backend
        t_ours, t_theirs = median_pair_ms(lambda: ours(x), lambda: theirs(x), x.device, **timing)
    return [dict(case=f"{kind} forward, ATTNKIT_RNN_CLUSTER=1", shape=shape, backend=backend, ours_ms=t_ours,
                 baseline_ms=t_theirs, max_err=error, note=f"a cluster of {size} blocks per 8 batch rows, {at_once} at a time")]


def cluster_plan(op, batch, hidden, dtype, device):
    """csrc/cuda/rnn_cluster.cu's [cluster size, why not, clusters at a time] for this call
    (size "0" when it does not run)."""
    ext = _extensions.load("_C_cuda")[0]
    if not hasattr(ext, "rnn_cluster_plan"):
        return ["0", "attnkit._C_cuda predates the cluster kernel: rebuild it", "0"]
    return ext.rnn_cluster_plan(4 if op == "lstm" else 3, batch, hidden, dtype, device)


def forced_reference(fn):
    def call():
        with attnkit.use_backend("reference", op="layer_norm_lstm"):
            return fn()
    return call


def layer_norm_rows(device, dtype, quick, timing):
    """The LayerNormLSTM's kernels against its plain-PyTorch reference; on a GPU the opt-in
    cuda kernels (ATTNKIT_RNN_LN_CUDA=1), not yet run on one."""
    environment = {"ATTNKIT_RNN_LN_CUDA": "1"} if device.type == "cuda" else {}
    with _environment(environment):
        return _layer_norm_rows(device, dtype, quick, timing)


def _layer_norm_rows(device, dtype, quick, timing):
    batch, time, hidden = (16, 64, 128) if quick else (32, 128, 256)
    shape = f"B={batch} T={time} I=H={hidden} zoneout=0.1 (eval)"
    x = torch.randn(time, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    module = attnkit.nn.LayerNormLSTM(hidden, hidden, zoneout=0.1, device=device, dtype=dtype).eval()
    with torch.no_grad():
        out = module(x)[0]
        backend = attnkit.last_dispatch("layer_norm_lstm").backend
    if backend == "reference":  # no kernel takes this dtype here: the two sides would be one code
        return [dict(case=f"LayerNormLSTM: not measured (attnkit runs its reference for {str(dtype)[6:]} "
                          f"on {device.type})", shape=shape, backend=backend, ours_ms=float("nan"),
                     baseline_ms=float("nan"), max_err=float("nan"))]
    with torch.no_grad():
        error = max_error(out, forced_reference(lambda: module(x))()[0])
        t_ours, t_ref = median_pair_ms(lambda: module(x), forced_reference(lambda: module(x)), device, **timing)
    rows = [dict(case="LayerNormLSTM forward vs reference", shape=shape, backend=backend, ours_ms=t_ours,
                 baseline_ms=t_ref, max_err=error)]
    ours_step, ref_step = training_step(module, x), forced_reference(training_step(module, x))
    error = gradient_error(ours_step, ref_step, [x, *module.parameters()], forward_error=error)
    t_ours, t_ref = median_pair_ms(ours_step, ref_step, device, **timing)
    rows.append(dict(case="LayerNormLSTM fwd+bwd vs reference", shape=shape, backend=backend, ours_ms=t_ours,
                     baseline_ms=t_ref, max_err=error))
    return rows
