"""Implementations of the whole-sequence LSTM and GRU (one layer, one
direction, time-major). Every backend honours one contract:

lstm forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)
    -> (output, h_n, c_n, gates, cs, hc)
lstm backward(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
              output, gates, cs, hc)
    -> (dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr)
gru forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save) -> (output, h_n, gates)
gru backward(grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates)
    -> (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)

with the saved tensors as documented in csrc/include/attnkit/rnn.h and
attnkit.reference.rnn (empty when not produced), `lengths` an int64 CPU tensor
or None, so a forward of one backend and a backward of another agree. The
kernels' backward needs no biases (the saved gates hold them); the reference
takes them to differentiate its forward again.
"""
from __future__ import annotations

import functools

import torch

from .. import _dispatch, _extensions, reference
from . import cuda_graphs
from .._dispatch import Implementation, Op


def _empty(like):
    return like.new_empty((0,))


class _Extension(Implementation):
    op = extension = ""
    dtypes = ()
    upcast = ()  # dtypes run in float32: converted on the way in, their results back

    def not_supported_reasons(self, call):
        if call["dtype"] not in self.dtypes + self.upcast:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes + self.upcast)
            return [f"the {self.backend} rnn kernels take {names}, got {str(call['dtype']).replace('torch.', '')}"]
        steps, batch = call.get("steps", UPCAST_MIN_STEPS), call.get("batch", 1)
        short = call["dtype"] in self.upcast and steps < UPCAST_MIN_STEPS and batch > UPCAST_ANY_STEPS_BATCH
        short = short and not self._native_bf16(call)  # no weights converted to float32 there
        if short and not _dispatch.forced_to(self.op, self.backend):  # a choice of speed: forcing it still works
            native = (" (bfloat16 GEMMs run it at any length with even input and hidden sizes, no proj_size, on a "
                      "CPU with AMX or AVX512-BF16)" if self.backend == "cpp" and call["dtype"] == torch.bfloat16 else "")
            return [f"{str(call['dtype']).replace('torch.', '')} runs the {self.backend} kernels in float32, which pays "
                    f"from {UPCAST_MIN_STEPS} steps at batch > {UPCAST_ANY_STEPS_BATCH}; got {steps} steps, batch "
                    f"{batch}{native}"]
        return []

    def _ext(self):
        return _extensions.load(self.extension)[0]

    def _native_bf16(self, call):
        """Whether this call's forward runs rnn_forward_bf16 (csrc/cpu/rnn_fused.cpp): bfloat16
        without projection at batch > 4 (smaller batches keep the float32 small-batch loops, as
        fast there), even sizes, on a CPU and torch with the bfloat16 brgemm. Training saves
        float32 gates there for the float32 backward."""
        return (self.backend == "cpp" and call["dtype"] == torch.bfloat16
                and not call.get("proj", False) and call.get("batch", 0) > UPCAST_ANY_STEPS_BATCH
                and call.get("input_size", 1) % 2 == 0 and call.get("hidden_size", 1) % 2 == 0 and _bf16_brgemm())

    def _bf16_backward(self, x, w_hr=None) -> bool:
        """Whether this backward runs rnn_backward_bf16 (csrc/cpu/rnn_backward_bf16.cpp): bfloat16
        without projection at batch > 4 on a CPU with bfloat16 GEMMs (the time loop's gate math in
        float32; its dh products, dx and the weight gradients bfloat16 GEMMs)."""
        return (self.backend == "cpp" and x.dtype == torch.bfloat16 and w_hr is None
                and x.shape[1] > UPCAST_ANY_STEPS_BATCH and _bf16_brgemm())

    def _run(self, entry, dtype, *args):
        """ext.<entry>(*args), in float32 where `dtype` is one of `upcast` (the
        floating-point tensors converted; None, lengths and flags as they are),
        its results cast back to `dtype`."""
        call = getattr(self._ext(), entry)
        if dtype not in self.upcast:
            return tuple(call(*args))
        wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return tuple(t.to(dtype) for t in call(*wide))


