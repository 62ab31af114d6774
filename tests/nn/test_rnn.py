"""attnkit.nn.LSTM / GRU / GRUCell are drop-ins for torch.nn's: same parameters
and state_dict, same outputs and gradients with copied weights."""
import copy
import re

import pytest
import torch
from helpers import RNN_GRAD_FACTOR, TOLERANCES
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import attnkit

F64 = torch.float64
# (num_layers, bidirectional, batch_first, bias, proj_size): every argument on
# and off at least once, in few combinations.
CONFIGS = [
    (1, False, False, True, 0),
    (2, True, True, True, 0),
    (2, False, False, False, 3),
    (3, True, False, True, 2),
    (1, True, True, False, 0),
]
INPUTS = ["padded", "padded_h0", "unbatched", "packed_sorted", "packed_unsorted"]


def pair(kind, config, dtype=F64, seed=0):
    layers, bidirectional, batch_first, bias, proj = config
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias, dtype=dtype)
    if kind == "LSTM":
        kwargs["proj_size"] = proj
    torch.manual_seed(seed)
    ours = getattr(attnkit.nn, kind)(5, 6, **kwargs)
    theirs = getattr(torch.nn, kind)(5, 6, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_input(module, how, T=6, B=3):
    gen = torch.Generator().manual_seed(1)
    shape = (B, T, 5) if module.batch_first else (T, B, 5)
    x = torch.randn(*shape, generator=gen, dtype=F64, requires_grad=True)
    directions = 2 if module.bidirectional else 1
    out_size = getattr(module, "proj_size", 0) or module.hidden_size
    leaves = [x]
    hx = None
    if how == "unbatched":
        x = x[0] if module.batch_first else x[:, 0]
    if how in ("padded_h0", "unbatched", "packed_unsorted"):
        batch = () if how == "unbatched" else (B,)
        h0 = torch.randn(module.num_layers * directions, *batch, out_size, generator=gen, dtype=F64, requires_grad=True)
        leaves.append(h0)
        hx = h0
        if isinstance(module, torch.nn.LSTM):
            c0 = torch.randn(module.num_layers * directions, *batch, 6, generator=gen, dtype=F64, requires_grad=True)
            leaves.append(c0)
            hx = (h0, c0)
    if how.startswith("packed"):
        lengths = [6, 4, 1] if how == "packed_sorted" else [2, 6, 4]
        x = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=how == "packed_sorted")
    return x, hx, leaves


def flatten(result):
    output, hidden = result
    out = [output.data if isinstance(output, PackedSequence) else output]
    return out + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def weighted_sum(tensors):
    return sum((t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in tensors)


def assert_same_run(ours, theirs, x, hx, leaves):
    got, expected = flatten(ours(x, hx)), flatten(theirs(x, hx))
    assert [t.shape for t in got] == [t.shape for t in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    wrt = leaves + list(ours.parameters())
    grads = torch.autograd.grad(weighted_sum(got), wrt, retain_graph=True)
    grads_ref = torch.autograd.grad(weighted_sum(expected), leaves + list(theirs.parameters()), retain_graph=True)
    for g, e in zip(grads, grads_ref):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("how", INPUTS)
def test_outputs_and_all_gradients_match_torch(kind, config, how):
    if kind == "GRU" and config[4]:
        config = config[:4] + (0,)
    ours, theirs = pair(kind, config)
    x, hx, leaves = make_input(ours, how)
    assert_same_run(ours, theirs, x, hx, leaves)
    assert attnkit.last_dispatch(kind.lower()).backend == "cpp"


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (7, 1)])
def test_sequence_length_one_and_batch_one(kind, T, B):
    ours, theirs = pair(kind, (2, True, False, True, 0))
    x = torch.randn(T, B, 5, dtype=F64, requires_grad=True)
    assert_same_run(ours, theirs, x, None, [x])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_float32(kind):
    ours, theirs = pair(kind, (2, True, True, True, 0), dtype=torch.float32)
    x = torch.randn(4, 9, 5, requires_grad=True)
    got, expected = flatten(ours(x)), flatten(theirs(x))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_between_layers_in_training_only(kind):
    ours, theirs = pair(kind, (3, True, False, True, 0))
    ours.dropout = theirs.dropout = 1.0  # every inter-layer activation dropped: deterministic
    x = torch.randn(5, 2, 5, dtype=F64, requires_grad=True)
    assert_same_run(ours.train(), theirs.train(), x, None, [x])
    assert_same_run(ours.eval(), theirs.eval(), x, None, [x])  # no dropout in eval
    ours.dropout = 0.5
    ours.train()
    a, b = ours(x)[0], ours(x)[0]
    assert not torch.equal(a, b)  # random masks differ between calls


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_gradcheck_cpp_path(kind):
    ours, _ = pair(kind, (2, True, False, True, 2 if kind == "LSTM" else 0))
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
    params = list(ours.parameters())

    def run(x, *weights):
        packed = pack_padded_sequence(x, [2, 4, 3], enforce_sorted=False)
        with torch.nn.utils.stateless._reparametrize_module(ours, dict(zip(dict(ours.named_parameters()), weights))):
            return tuple(flatten(ours(packed)))

    with attnkit.use_backend("cpp"):
        assert torch.autograd.gradcheck(run, (x, *params))