class _LstmExtension(_Extension):
    op = "lstm"

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        if x.dtype == torch.bfloat16 and self._native_bf16(dict(
                dtype=x.dtype, save=save, proj=w_hr is not None, batch=x.shape[1], input_size=x.shape[2],
                hidden_size=c0.shape[1])):  # the dtype first: building the dict took ~0.5 us a call
            result = self._ext().rnn_forward_bf16(4, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, save)
            if result:  # saved gates and cs rounded to x's dtype, as the float32 path returns them
                out, h_n, c_n, *saved = result
                gates, cs = (t.to(x.dtype) for t in saved) if save else (_empty(x), _empty(x))
                return out, h_n, c_n, gates, cs, _empty(x)
        return self._run("lstm_forward", x.dtype, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
        if self._bf16_backward(x, w_hr):
            grads = self._ext().rnn_backward_bf16(4, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, lengths,
                                                   output, gates, cs)
            if grads:
                return (*grads, _empty(x))
        return self._run("lstm_backward", x.dtype, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, lengths,
                         output, gates, cs, hc)


class _GruExtension(_Extension):
    op = "gru"

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        if x.dtype == torch.bfloat16 and self._native_bf16(dict(dtype=x.dtype, save=save, batch=x.shape[1],
                                                                input_size=x.shape[2], hidden_size=h0.shape[1])):
            result = self._ext().rnn_forward_bf16(3, x, h0, None, w_ih, w_hh, b_ih, b_hh, lengths, save)
            if result:
                return result[0], result[1], result[2].to(x.dtype) if save else _empty(x)
        return self._run("gru_forward", x.dtype, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save)

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
        if self._bf16_backward(x):
            grads = self._ext().rnn_backward_bf16(3, grad_output, grad_hn, None, x, h0, None, w_ih, w_hh, lengths,
                                                   output, gates, None)
            if grads:
                return tuple(grads)
        return self._run("gru_backward", x.dtype, grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates)


@functools.lru_cache(maxsize=None)
def _bf16_brgemm():
    """attnkit._C's rnn_forward_bf16 runs on this CPU (asked once)."""
    ext = _extensions.load("_C")[0]
    return ext is not None and hasattr(ext, "rnn_forward_bf16_available") and bool(ext.rnn_forward_bf16_available())


_CPP_DTYPES = (torch.float32, torch.float64)
# float16 / bfloat16 run the float32 kernels, as the CPU attention does: at (B, T, I=H) = (32, 128, 256)
# the plain-PyTorch reference took 35 ms (forward) and 214 ms (training step) in bfloat16 here, float32
# 16 and 58 ms; torch's oneDNN bfloat16 (AMX) 5.4 and 32 ms (2026-11-26, Xeon Sapphire Rapids).
_CPP_UPCAST = (torch.float16, torch.bfloat16)
# Converting the weights costs ~0.5 ms a call at H = 256 (fresh float32 copies, first touched):
# at batch 32 the reference's bfloat16 GEMMs won at 1 step (0.62 against 1.16 ms) and the LSTM's at 4
# (1.21 against 1.47), the cpp kernels from 16 steps (2.7 against 4.6); at batch 1 the cpp kernels won
# at every length (same machine).
UPCAST_MIN_STEPS, UPCAST_ANY_STEPS_BATCH = 8, 4
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CppLstm(_LstmExtension):
    backend, extension, dtypes, upcast = "cpp", "_C", _CPP_DTYPES, _CPP_UPCAST


class _CudaGraphed:
    """The cuda backend's kernel calls, through a CUDA graph with ATTNKIT_RNN_CUDA_GRAPHS=1
    (cuda_graphs.py; no dtype is upcast on CUDA)."""

    def _run(self, entry, dtype, *args):
        return cuda_graphs.call(entry, getattr(self._ext(), entry), args)


class CudaLstm(_CudaGraphed, _LstmExtension):
    backend, extension, dtypes = "cuda", "_C_cuda", _CUDA_DTYPES

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        if save and w_hr is None and _cluster_training(self._ext(), x, "lstm_forward_cluster_save"):
            result = self._ext().lstm_forward_cluster_save(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths)
            if result:  # else W_hh fits no cluster here: the per-step loop
                return (*result, _empty(x))
        return super().forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
        if w_hr is None and _cluster_training(self._ext(), x, "lstm_backward_cluster"):
            grads = self._ext().lstm_backward_cluster(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, lengths,
                                                      output, gates, cs)
            if grads:
                return (*grads, _empty(x))
        return super().backward(grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                output, gates, cs, hc)


class CppGru(_GruExtension):
    backend, extension, dtypes, upcast = "cpp", "_C", _CPP_DTYPES, _CPP_UPCAST


class CudaGru(_CudaGraphed, _GruExtension):
    backend, extension, dtypes = "cuda", "_C_cuda", _CUDA_DTYPES

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        if save and _cluster_training(self._ext(), x, "gru_forward_cluster_save"):
            result = self._ext().gru_forward_cluster_save(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
            if result:
                return tuple(result)
        return super().forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save)

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
        if _cluster_training(self._ext(), x, "gru_backward_cluster"):
            grads = self._ext().gru_backward_cluster(grad_output, grad_hn, x, h0, w_ih, w_hh, lengths, output, gates)
            if grads:
                return tuple(grads)
        return super().backward(grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates)


def _clusters_on(dtype):
    """ATTNKIT_RNN_CLUSTER=1 and a dtype the cluster kernels take (float16, bfloat16)."""
    return _dispatch.getenv(CLUSTER_ENV) == "1" and dtype in (torch.float16, torch.bfloat16)


def _cluster_training(ext, x, entry):
    """Whether a training forward or backward tries the cluster kernels: the forward saves what
    the per-step backward reads, and the cluster backward reads the same, so either runs with either."""
    return _clusters_on(x.dtype) and hasattr(ext, entry)


# The persistent kernel passed the GPU suite on an H200 (2026-11-26) and beat the
# per-step kernels 3-11x at every measured inference size (BENCHMARKS.md), so it is
# chosen automatically where it fits; ATTNKIT_RNN_PERSISTENT=0 turns that off
# (forcing it by name still works).
PERSISTENT_ENV = "ATTNKIT_RNN_PERSISTENT"
_dispatch.choice_depends_on_env(PERSISTENT_ENV)
PERSISTENT_MAX_BATCH = 8
_PERSISTENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# csrc/cuda/rnn_cluster.cu, the persistent kernel on thread-block clusters (sm_90+,
# halves, any batch): opt-in until a GPU run has checked and timed it.
CLUSTER_ENV = "ATTNKIT_RNN_CLUSTER"
_dispatch.choice_depends_on_env(CLUSTER_ENV)


class _Persistent(Implementation):
    """csrc/cuda/rnn_persistent.cu: one launch for all T steps, each block keeping
    its units' rows of W_hh in shared memory. Inference only (save=False), no
    projection, batch 1..8 (any batch with ATTNKIT_RNN_CLUSTER=1 in float16 /
    bfloat16 on sm_90+); the kernel itself says when W_hh does not fit on chip."""

    backend, extension = "cuda_persistent", "_C_cuda"
    op, gates, entry, per_step = "", 0, "", None

    def not_supported_reasons(self, call):
        reasons = []
        if call["dtype"] not in _PERSISTENT_DTYPES:
            reasons.append(f"the persistent kernel takes float16, bfloat16, float32, got {str(call['dtype']).replace('torch.', '')}")
        batch = call.get("batch")
        # On clusters any batch runs (the extension says whether this one does).
        if batch is None or batch < 1 or (batch > PERSISTENT_MAX_BATCH and not _clusters_on(call["dtype"])):
            reasons.append(f"the persistent kernel takes batch 1..{PERSISTENT_MAX_BATCH}, got {batch}")
        if call.get("proj", False):
            reasons.append("the persistent kernel has no proj_size (w_hr)")
        if call.get("save", True):
            reasons.append("the persistent kernel is inference only: this call keeps the gates for a backward (training)")
        switched_off = _dispatch.getenv(PERSISTENT_ENV) == "0"
        if switched_off and not _dispatch.forced_to(self.op, self.backend):
            reasons.append(f"{PERSISTENT_ENV}=0 turns the automatic choice of the persistent kernel off")
        if reasons:
            return reasons
        ext = self._ext()
        if not hasattr(ext, self.entry):
            return [f"attnkit._C_cuda was built without {self.entry}: rebuild it (make build)"]
        why = ext.rnn_persistent_unsupported(self.gates, batch, call["hidden_size"], call["dtype"], call["device"])
        return [why] if why else []

    def _ext(self):
        return _extensions.load(self.extension)[0]

    def _check_inference(self, save, w_hr=None):
        if save or w_hr is not None:
            raise NotImplementedError(
                f"attnkit {self.op}: the cuda_persistent backend is inference only (save=False) and has no proj_size"
            )

    def backward(self, *args):
        raise NotImplementedError(
            f"attnkit {self.op}: the cuda_persistent backend has no backward; training forwards (save=True) "
            "never select it"
        )


class CudaPersistentLstm(_Persistent):
    op, gates, entry, per_step = "lstm", 4, "lstm_forward_persistent", CudaLstm()

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        self._check_inference(save, w_hr)
        result = self._ext().lstm_forward_persistent(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths)
        if not result:  # not taken (W_hh off chip on this device): the per-step kernels
            return self.per_step.forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save)
        output, h_n, c_n = result
        return output, h_n, c_n, _empty(x), _empty(x), _empty(x)


class CudaPersistentGru(_Persistent):
    op, gates, entry, per_step = "gru", 3, "gru_forward_persistent", CudaGru()

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        self._check_inference(save)
        result = self._ext().gru_forward_persistent(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
        if not result:
            return self.per_step.forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save)
        output, h_n = result
        return output, h_n, _empty(x)


def _vjp(fn, inputs, grad_outputs):
    """Gradients of the reference forward `fn(*inputs)` (None inputs passed
    through as None). torch.func.vjp, not torch.autograd: the custom op runs
    below the autograd dispatch key, where autograd records nothing."""
    present = [i for i, t in enumerate(inputs) if t is not None]

    def on_present(*values):
        full = list(inputs)
        for i, v in zip(present, values):
            full[i] = v
        return fn(*full)

    _, pullback = torch.func.vjp(on_present, *[inputs[i] for i in present])
    grads = iter(pullback(tuple(grad_outputs)))
    return [None if t is None else next(grads) for t in inputs]


class ReferenceLstm(Implementation):
    """The plain-PyTorch loop; its backward differentiates that loop again."""

    backend = "reference"

    def forward(self, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, save):
        output, h_n, c_n, gates, cs, hc = reference.lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths)
        if not save:
            gates, cs, hc = _empty(x), _empty(x), _empty(x)
        return output, h_n, c_n, gates, cs, hc

    def backward(self, grad_output, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, output, gates, cs, hc):
        # Both biases enter as their sum: the gradient of that sum is each bias's.
        bias = x.new_zeros(w_ih.shape[0])
        for b in (b_ih, b_hh):
            bias = bias if b is None else bias + b

        def fn(x, h0, c0, w_ih, w_hh, bias, w_hr):
            return reference.lstm(x, h0, c0, w_ih, w_hh, bias, None, w_hr, lengths)[:3]

        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _vjp(
            fn, [x, h0, c0, w_ih, w_hh, bias, w_hr], [grad_output, grad_hn, grad_cn]
        )
        return dx, dh0, dc0, dw_ih, dw_hh, db, _empty(x) if dw_hr is None else dw_hr


class ReferenceGru(Implementation):
    backend = "reference"

    def forward(self, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, save):
        output, h_n, gates = reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)
        return output, h_n, gates if save else _empty(x)

    def backward(self, grad_output, grad_hn, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, output, gates):
        b_ih = x.new_zeros(w_ih.shape[0]) if b_ih is None else b_ih  # an absent bias is a zero one
        b_hh = x.new_zeros(w_hh.shape[0]) if b_hh is None else b_hh

        def fn(x, h0, w_ih, w_hh, b_ih, b_hh):
            return reference.gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths)[:2]

        return tuple(_vjp(fn, [x, h0, w_ih, w_hh, b_ih, b_hh], [grad_output, grad_hn]))


LSTM = Op("lstm", [CudaPersistentLstm(), CudaLstm(), CppLstm(), ReferenceLstm()])
GRU = Op("gru", [CudaPersistentGru(), CudaGru(), CppGru(), ReferenceGru()])