def test_state_dict_and_parameters_are_torchs():
    ours, theirs = pair("LSTM", (2, True, False, True, 3))
    assert isinstance(ours, torch.nn.LSTM)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    other = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3, dtype=F64)
    ours.load_state_dict(other.state_dict())  # a torch.nn checkpoint loads as is
    x = torch.randn(4, 2, 5, dtype=F64)
    torch.testing.assert_close(flatten(ours(x)), flatten(other(x)))
    gru = attnkit.nn.GRU(5, 6, num_layers=2)
    gru.load_state_dict(torch.nn.GRU(5, 6, num_layers=2).state_dict())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]])  # the one-layer fast path and the stacked one
def test_functional_call_and_swapped_parameters_are_used(kind, config):
    """torch.func.functional_call (and parametrizations) swap a module's weights
    for a call: torch.nn re-reads them each forward, and so must the drop-in (a
    cached weight list would silently run the old ones)."""
    ours, theirs = pair(kind, config)
    x, hx, _ = make_input(ours, "padded")
    ours(x, hx)  # a call with the module's own weights first
    params = {name: torch.randn_like(p) for name, p in theirs.named_parameters()}
    got = torch.func.functional_call(ours, params, (x, hx))
    expected = torch.func.functional_call(theirs, params, (x, hx))
    torch.testing.assert_close(flatten(got), flatten(expected))
    with torch.no_grad():  # and an in-place swap of one Parameter object for another
        new_weight = torch.nn.Parameter(torch.randn_like(ours.weight_hh_l0))
    ours.weight_hh_l0 = new_weight
    theirs.weight_hh_l0 = torch.nn.Parameter(new_weight.detach().clone())
    torch.testing.assert_close(flatten(ours(x, hx)), flatten(theirs(x, hx)))
    for module in (ours, theirs):  # WeightDrop (AWD-LSTM): the Parameter deleted, a plain tensor set in its place
        del module.weight_hh_l0
        module.weight_hh_l0 = new_weight.detach() * 0.5
    torch.testing.assert_close(flatten(ours(x, hx)), flatten(theirs(x, hx)))
    for module in (ours, theirs):  # and a Parameter swapped in the dict itself, as torch.func's accessor can
        module._parameters["weight_ih_l0"] = torch.nn.Parameter(module.weight_ih_l0.detach() * -1)
    torch.testing.assert_close(flatten(ours(x, hx)), flatten(theirs(x, hx)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_from_torch_shares_parameters(kind):
    _, theirs = pair(kind, (2, True, True, True, 0))
    ours = getattr(attnkit.nn, kind).from_torch(theirs)
    assert type(ours) is getattr(attnkit.nn, kind)
    assert all(a is b for a, b in zip(ours.parameters(), theirs.parameters()))
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    assert_same_run(ours, theirs, x, None, [x])
    with pytest.raises(TypeError, match="expected a torch.nn"):
        getattr(attnkit.nn, kind).from_torch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_cell_matches_torch(batched, with_state, bias):
    torch.manual_seed(0)
    ours = attnkit.nn.GRUCell(5, 7, bias=bias, dtype=F64)
    theirs = torch.nn.GRUCell(5, 7, bias=bias, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*((3, 5) if batched else (5,)), dtype=F64, requires_grad=True)
    hx = torch.randn(*((3, 7) if batched else (7,)), dtype=F64, requires_grad=True) if with_state else None
    h, h_ref = ours(x, hx), theirs(x, hx)
    torch.testing.assert_close(h, h_ref)
    leaves = [x] + ([hx] if with_state else [])
    grads = torch.autograd.grad(weighted_sum([h]), leaves + list(ours.parameters()))
    grads_ref = torch.autograd.grad(weighted_sum([h_ref]), leaves + list(theirs.parameters()))
    for g, e in zip(grads, grads_ref):
        torch.testing.assert_close(g, e)


class TestErrorsLikeTorch:
    @pytest.mark.parametrize("kind", ["LSTM", "GRU"])
    def test_wrong_input_size(self, kind):
        ours, theirs = pair(kind, CONFIGS[0])
        x = torch.randn(3, 2, 4, dtype=F64)
        for module in (ours, theirs):
            with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size. Expected 5, got 4"):
                module(x)

    def test_wrong_hidden_shape(self):
        ours, theirs = pair("LSTM", CONFIGS[1])
        x = torch.randn(2, 3, 5, dtype=F64)
        hx = (torch.zeros(4, 3, 6, dtype=F64), torch.zeros(4, 3, 6, dtype=F64))
        for module in (ours, theirs):
            with pytest.raises(RuntimeError, match="Expected hidden\\[0\\] size \\(4, 2, 6\\), got \\[4, 3, 6\\]"):
                module(x, hx)

    @pytest.mark.parametrize("kind", ["LSTM", "GRU"])
    def test_wrong_rank(self, kind):
        ours, _ = pair(kind, CONFIGS[0])
        with pytest.raises(ValueError, match=f"{kind}: Expected input to be 2D or 3D, got 4D instead"):
            ours(torch.randn(1, 2, 3, 5, dtype=F64))
        with pytest.raises(RuntimeError, match="For batched 3-D input, hx"):
            hx = torch.zeros(1, 6, dtype=F64)
            ours(torch.randn(3, 2, 5, dtype=F64), (hx, hx) if kind == "LSTM" else hx)

    def test_dtype_mismatch(self):
        # torch's own error, whose type and text changed across releases (a RuntimeError "input must
        # have the type torch.float64" up to 2.6, a ValueError "input dtype ... does not match" since)
        ours, theirs = pair("GRU", CONFIGS[0])
        with pytest.raises((ValueError, RuntimeError)) as torch_error:
            theirs(torch.randn(3, 2, 5))
        assert "torch.float32" in str(torch_error.value)
        with pytest.raises(type(torch_error.value), match=re.escape(str(torch_error.value))):
            ours(torch.randn(3, 2, 5))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("how", ["padded", "packed_unsorted"])
def test_batch_one_float32_matches_torch(kind, how):
    """Batch 1-2 in float32 at a hidden size with whole weight panels (issue 6's
    B = 1 benchmark shape, shorter), bidirectional and 2 layers: outputs and
    every gradient vs torch.nn.LSTM / GRU."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True)
    ours, theirs = getattr(attnkit.nn, kind)(32, 128, **kwargs), getattr(torch.nn, kind)(32, 128, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    B = 1 if how == "padded" else 2
    x = torch.randn(24, B, 32, requires_grad=True)
    inp = x if how == "padded" else pack_padded_sequence(x, [11, 24], enforce_sorted=False)
    got, expected = flatten(ours(inp)), flatten(theirs(inp))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5)
    grads = torch.autograd.grad(weighted_sum(got), [x, *ours.parameters()], retain_graph=True)  # the packing is shared
    grads_ref = torch.autograd.grad(weighted_sum(expected), [x, *theirs.parameters()])
    for g, e in zip(grads, grads_ref):
        torch.testing.assert_close(g, e, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]])  # the one-layer fast path and the stacked one
def test_bias_gradients_are_separate_tensors(kind, config):
    """torch gives b_ih and b_hh a gradient tensor each; the LSTM returned one tensor
    for both, so an in-place change of one (a hook, an optimizer step on
    autograd.grad's results) changed the other."""
    ours, theirs = pair(kind, config)
    x, hx, _ = make_input(ours, "padded")
    names = [name for name, _ in ours.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(weighted_sum(flatten(ours(x, hx))), list(ours.parameters()))))
    expected = dict(zip(names, torch.autograd.grad(weighted_sum(flatten(theirs(x, hx))), list(theirs.parameters()))))
    assert grads["bias_ih_l0"] is not grads["bias_hh_l0"]
    grads["bias_ih_l0"].zero_()
    torch.testing.assert_close(grads["bias_hh_l0"], expected["bias_hh_l0"])
    for module in (ours, theirs):
        module.bias_ih_l0.register_hook(lambda g: g.mul_(0))
        weighted_sum(flatten(module(x, hx))).backward()
    torch.testing.assert_close(ours.bias_hh_l0.grad, theirs.bias_hh_l0.grad)
    assert ours.bias_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_from_torch_copies_hook_containers(kind):
    """from_torch shares the Parameters but not the hook dicts: a hook registered on
    the attnkit module fired on the torch one, and weight_norm (which deletes the
    Parameter and adds a pre-hook) broke the torch module."""
    _, theirs = pair(kind, CONFIGS[0])
    calls = []
    theirs.register_forward_hook(lambda *_: calls.append("before"))  # carried over
    ours = getattr(attnkit.nn, kind).from_torch(theirs)
    ours.register_forward_hook(lambda *_: calls.append("ours"))
    ours.register_forward_pre_hook(lambda *_: calls.append("ours pre"))
    x = torch.randn(4, 3, 5, dtype=F64)
    expected = flatten(theirs(x))
    assert calls == ["before"]
    calls.clear()
    ours(x)
    assert calls == ["ours pre", "before", "ours"]
    calls.clear()
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(ours, "weight_hh_l0")
    assert "weight_hh_l0" in dict(theirs.named_parameters())
    torch.testing.assert_close(flatten(theirs(x)), expected)
    assert calls == ["before"]
    reference = copy.deepcopy(theirs)
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(reference, "weight_hh_l0")
    torch.testing.assert_close(flatten(ours(x)), flatten(reference(x)))


def test_gru_cell_errors_name_the_cell_and_the_shapes_passed():
    """GRUCell runs ops.gru on a one-step sequence: its errors named attnkit.ops.gru
    and the 3-D shapes it was given ("input shape (1, 2, 6)")."""
    cell = attnkit.nn.GRUCell(5, 4)
    cases = [
        ((torch.randn(2, 6), None),
         "GRUCell: input has 6 features but weight_ih expects input_size 5 (input shape (2, 6))"),
        ((torch.randn(6), None), "GRUCell: input has 6 features but weight_ih expects input_size 5 (input shape (6,))"),
        ((torch.randn(5), torch.randn(2, 4)),
         "GRUCell: hx must have shape (4,) (hidden_size) for unbatched 1-D input of shape (5,), got (2, 4)"),
        ((torch.randn(2, 5), torch.randn(3, 4)),
         "GRUCell: hx must have shape (2, 4) (batch, hidden_size) for batched 2-D input of shape (2, 5), got (3, 4)"),
        ((torch.randn(2, 5), torch.randn(4)),
         "GRUCell: hx must have shape (2, 4) (batch, hidden_size) for batched 2-D input of shape (2, 5), got (4,)"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError):
            torch.nn.GRUCell(5, 4)(*args)  # torch rejects each too
        with pytest.raises(ValueError) as info:
            cell(*args)
        assert str(info.value) == message
    with pytest.raises(TypeError, match="^GRUCell: hx has dtype torch.float64 but input has torch.float32"):
        cell(torch.randn(5), torch.randn(4, dtype=F64))


AUTOCAST_CASES = [  # (kind, config, input dtype, hx dtype or None)
    ("LSTM", CONFIGS[0], torch.float32, None),
    ("LSTM", CONFIGS[1], torch.float32, torch.float32),
    ("LSTM", CONFIGS[0], torch.bfloat16, None),
    ("GRU", CONFIGS[0], torch.float32, None),
    ("GRU", CONFIGS[1], torch.float32, torch.float32),
    ("GRU", CONFIGS[0], torch.bfloat16, None),
    ("GRU", CONFIGS[0], torch.float32, torch.bfloat16),
    ("GRUCell", None, torch.float32, None),
    ("GRUCell", None, torch.bfloat16, None),
    ("GRUCell", None, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("kind,config,dtype,state", AUTOCAST_CASES, ids=str)
def test_cpu_autocast_follows_torch(kind, config, dtype, state):
    """torch 2.14 under CPU autocast (bfloat16), measured: LSTM runs in bfloat16
    (mkldnn_rnn_layer is on the lower-precision list); GRU and GRUCell run their
    matmuls in bfloat16 but return the state's dtype (the input's without hx).
    The C++ kernels failed there on autocast's casts ("expected scalar type Float")."""
    torch.manual_seed(0)
    if kind == "GRUCell":
        ours, theirs = attnkit.nn.GRUCell(5, 6), torch.nn.GRUCell(5, 6)
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(3, 5).to(dtype)
        hx = None if state is None else torch.randn(3, 6).to(state)
    else:
        ours, theirs = pair(kind, config, dtype=torch.float32)
        x, hx, _ = make_input(ours, "padded_h0" if state else "padded")
        x = x.detach().to(dtype)
        if state is not None:
            hx = tuple(h.detach().to(state) for h in hx) if kind == "LSTM" else hx.detach().to(state)
    atol, rtol = TOLERANCES[torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = ours(x, hx), theirs(x, hx)
    got, expected = ([got], [expected]) if kind == "GRUCell" else (flatten(got), flatten(expected))
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    if kind == "LSTM":
        assert all(t.dtype == torch.bfloat16 for t in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e.float(), atol=atol, rtol=rtol)
    grads = torch.autograd.grad(weighted_sum([t.float() for t in got]), list(ours.parameters()))
    grads_ref = torch.autograd.grad(weighted_sum([t.float() for t in expected]), list(theirs.parameters()))
    for g, e in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=atol * RNN_GRAD_FACTOR, rtol=rtol * RNN_GRAD_FACTOR)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cpu_autocast_packed_input(kind):
    """PackedSequence under CPU autocast: torch runs a packed LSTM composite, as its GRU, so
    its outputs and states stay float32 (only the padded LSTM takes oneDNN's op, which autocast
    lowers); the packed LSTM returned bfloat16. Values as torch's, to its bfloat16 matmuls."""
    ours, theirs = pair(kind, CONFIGS[1], dtype=torch.float32)
    x = torch.randn(3, 6, 5)
    packed = pack_padded_sequence(x, [6, 4, 1], batch_first=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_all, want_all = flatten(ours(packed)), flatten(theirs(packed))
        single = ours(x[1:2, :4])[0]
    assert single.dtype == (torch.bfloat16 if kind == "LSTM" else torch.float32)
    atol, rtol = TOLERANCES[torch.bfloat16]
    for got, expected in zip(got_all, want_all):
        assert got.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_dropout_between_layers_draws_torchs_mask(kind):
    """Dropout between layers on a PackedSequence: torch draws the mask over the packed rows;
    the same seed gives the same output and leaves the generator in the same state."""
    ours, theirs = pair(kind, (2, False, False, True, 0))
    ours.dropout = theirs.dropout = 0.5
    x = torch.randn(6, 3, 5, dtype=F64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), enforce_sorted=False)
    results = []
    for module in (ours, theirs):
        torch.manual_seed(7)
        results.append((module(packed)[0].data, torch.rand(3)))
    (out, after), (expected, expected_after) = results
    torch.testing.assert_close(out, expected)
    assert torch.equal(after, expected_after)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_functional_call_with_weights_of_another_dtype(kind):
    """torch.func.functional_call swaps the weights: the dtype check must read the new ones."""
    ours, theirs = pair(kind, (2, False, False, True, 0), dtype=torch.float32)
    doubles = {name: value.double() for name, value in theirs.state_dict().items()}
    x = torch.randn(4, 2, 5, dtype=F64)
    out = torch.func.functional_call(ours, doubles, (x,))[0]
    torch.testing.assert_close(out, torch.func.functional_call(theirs, doubles, (x,))[0])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "GRUCell"])
def test_jit_trace_passes_its_check_and_a_no_grad_trace_differentiates(kind):
    """The RNN ops' `save` flag is a constant of a traced graph: tracing saves always."""
    torch.manual_seed(0)
    module = getattr(attnkit.nn, kind)(5, 6, dtype=F64)
    x = torch.randn(3, 2, 5, dtype=F64) if kind != "GRUCell" else torch.randn(2, 5, dtype=F64)
    torch.jit.trace(module, (x,))  # its default check reruns the module with grad off
    with torch.no_grad():
        traced = torch.jit.trace(module, (x,))
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    grads = torch.autograd.grad(first(traced(x)).sum(), list(module.parameters()))
    expected = torch.autograd.grad(first(module(x)).sum(), list(module.parameters()))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_from_torch_refuses_a_parametrized_module():
    module = torch.nn.LSTM(4, 5)
    torch.nn.utils.parametrizations.weight_norm(module, "weight_hh_l0")
    with pytest.raises(TypeError, match="from_torch: the module has parametrizations"):
        attnkit.nn.LSTM.from_torch(module)


def test_lstm_hx_must_hold_two_states():
    with pytest.raises(RuntimeError, match=r"hx must be a tuple \(h_0, c_0\) of two tensors, got 3"):
        attnkit.nn.LSTM(5, 6, num_layers=2)(torch.randn(3, 2, 5), (torch.zeros(2, 2, 6),) * 3)


@pytest.mark.parametrize("num_layers,batch_first", [(1, False), (2, True)])
def test_gru_output_may_be_edited_in_place_before_backward(num_layers, batch_first):
    """torch.nn.GRU trains through `out += skip` or out.masked_fill_(...); the fused op saved
    the output it returned, so backward raised that a saved tensor was modified."""
    torch.manual_seed(0)
    ours = attnkit.nn.GRU(3, 4, num_layers=num_layers, batch_first=batch_first)
    theirs = torch.nn.GRU(3, 4, num_layers=num_layers, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    grads = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        out, h = module(leaf)
        out += 1
        out.masked_fill_(out > 1.2, 0)
        (out.square().sum() + h.sum()).backward()
        grads.append((out.detach(), leaf.grad, module.weight_hh_l0.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


def test_lstm_cell_state_may_be_clipped_in_place():
    """c.clamp_() after torch.nn.LSTMCell trains; the fused op saved the c it returned."""
    torch.manual_seed(0)
    ours, theirs = attnkit.nn.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3)
    grads = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        h, c = module(leaf)
        c.clamp_(-0.05, 0.05)
        (h.sum() + c.square().sum()).backward()
        grads.append((leaf.grad, module.weight_ih.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("call", ["LSTM-T0", "GRU-h0-dtype", "LSTMCell-size", "GRUCell-dtype", "Linear-size", "SDPA-mask"])
def test_drop_in_errors_are_runtime_errors_as_torchs(call):
    """Where torch raises RuntimeError for bad input, a caller's `except RuntimeError:` catches
    the drop-in's error too (a ValueError/TypeError that is also a RuntimeError)."""
    x = torch.randn(3, 2, 4)
    runs = {
        "LSTM-T0": lambda nn: nn.LSTM(4, 5)(torch.randn(0, 2, 4)),
        "GRU-h0-dtype": lambda nn: nn.GRU(4, 5)(x, torch.zeros(1, 2, 5, dtype=torch.float64)),
        "LSTMCell-size": lambda nn: nn.LSTMCell(4, 5)(torch.randn(2, 3)),
        "GRUCell-dtype": lambda nn: nn.GRUCell(4, 5)(torch.randn(2, 4, dtype=torch.float64)),
        "Linear-size": lambda nn: nn.Linear(4, 5)(torch.randn(2, 3)),
        "SDPA-mask": lambda nn: (attnkit.scaled_dot_product_attention if nn is attnkit.nn else
                                 torch.nn.functional.scaled_dot_product_attention)(x, x, x, torch.zeros(5, 5)),
    }
    for nn in (torch.nn, attnkit.nn):
        with pytest.raises(RuntimeError):
            runs[call](nn)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gru_bias_may_be_edited_in_place_before_backward(backend):
    """torch.nn.GRU's backward needs no bias, so a hook or clamp_ may edit one between forward
    and backward; the fused op saved the biases, and backward raised."""
    torch.manual_seed(0)
    ours = attnkit.nn.GRU(3, 4, num_layers=2, bidirectional=True)
    theirs = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    grads = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        with attnkit.use_backend(backend):
            out, h = module(leaf)
        with torch.no_grad():
            module.bias_hh_l0.add_(1.0)
            module.bias_ih_l1_reverse.mul_(2.0)
        (out.square().sum() + h.sum()).backward()
        grads.append((leaf.grad, module.bias_hh_l0.grad, module.weight_hh_l1.grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("kind,with_state", [("LSTMCell", False), ("LSTMCell", True)])
def test_weight_hh_may_be_edited_before_backward_where_the_state_needs_no_grad(backend, kind, with_state):
    """One step from a state that needs no gradient: weight_hh enters only the state's gradient,
    so torch lets it be edited in place before backward; the op saved it, and backward raised.
    (GRU(Cell) still saves it: its reference backward recomputes the step from weight_hh.)"""
    torch.manual_seed(0)
    ours = getattr(attnkit.nn, kind)(3, 4)
    theirs = getattr(torch.nn, kind)(3, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 2, 3) if kind == "GRU" else torch.randn(2, 3)
    state = None
    if with_state:
        state = (torch.randn(2, 4), torch.randn(2, 4)) if kind == "LSTMCell" else torch.randn(2, 4)
    grads = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        with attnkit.use_backend(backend):
            out = module(leaf, state)
        out = out[0] if isinstance(out, tuple) else out
        weight_hh = module.weight_hh_l0 if kind == "GRU" else module.weight_hh
        with torch.no_grad():
            weight_hh.mul_(3.0)
        out.square().sum().backward()
        grads.append((leaf.grad, weight_hh.grad, module.parameters().__next__().grad))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype,proj_size,num_layers", [(torch.float32, 2, 1), (torch.float64, 0, 2),
                                                        (torch.float16, 0, 1)])
def test_lstm_output_may_be_edited_in_place_where_torch_allows(dtype, proj_size, num_layers):
    """torch.nn.LSTM's CPU path (all but oneDNN's float32/bfloat16 without projections) lets
    `out.mul_(2)` precede backward; the fused op saved the output it returned, and raised."""
    torch.manual_seed(0)
    ours = attnkit.nn.LSTM(3, 4, num_layers=num_layers, proj_size=proj_size).to(dtype)
    theirs = torch.nn.LSTM(3, 4, num_layers=num_layers, proj_size=proj_size).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=dtype)
    grads = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        out, (h, c) = module(leaf)
        out.mul_(2)
        (out.square().sum() + c.sum()).backward()
        grads.append((out.detach(), leaf.grad, module.weight_hh_l0.grad))
    tol = {"atol": 2e-3, "rtol": 2e-3} if dtype == torch.float16 else {}
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LayerNormLSTM"])
def test_parametrized_weights_are_computed_once_a_forward_as_torch(kind):
    """A parametrization runs once per weight and forward, as in torch.nn: _stack read
    all_weights per layer and direction, which computes every weight at each read, so
    spectral_norm's power iteration ran 3x as often and its outputs drifted from torch's."""
    from torch.nn.utils.parametrizations import spectral_norm

    calls = {}

    class Counted(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, weight):
            calls[self.name] = calls.get(self.name, 0) + 1
            return weight * 1.5

    torch.manual_seed(0)
    cls = getattr(attnkit.nn, kind)
    ours = cls(4, 5, num_layers=2, bidirectional=True)
    torch.nn.utils.parametrize.register_parametrization(ours, "weight_hh_l1_reverse", Counted("ours"))
    x = torch.randn(3, 2, 4)
    theirs = getattr(torch.nn, kind.replace("LayerNorm", ""))(4, 5, num_layers=2, bidirectional=True)
    torch.nn.utils.parametrize.register_parametrization(theirs, "weight_hh_l1_reverse", Counted("theirs"))
    theirs(x)
    ours(x)
    assert calls["ours"] == calls["theirs"]

    if kind == "LayerNormLSTM":
        return
    ours, theirs = getattr(attnkit.nn, kind)(4, 5, num_layers=2), getattr(torch.nn, kind)(4, 5, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    for module in (ours, theirs):
        torch.manual_seed(1)  # the same initial power-iteration vectors
        spectral_norm(module, "weight_hh_l0")
    for _ in range(3):  # training mode: each forward advances the power iteration
        torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-6, rtol=1e-6)
