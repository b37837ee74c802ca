"""batchnorm.torch's LayerNorm, RMSNorm, GroupNorm and InstanceNorm1d/2d/3d drop-ins against
torch's own modules on the same parameters and data: forward, backward, running statistics,
state_dict, repr, gradcheck, convert / revert, the batchnorm:: ops (opcheck, torch.compile,
torch.export) and TorchScript (script and trace run torch's own op).

Each eager comparison also checks that batchnorm's kernels ran (the batchnorm:: ops in the
profiler), so a silent fallback to torch cannot pass for the kernels.
"""

import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm.torch as bnt  # noqa: E402
from batchnorm import _torch_norm_ops as ops  # noqa: E402
from helpers import error_of, last_two_swapped  # noqa: E402

DTYPES = [torch.float32, torch.float64]
# per dtype: (rtol, atol) for outputs and for gradients (sums over many elements)
TOL = {torch.float32: ((1e-5, 1e-5), (1e-4, 1e-4)), torch.float64: ((1e-12, 1e-12), (1e-11, 1e-11))}

# (class name, constructor args, kwargs, input shape, op the kernels run in training)
CASES = [
    ("LayerNorm", (16,), {}, (4, 5, 16), "layer_norm"),
    ("LayerNorm", ((5, 16),), {"bias": False}, (4, 5, 16), "layer_norm"),
    ("LayerNorm", (16,), {"elementwise_affine": False}, (3, 16), "layer_norm"),
    ("RMSNorm", (16,), {}, (4, 5, 16), "layer_norm"),
    ("RMSNorm", ((5, 16),), {"eps": 1e-6}, (4, 5, 16), "layer_norm"),
    ("GroupNorm", (4, 12), {}, (3, 12, 5, 6), "group_norm"),
    ("GroupNorm", (3, 6), {"affine": False}, (2, 6, 7), "group_norm"),
    ("InstanceNorm1d", (6,), {"affine": True, "track_running_stats": True}, (3, 6, 9), "instance_norm_train"),
    ("InstanceNorm2d", (6,), {}, (3, 6, 5, 4), "instance_norm_train"),
    ("InstanceNorm2d", (6,), {"affine": True, "track_running_stats": True, "momentum": None}, (3, 6, 5, 4),
     "instance_norm_train"),
    ("InstanceNorm3d", (4,), {"affine": True}, (2, 4, 3, 4, 5), "instance_norm_train"),
]
CASE_IDS = [f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[2].items()) or 'default'}" for c in CASES]


def pair(name, args, kwargs, dtype, seed=0):
    """(torch's module, batchnorm's drop-in) with the same random parameters and statistics."""
    torch.manual_seed(seed)
    ref = getattr(torch.nn, name)(*args, **kwargs).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        for key in ("running_mean", "running_var"):
            if getattr(ref, key, None) is not None:
                getattr(ref, key).uniform_(0.5, 1.5)
    ours = getattr(bnt, name)(*args, **kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def data(shape, dtype, seed=1):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3 + 2)


def ops_run(fn):
    """``fn()`` and the names of the batchnorm:: ops it ran."""
    with torch.profiler.profile() as prof:
        result = fn()
    return result, {e.name for e in prof.events() if e.name.startswith("batchnorm::")}


def assert_states_match(ours, ref, tol):
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (key, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1], msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("name,args,kwargs,shape,op", CASES, ids=CASE_IDS)
def test_matches_torch(name, args, kwargs, shape, op, dtype, training):
    ref, ours = pair(name, args, kwargs, dtype)
    assert repr(ours) == repr(ref) and isinstance(ours, type(ref))
    out_tol, grad_tol = TOL[dtype]
    for step in range(2):  # twice: running statistics carry over
        ref.train(training)
        ours.train(training)
        x_ref = data(shape, dtype, seed=step).requires_grad_(True)
        x = x_ref.detach().clone().requires_grad_(True)
        y_ref = ref(x_ref)
        y, names = ops_run(lambda: ours(x))
        torch.testing.assert_close(y, y_ref, rtol=out_tol[0], atol=out_tol[1])
        uses_running = name.startswith("Instance") and not training and ours.track_running_stats
        assert f"batchnorm::{'batch_norm_eval' if uses_running else op}" in names
        grad = data(shape, dtype, seed=10 + step)
        y_ref.backward(grad)
        y.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=grad_tol[0], atol=grad_tol[1])
        for (key, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=grad_tol[0], atol=grad_tol[1], msg=key)
        assert_states_match(ours, ref, out_tol)


# (case, parameter) for every parameter of every case
PARAM_CASES = [(c, p) for c in CASES for p in ("weight", "bias")
               if c[2].get("affine", c[0] in ("LayerNorm", "RMSNorm", "GroupNorm")) and c[2].get("elementwise_affine", True)
               and (p == "weight" or (c[0] != "RMSNorm" and c[2].get("bias", True)))]


def _step_after_update(module, x, param, create_graph, functional):
    """Forward, an in-place update of ``param``, backward: the error's text, or the gradients."""
    y = module(x) if not functional else bnt.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)
    with torch.no_grad():
        getattr(module, param).add_(0.5)
    try:
        grads = torch.autograd.grad(y.pow(2).sum(), [x, *module.parameters()], create_graph=create_graph)
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return "in-place error"
    return grads


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "double-backward-graph"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case,param", PARAM_CASES, ids=[f"{CASE_IDS[CASES.index(c)]}-{p}" for c, p in PARAM_CASES])
def test_parameter_updated_between_forward_and_backward(case, param, training, create_graph):
    """A parameter updated in place after the forward (a GAN's discriminator step, an EMA):
    where torch's backward runs (a group norm's bias, an instance norm's weight and bias,
    whose copy torch's instance norm uses), so does the drop-in's, with torch's gradients
    (float64, the values of the forward); where torch raises for a weight it saved, so does
    it. A bias enters no gradient: torch's layer norm saves it and raises, the drop-in keeps
    none and gives the gradients of the forward (torch's, without the update)."""
    name, args, kwargs, shape, _ = case
    for functional in [False, True] if name == "GroupNorm" else [False]:
        ref, ours = pair(name, args, kwargs, torch.float64)
        ref.train(training)
        ours.train(training)
        x_ref = data(shape, torch.float64).requires_grad_(True)
        x = x_ref.detach().clone().requires_grad_(True)
        expected = _step_after_update(ref, x_ref, param, create_graph, False)
        if isinstance(expected, str) and param == "bias":
            ref = pair(name, args, kwargs, torch.float64)[0].train(training)  # not updated
            expected = torch.autograd.grad(ref(x_ref).pow(2).sum(), [x_ref, *ref.parameters()])
        got = _step_after_update(ours, x, param, create_graph, functional)
        if isinstance(expected, str):
            assert got == expected
            continue
        assert not isinstance(got, str), f"torch's backward ran, the drop-in's raised ({functional=})"
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name,args,kwargs,shape,op", CASES, ids=CASE_IDS)
def test_gradcheck(name, args, kwargs, shape, op):
    _, ours = pair(name, args, kwargs, torch.float64)
    x = data((2,) + shape[1:], torch.float64).requires_grad_(True)
    params = tuple(ours.parameters())
    ours.train()

    def fn(x, *p):
        return torch.func.functional_call(ours, dict(zip([k for k, _ in ours.named_parameters()], p)), (x,))

    if getattr(ours, "track_running_stats", False):  # gradcheck calls forward repeatedly
        ours.momentum = 0.0
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_channels_last_and_unbatched_inputs():
    ref, ours = pair("GroupNorm", (2, 8), {}, torch.float32)
    x = data((2, 8, 5, 6), torch.float32).to(memory_format=torch.channels_last).requires_grad_(True)
    y, names = ops_run(lambda: ours(x))
    assert "batchnorm::group_norm" in names and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    ref, ours = pair("InstanceNorm2d", (8,), {"affine": True, "track_running_stats": True}, torch.float32)
    x = data((8, 5, 6), torch.float32)  # (C, H, W): one sample
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert_states_match(ours, ref, (1e-6, 1e-6))


LAYOUT_CASES = [  # (class name, constructor args, kwargs, shape, how the input is laid out in memory)
    ("InstanceNorm2d", (6,), {"affine": True}, (2, 6, 5, 4), "channels_last"),
    ("InstanceNorm3d", (6,), {"affine": True, "track_running_stats": True}, (2, 6, 3, 4, 5), "channels_last_3d"),
    ("InstanceNorm1d", (6,), {}, (3, 6, 9), "transposed"),
    ("RMSNorm", (5,), {}, (2, 6, 4, 5), "channels_last"),
    ("RMSNorm", (9,), {}, (3, 6, 9), "transposed"),
    ("GroupNorm", (3, 6), {}, (2, 6, 5, 4), "channels_last"),
    ("GroupNorm", (3, 6), {}, (2, 6, 5, 4), "transposed"),
    ("GroupNorm", (2, 6), {}, (3, 6, 9), "transposed"),
    # NWHC memory with a size-1 height: channels_last-contiguous, but torch suggests contiguous
    # (and so does its group norm). (torch 2.13's own BatchNorm2d gives wrong input gradients
    # for this input, up to 1.7 off the float64 ones; batchnorm's match them to 1e-7.)
    ("GroupNorm", (3, 6), {}, (2, 6, 1, 4), "nwhc"),
    ("GroupNorm", (3, 6), {}, (2, 6, 4, 1), "nwhc"),
    ("LayerNorm", (4,), {}, (2, 6, 5, 4), "channels_last"),
    ("LayerNorm", (9,), {}, (3, 6, 9), "transposed"),
]


def layout_strides(t):
    """The strides that place elements: those of dimensions longer than 1."""
    return tuple(st for size, st in zip(t.shape, t.stride()) if size > 1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,args,kwargs,shape,layout", LAYOUT_CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in LAYOUT_CASES])
def test_output_memory_format_is_torchs(name, args, kwargs, shape, layout, training, compiled):
    """Outputs and input gradients have the strides of torch's: channels_last kept by group and
    RMS norm, made contiguous by instance and layer norm; other dense orders contiguous. The
    same under torch.compile, against torch's module compiled (the layout fix-up was skipped
    there: a channels_last InstanceNorm2d output could not be .view()ed)."""
    ref, ours = pair(name, args, kwargs, torch.float32)
    ref.train(training)
    ours.train(training)
    if compiled:
        torch._dynamo.reset()
        ref, ours = torch.compile(ref), torch.compile(ours)
    x = data(shape, torch.float32)
    if layout == "transposed":
        x = last_two_swapped(x)
    elif layout == "nwhc":
        x = x.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    else:
        x = x.to(memory_format=getattr(torch, layout))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    assert layout_strides(ya) == layout_strides(yb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    gy = data(shape, torch.float32, seed=2)
    ya.backward(gy)
    yb.backward(gy)
    assert layout_strides(xa.grad) == layout_strides(xb.grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


def test_rms_norm_default_eps_is_the_dtype_epsilon():
    for dtype in DTYPES:
        ref, ours = pair("RMSNorm", (4,), {}, dtype)
        x = torch.full((2, 4), 1e-5, dtype=dtype)  # tiny values: eps decides the result
        torch.testing.assert_close(ours(x), ref(x), rtol=TOL[dtype][0][0], atol=0.0)


def test_torch_keeps_what_the_kernels_do_not_take():
    """float64 input to a float32 module, a shape mismatch, one value per instance in training:
    torch's result or error (half tensors run on the kernels: tests/test_half_norms.py)."""
    ref, ours = pair("LayerNorm", (8,), {}, torch.float32)
    x = data((2, 8), torch.float64)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError):
        ops_run(lambda: ours(x))
    with pytest.raises(RuntimeError, match="normalized_shape"):
        ours.float()(torch.ones(2, 7))
    _, inorm = pair("InstanceNorm1d", (3,), {}, torch.float32)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        inorm(torch.ones(2, 3, 1))
    _, gn = pair("GroupNorm", (2, 4), {}, torch.float32)
    with pytest.raises(RuntimeError, match="channels"):
        gn(torch.ones(2, 6, 3))
    # torch's count of values per group (N*C // G times the spatial sizes), its words
    for shape, groups in [((1, 4), 4), ((1, 4, 1), 4), ((1, 2), 2)]:
        x = torch.ones(shape)
        with pytest.raises(ValueError) as expected:
            torch.nn.functional.group_norm(x, groups)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            bnt.GroupNorm(groups, shape[1])(x)
        with pytest.raises(ValueError, match=re.escape(str(expected.value))):
            bnt.group_norm(x, groups)


@pytest.mark.parametrize("name,args,kwargs,shape,op", CASES, ids=CASE_IDS)
def test_bool_eps_and_momentum_are_torchs_numbers(name, args, kwargs, shape, op):
    """torch reads eps=True and momentum=True as 1.0 (the kernels' bindings take no bool):
    torch's results and state, before and after the module's views are cached."""
    ref, ours = pair(name, args, kwargs, torch.float32)
    x = data(shape, torch.float32)
    torch.testing.assert_close(ours(x), ref(x))
    for attr in ("eps", "momentum"):
        if hasattr(ref, attr) and getattr(ref, attr) is not None:
            setattr(ref, attr, True)
            setattr(ours, attr, True)
            torch.testing.assert_close(ours(x), ref(x))
            assert_states_match(ours, ref, TOL[torch.float32][0])


def test_bool_eps_and_momentum_in_the_functional_forms():
    x, w, b = data((3, 4, 5), torch.float32), torch.rand(4) + 0.5, torch.rand(4)
    F = torch.nn.functional
    calls = [
        lambda f, m: f.layer_norm(x, (5,), w[:1].expand(5).clone(), None, eps=True),
        lambda f, m: f.rms_norm(x, (5,), None, eps=True),
        lambda f, m: f.group_norm(x, 2, w, b, eps=True),
        lambda f, m: f.instance_norm(x, m[0], m[1], w, b, True, momentum=True, eps=True),
        lambda f, m: f.batch_norm(x, m[0], m[1], w, b, True, momentum=True, eps=True),
    ]
    for call in calls:
        stats = [torch.zeros(4), torch.ones(4)], [torch.zeros(4), torch.ones(4)]
        torch.testing.assert_close(call(bnt, stats[0]), call(F, stats[1]))
        torch.testing.assert_close(stats[0], stats[1])


def test_scalars_of_other_types_get_torchs_result_or_error():
    """A scalar argument that is not a plain number (None, a string, a 0-d tensor, a float
    num_groups): torch's function runs, with its result or its error in its words."""
    x, rm, rv = data((4, 3, 5), torch.float32), torch.zeros(3), torch.ones(3)
    F = torch.nn.functional
    calls = [
        lambda f: f.batch_norm(x, rm.clone(), rv.clone(), training=True, momentum=None),
        lambda f: f.batch_norm(x, rm.clone(), rv.clone(), eps=torch.tensor(1e-3)),
        lambda f: f.instance_norm(x, eps=None),
        lambda f: f.layer_norm(x, (5,), eps="1e-5"),
        lambda f: f.rms_norm(x, (5,), eps="1e-5"),
        lambda f: f.group_norm(x, 3, eps=None),
        lambda f: f.group_norm(x, 1.5),
    ]
    for call in calls:
        try:
            expected = call(F)
        except Exception as error:
            with pytest.raises(type(error), match=re.escape(str(error))):
                call(bnt)
        else:
            torch.testing.assert_close(call(bnt), expected)
    for nn in (torch.nn, bnt):  # a module's eps as a 0-d tensor: its eval backward too
        m = nn.BatchNorm1d(3).eval()
        m.eps = torch.tensor(1e-3)
        xg = x[..., 0].clone().requires_grad_()
        m(xg).sum().backward()
        torch.testing.assert_close(xg.grad, torch.full((4, 3), (1 + 1e-3) ** -0.5))


def test_non_tensor_input_gets_torchs_error():
    x = data((3, 4, 5), torch.float32)
    F = torch.nn.functional
    calls = [
        lambda f: f.rms_norm(x.numpy(), (5,)),
        lambda f: f.layer_norm(x.tolist(), (5,)),
        lambda f: f.group_norm(x.numpy(), 2),
        lambda f: f.batch_norm(x.tolist(), torch.zeros(4), torch.ones(4)),
    ]
    for call in calls:
        with pytest.raises(Exception) as expected:
            call(F)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            call(bnt)
    for make in (lambda m: m.RMSNorm(5), lambda m: m.LayerNorm(5), lambda m: m.BatchNorm1d(4).eval()):
        with pytest.raises(Exception) as expected:
            make(torch.nn)(None)
        with pytest.raises(type(expected.value)):
            make(bnt)(None)


INFERENCE_MAKERS = {
    "BatchNorm2d": lambda nn: nn.BatchNorm2d(3), "BatchNorm2d-cumulative": lambda nn: nn.BatchNorm2d(3, momentum=None),
    "LayerNorm": lambda nn: nn.LayerNorm(5), "GroupNorm": lambda nn: nn.GroupNorm(1, 3),
    "InstanceNorm2d": lambda nn: nn.InstanceNorm2d(3, affine=True),
    "InstanceNorm2d-tracked": lambda nn: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
    "RMSNorm": lambda nn: nn.RMSNorm(5),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("made", ["input", "model", "model-and-input"])
@pytest.mark.parametrize("name", sorted(INFERENCE_MAKERS))
def test_inference_tensors_outside_inference_mode_as_torch(name, made, training):
    """Tensors made under ``torch.inference_mode`` used outside it, with grad mode on: a model
    and input made there run without a graph (their requires_grad does not count), as in
    torch; an inference input to a model that trains, or a model made there called on an
    ordinary input, raises torch's error before any running statistic moves."""
    if made == "model":
        x = data((4, 3, 5, 5), torch.float32)
    else:
        with torch.inference_mode():
            x = data((4, 3, 5, 5), torch.float32)
    results = []
    for nn in (torch.nn, bnt):
        if made != "input":
            with torch.inference_mode():
                m = INFERENCE_MAKERS[name](nn).train(training)
        else:
            m = INFERENCE_MAKERS[name](nn).train(training)
        try:
            y = m(x)
            outcome = (None, y.detach().clone(), y.requires_grad)
        except RuntimeError as error:
            outcome = (str(error), None, None)
        results.append((outcome, {k: v.clone() for k, v in m.state_dict().items()}))
    (expected, expected_state), (got, state) = results
    assert got[0] == expected[0]
    if expected[0] is None:
        torch.testing.assert_close(got[1], expected[1])
        # torch's composite rms_norm multiplies by the weight last: its output requires grad there
        if not (name == "RMSNorm" and made == "model-and-input"):
            assert got[2] == expected[2]
    assert_states_match_dicts(state, expected_state)


def assert_states_match_dicts(ours, ref):
    assert list(ours) == list(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)


def test_convert_and_revert_swap_every_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm2d(8, affine=True),
        torch.nn.BatchNorm2d(8), torch.nn.Flatten(1), torch.nn.LayerNorm(8 * 4 * 4),
        torch.nn.Linear(128, 16), torch.nn.RMSNorm(16))
    ref = copy.deepcopy(model)
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    converted = bnt.convert(model)
    assert [type(m) for m in converted] == [torch.nn.Conv2d, bnt.GroupNorm, bnt.InstanceNorm2d, bnt.BatchNorm2d,
                                            torch.nn.Flatten, bnt.LayerNorm, torch.nn.Linear, bnt.RMSNorm]
    assert all(v is tensors[k] for k, v in converted.state_dict(keep_vars=True).items())
    x = data((2, 3, 6, 6), torch.float32)
    y, names = ops_run(lambda: converted(x))
    assert {"batchnorm::group_norm", "batchnorm::instance_norm_train", "batchnorm::layer_norm"} <= names
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    reverted = bnt.revert(converted)
    assert [type(m) for m in reverted] == [type(m) for m in ref]
    assert all(v is tensors[k] for k, v in reverted.state_dict(keep_vars=True).items())


def test_a_saved_converted_model_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole model pickles each drop-in by its module and name; unpickling
    imports that module first, in a process that may not have imported batchnorm.torch."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = bnt.convert(torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.InstanceNorm2d(8, affine=True),
        torch.nn.Flatten(1), torch.nn.LayerNorm(8 * 4 * 4), torch.nn.RMSNorm(128)))
    x = data((2, 3, 6, 6), torch.float32)
    path, expected = tmp_path / "model.pt", tmp_path / "expected.pt"
    torch.save(model, path)
    with torch.no_grad():
        torch.save((x, model(x)), expected)
    code = ("import sys, torch; model = torch.load(sys.argv[1], weights_only=False); x, y = torch.load(sys.argv[2]); "
            "print(*[type(m).__module__ + '.' + type(m).__name__ for m in model]); "
            "torch.testing.assert_close(model(x), y, rtol=0, atol=0)")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(expected)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [name for name in done.stdout.split() if "batchnorm" in name] == [
        "batchnorm.torch.GroupNorm", "batchnorm.torch.InstanceNorm2d", "batchnorm.torch.LayerNorm",
        "batchnorm.torch.RMSNorm"], done.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_opcheck(dtype):
    """torch's own operator checks: schema, fake kernels, autograd registration, AOT dispatch."""
    x = data((3, 6, 4, 5), dtype).requires_grad_(True)
    w = torch.rand(6, dtype=dtype, requires_grad=True) + 0.5
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    lw = torch.rand(4, 5, dtype=dtype, requires_grad=True) + 0.5
    lb = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    rm, rv = torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    checks = [
        (ops.layer_norm, (x, 2, lw, lb, 1e-5, False)),
        (ops.layer_norm, (x, 1, None, None, 1e-5, False)),
        (ops.layer_norm, (x, 2, lw, None, 1e-6, True)),
        (ops.group_norm, (x, 3, w, b, 1e-5)),
        (ops.group_norm, (x_cl, 2, None, None, 1e-5)),
        (ops.instance_norm_train, (x, w, b, rm.clone(), rv.clone(), 0.1, 1e-5)),
        (ops.instance_norm_train, (x_cl, None, None, None, None, 0.1, 1e-5)),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def norms_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.InstanceNorm2d(8, affine=True),
        torch.nn.Flatten(2), torch.nn.LayerNorm(16), torch.nn.RMSNorm(16)).to(dtype)


@pytest.mark.parametrize("profiled", [False, True], ids=["plain", "profiled"])
def test_compile_runs_the_ops(profiled):
    """One graph (fullgraph: the modules broke it at every norm, asking whether the profiler
    ran), with the ops in it, torch's results and gradients; with and without a profiler."""
    torch._dynamo.reset()
    ref = norms_model()
    compiled = torch.compile(bnt.convert(copy.deepcopy(ref)), fullgraph=True)
    x = data((2, 3, 6, 6), torch.float32)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    seen = []
    if not profiled:
        y = torch.compile(bnt.convert(copy.deepcopy(ref)), fullgraph=True,
                          backend=lambda gm, _: seen.extend(n.target for n in gm.graph.nodes) or gm.forward)(x)
        names = {f"batchnorm::{t.__name__.split('.')[0]}" for t in seen if "batchnorm" in str(t)}
    else:
        y, names = ops_run(lambda: compiled(x))
    assert {"batchnorm::group_norm", "batchnorm::instance_norm_train", "batchnorm::layer_norm"} <= names
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_export_records_the_ops():
    ref = norms_model()
    ep = torch.export.export(bnt.convert(copy.deepcopy(ref)), (data((2, 3, 6, 6), torch.float32),))
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"batchnorm.group_norm.default", "batchnorm.instance_norm_train.default",
            "batchnorm.layer_norm.default"} <= names
    x = data((2, 3, 6, 6), torch.float32, seed=3)
    torch.testing.assert_close(ep.module()(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_with_dynamic_sizes_keeps_them_dynamic(strict):
    """Batch and spatial sizes exported as Dims stay symbolic through every converted norm
    (group norm's own check once made them constants): the program runs other sizes, as
    torch's model's does (float64, the reference)."""
    from torch.export import Dim

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(4, 8), torch.nn.InstanceNorm2d(8, affine=True),
                              torch.nn.BatchNorm2d(8)).double().eval()
    dims = ({0: Dim("batch", min=2, max=64), 2: Dim("height", min=4, max=32), 3: Dim("width", min=4, max=32)},)
    ep = torch.export.export(bnt.convert(copy.deepcopy(ref)), (data((2, 3, 6, 6), torch.float64),),
                             dynamic_shapes=dims, strict=strict)
    for shape in [(3, 3, 5, 7), (5, 3, 9, 4)]:
        x = data(shape, torch.float64, seed=4)
        torch.testing.assert_close(ep.module()(x), ref(x), rtol=1e-12, atol=1e-12)


def test_non_strict_export_of_a_cumulative_average_gives_torchs_error():
    """A training batch norm with momentum=None cannot be exported (its factor
    1/num_batches_tracked is data): the converted module raises what torch's raises."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    x = data((2, 4, 3, 3), torch.float32)
    for module in (torch.nn.BatchNorm2d(4, momentum=None), bnt.BatchNorm2d(4, momentum=None)):
        with pytest.raises(GuardOnDataDependentSymNode):
            torch.export.export(module.train(), (x,), strict=False)


def test_fx_trace_in_eval_keeps_the_batch_counter():
    """An eval-mode trace of a converted batch norm keeps ``num_batches_tracked``, so the
    GraphModule's state_dict has the keys of torch's traced model and takes its checkpoints."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    ours = torch.fx.symbolic_trace(bnt.convert(copy.deepcopy(model)))
    theirs = torch.fx.symbolic_trace(copy.deepcopy(model))
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    ours.load_state_dict(model.state_dict())
    x = data((2, 3, 6, 6), torch.float64)
    torch.testing.assert_close(ours.double()(x), model.double()(x), rtol=1e-12, atol=1e-12)
    assert sorted(torch.fx.symbolic_trace(bnt.BatchNorm2d(4).eval()).state_dict()) == \
        sorted(torch.nn.BatchNorm2d(4).state_dict())  # traced at the top too


# The instance norms are leaf modules under fx, as torch's are (test_fx_keeps_instance_norms_as_modules).
FX_CASES = [(c[0], c[1], c[2], c[3]) for c in CASES if not c[0].startswith("Instance")] + [
    ("RMSNorm", (16,), {"elementwise_affine": False}, (4, 16)),  # eps=None and no weight
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name,args,kwargs,shape", FX_CASES, ids=[f"{c[0]}-{c[2]}" for c in FX_CASES])
def test_fx_symbolic_trace_records_the_ops(name, args, kwargs, shape, dtype):
    """A converted norm inside a model traces into the ``batchnorm::`` op, and the graph gives the eager result and
    gradients, also for a ``model.bfloat16()`` whose parameters are cast when the graph runs."""
    ref, ours = pair(name, args, kwargs, torch.float32)
    ref, ours = (torch.nn.Sequential(torch.nn.Identity(), m).to(dtype) for m in (ref, ours))
    gm = torch.fx.symbolic_trace(ours)
    op = "group_norm" if name == "GroupNorm" else "layer_norm"
    assert f"batchnorm.{op}.default" in {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    x = data(shape, torch.float32).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = gm(x), ref(x_ref)
    y.backward(y.detach() * 0.5)
    y_ref.backward(y_ref.detach() * 0.5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for p, p_ref in zip(gm.parameters(), ref.parameters()):
        assert p.grad.dtype == p_ref.grad.dtype == dtype
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4 if dtype == torch.float32 else 2**-6,
                                   atol=1e-4 if dtype == torch.float32 else 2**-4)


@pytest.mark.parametrize("name,args,kwargs,shape", [(c[0], c[1], c[2], c[3]) for c in CASES if c[0].startswith("Instance")],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0].startswith("Instance")])
def test_fx_keeps_instance_norms_as_modules(name, args, kwargs, shape):
    """torch's instance norms are leaf modules under torch.fx (their checks branch on the
    input's rank); a converted one is too: the graph calls it, it runs the kernels, and the
    graph gives torch's result, gradients and running statistics, also for unbatched input."""
    ref, ours = pair(name, args, kwargs, torch.float32)
    model = torch.nn.Sequential(torch.nn.Identity(), ours)
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [type(gm.get_submodule(n.target)) for n in calls] == [torch.nn.Identity, getattr(bnt, name)]
    x = data(shape, torch.float32).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, ran = ops_run(lambda: gm(x))
    y_ref = ref(x_ref)
    assert ran, "the kernels did not run"
    y.backward(y.detach() * 0.5)
    y_ref.backward(y_ref.detach() * 0.5)
    (out_tol, grad_tol) = TOL[torch.float32]
    torch.testing.assert_close(y, y_ref, rtol=out_tol[0], atol=out_tol[1])
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=grad_tol[0], atol=grad_tol[1])
    assert_states_match(ours, ref, out_tol)
    with torch.no_grad():
        torch.testing.assert_close(gm(x[0]), ref(x_ref[0]), rtol=out_tol[0], atol=out_tol[1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_instance_norm_keeps_updating_buffers_after_tracking_is_turned_off(training):
    """torch's instance norm normalizes with the input's statistics once track_running_stats
    is False, and still updates the running statistics it holds, in either mode."""
    ref, ours = pair("InstanceNorm1d", (3,), {"track_running_stats": True}, torch.float32)
    for m in (ref, ours):
        m.track_running_stats = False
        m.train(training)
    for seed in (1, 2):
        x = data((2, 3, 8), torch.float32, seed)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        assert_states_match(ours, ref, (1e-6, 1e-6))
    assert not torch.equal(ref.running_mean, pair("InstanceNorm1d", (3,), {"track_running_stats": True},
                                                  torch.float32)[0].running_mean)  # they moved


def test_script_and_trace_match_torch():
    ref = norms_model()
    ours = bnt.convert(copy.deepcopy(ref))
    x = data((2, 3, 6, 6), torch.float32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)  # modules that have run script too
    scripted = torch.jit.script(ours)
    traced = torch.jit.trace(ours, (x,))
    x2 = data((2, 3, 6, 6), torch.float32, seed=5)
    for module in (scripted, traced):
        torch.testing.assert_close(module(x2), ref(x2), rtol=1e-5, atol=1e-5)


def test_eager_calls_without_grad_run_the_kernels(monkeypatch):
    """No graph to record (no_grad, or nothing requires grad): the kernels run without the
    dispatcher, and give torch's results and running statistics."""
    calls = []
    real = ops._core

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(real, name)(*args)
            return call
    monkeypatch.setattr(ops, "_core", Spy())
    for name, args, kwargs, shape, op in CASES:
        ref, ours = pair(name, args, kwargs, torch.float32)
        x = data(shape, torch.float32)
        calls.clear()
        with torch.no_grad():
            y, names = ops_run(lambda: ours(x))
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert names == {f"batchnorm::{op}"} and calls == [op.replace("_train", "")], (name, calls)
        assert_states_match(ours, ref, (1e-6, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_module_calls_without_a_graph_take_the_shortcut(monkeypatch, dtype):
    """A module call that records no graph on a contiguous float input (not under a profiler)
    hands it to the kernel directly, past the functional route (patched to raise here), with
    the same bits as that route; InstanceNorm only without running statistics; a
    channels_last or bfloat16 input takes the route."""
    from batchnorm import _torch_norms as tn

    def refuse(*args):
        raise AssertionError("functional route")
    for name, args, kwargs, shape, op in CASES:
        ref, ours = pair(name, args, kwargs, dtype)
        x = data(shape, dtype)
        with torch.no_grad():
            expected = ours(x.clone().requires_grad_(True))  # the route, as a graph would need
            with monkeypatch.context() as patch:
                patch.setattr(tn, "_run", refuse)
                if kwargs.get("track_running_stats"):
                    with pytest.raises(AssertionError, match="functional route"):
                        ours(x)
                    continue
                y = ours(x)
        assert torch.equal(y, expected) and y.dtype == dtype, name
        torch.testing.assert_close(y, ref(x), rtol=TOL[dtype][0][0], atol=TOL[dtype][0][1])
    monkeypatch.setattr(tn, "_run", refuse)
    for ours, x in ((bnt.GroupNorm(2, 4).to(dtype), data((2, 4, 3, 5), dtype).to(memory_format=torch.channels_last)),
                    (bnt.GroupNorm(2, 4), data((2, 4, 3, 5), torch.float32).bfloat16())):
        with torch.no_grad(), pytest.raises(AssertionError, match="functional route"):
            ours(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_module_calls_with_a_graph_take_the_shortcut(monkeypatch, dtype):
    """A module call that records a graph, on the same inputs as the no-graph shortcut, runs
    the kernel under its own autograd node, past the functional route (patched to raise
    here): the same bits as the route (taken while a profiler runs), forward and backward, and
    torch's results; InstanceNorm with running statistics takes the route."""
    from batchnorm import _torch_norms as tn

    def refuse(*args):
        raise AssertionError("functional route")

    def step(module, x, grad):
        x = x.clone().requires_grad_(True)
        module.zero_grad()
        y = module(x)
        y.backward(grad)
        return y.detach(), x.grad, [p.grad for p in module.parameters()]
    for name, args, kwargs, shape, op in CASES:
        ref, ours = pair(name, args, kwargs, dtype)
        x, grad = data(shape, dtype), data(shape, dtype, seed=3)
        with monkeypatch.context() as patch:
            patch.setattr(ops, "profiling", lambda: True)
            expected = step(ours, x, grad)
        with monkeypatch.context() as patch:
            patch.setattr(tn, "_run", refuse)
            if kwargs.get("track_running_stats"):
                with pytest.raises(AssertionError, match="functional route"):
                    ours(x.clone().requires_grad_(True))
                continue
            got = step(ours, x, grad)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), name
        assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2])), name
        want = step(ref, x, grad)
        rtol, atol = TOL[dtype][1]
        for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("source", ["edited in place", "inference_mode"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rms_norm_weight_gradient_survives_what_torch_allows_of_its_input(source, dtype):
    """torch's RMSNorm saves x * rsqrt(mean(x^2) + eps), a tensor of its own, where x needs no
    gradient: x may then be edited in place, or come from inference_mode, before backward (the
    other norms save x itself, in torch as here, and raise). The drop-in trains there too, with
    the weight's gradient of x as it was at forward: torch's, and a float64 reference's."""
    ref, ours = pair("RMSNorm", (16,), {}, dtype)
    x0, grad = data((4, 5, 16), dtype), data((4, 5, 16), dtype, seed=3)
    weight_grads = []
    for module in (ref, ours):
        if source == "inference_mode":
            with torch.inference_mode():
                x = x0.clone()
        else:
            x = x0.clone()
        y = module(x)
        if source == "edited in place":
            x.mul_(-2.0).add_(7.0)
        y.backward(grad)
        weight_grads.append(module.weight.grad)
    x64, g64 = x0.double(), grad.double()
    want = (g64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + torch.finfo(dtype).eps)).sum((0, 1))
    rtol, atol = TOL[dtype][1]
    torch.testing.assert_close(weight_grads[1], weight_grads[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(weight_grads[1].double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("form", ["module", "functional"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rms_norm_weight_edited_in_place_where_only_its_gradient_is_needed(form, dtype):
    """torch's RMSNorm multiplies by the weight last, so it saves the weight only for the
    input's gradient: where x needs none, the weight may be edited in place before backward,
    and its gradient is that of the forward's x. The drop-in's node and the op's rule save it
    as sparingly (they raised 'modified by an inplace operation'): torch's gradient, and a
    float64 reference's."""
    ref, ours = pair("RMSNorm", (16,), {}, dtype)
    x, grad = data((4, 5, 16), dtype), data((4, 5, 16), dtype, seed=3)
    weight_grads = []
    for module in (ref, ours):
        weight = module.weight
        function = torch.nn.functional.rms_norm if module is ref else bnt.rms_norm
        y = module(x) if form == "module" else function(x, (16,), weight)
        with torch.no_grad():
            weight.mul_(0.5)
        y.backward(grad)
        weight_grads.append(weight.grad)
    x64, g64 = x.double(), grad.double()
    want = (g64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + torch.finfo(dtype).eps)).sum((0, 1))
    rtol, atol = TOL[dtype][1]
    torch.testing.assert_close(weight_grads[1], weight_grads[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(weight_grads[1].double(), want, rtol=rtol, atol=atol)
    # where x needs a gradient, the weight is saved, and editing it is torch's error in both
    for module in (ref, ours):
        y = module(x.clone().requires_grad_(True))
        with torch.no_grad():
            module.weight.mul_(0.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(grad)


@pytest.mark.parametrize("name,args,kwargs,shape,op", [c for c in CASES if not c[2].get("track_running_stats")],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if not c[2].get("track_running_stats")])
def test_shortcut_node_backward_beyond_the_kernels(monkeypatch, name, args, kwargs, shape, op):
    """The module shortcut's autograd node (its call checked to bypass the route) against
    torch's module, where its backward is more than one kernel call: a broadcast gradient
    (``y.sum().backward()``), double backward (``create_graph``), batched gradients
    (``is_grads_batched``, also through the functional route); an input changed in place
    after the forward is refused."""
    from batchnorm import _torch_norms as tn

    dtype = torch.float64  # gradients of gradients: tight tolerances need float64
    ref, ours = pair(name, args, kwargs, dtype)
    x = data(shape, dtype)

    def run(module, fn):
        xg = x.clone().requires_grad_(True)
        y = module(xg)
        return fn(xg, y)

    def refuse(*args):
        raise AssertionError("functional route")

    def broadcast(xg, y):
        y.sum().backward()
        return [xg.grad]

    def batched(xg, y):
        grads = torch.stack([data(shape, dtype, seed=s) for s in (4, 5, 6)])
        return list(torch.autograd.grad(y, xg, grads, is_grads_batched=True))

    with monkeypatch.context() as patch:
        patch.setattr(tn, "_run", refuse)
        for fn in (broadcast, batched):
            ref.zero_grad()
            ours.zero_grad()
            for a, b in zip(run(ours, fn), run(ref, fn)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} {fn.__name__}")
        ours.zero_grad()
        ref.zero_grad()
        xg = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(ours(xg), xg, data(shape, dtype, seed=3), create_graph=True)
        (gx * gx).sum().backward()
        xr = x.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(ref(xr), xr, data(shape, dtype, seed=3), create_graph=True)
        (gr * gr).sum().backward()
        torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-9)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
        base = x.clone().requires_grad_(True) * 1  # a non-leaf input, changed in place below
        y = ours(base)
        base.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
    with monkeypatch.context() as patch:  # the functional route (taken under a profiler) batches them too
        patch.setattr(ops, "profiling", lambda: True)
        for a, b in zip(run(ours, batched), run(ref, batched)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{name} route")


@pytest.mark.parametrize("name,args,kwargs", [("LayerNorm", (16,), {}), ("RMSNorm", (16,), {}),
                                              ("GroupNorm", (4, 12), {}), ("InstanceNorm1d", (12,), {"affine": True})])
def test_cached_param_views_follow_swapped_memory_and_copies(monkeypatch, name, args, kwargs):
    """The module shortcut caches NumPy views of weight and bias: ``.data`` swaps, ``.double()``,
    copies and pickles must each normalize with their own parameters (a stale view would use
    old ones), forward and backward, all past the functional route (patched to raise)."""
    import pickle

    from batchnorm import _torch_norms as tn

    def refuse(*args):
        raise AssertionError("functional route")

    ref, ours = pair(name, args, kwargs, torch.float32)
    x = data((3, 12, 16), torch.float32)

    def check(a, b, dtype=torch.float32):
        xs = x.to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(a(xs), b(xs), rtol=TOL[dtype][0][0], atol=TOL[dtype][0][1])
        xa, xb = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
        a.zero_grad()
        b.zero_grad()
        a(xa).backward(xs)
        b(xb).backward(xs)
        for u, v in zip([xa.grad, *[p.grad for p in a.parameters()]], [xb.grad, *[p.grad for p in b.parameters()]]):
            torch.testing.assert_close(u, v, rtol=TOL[dtype][1][0], atol=TOL[dtype][1][1])

    with monkeypatch.context() as patch:
        patch.setattr(tn, "_run", refuse)
        check(ours, ref)
        assert ours._views is not None  # the calls above filled the cache
        for m in (ours, ref):
            m.weight.data = m.weight.data * 2 + 1  # new memory under the same Parameter
        check(ours, ref)
        twin, ref_twin = copy.deepcopy(ours), copy.deepcopy(ref)
        with torch.no_grad():
            for m in (twin, ref_twin):
                m.weight.mul_(3)  # the copy's own memory: the original must not see it
        check(twin, ref_twin)
        check(ours, ref)
        assert "_views" not in ours.__getstate__()
        check(pickle.loads(pickle.dumps(ours)), ref)
        ours.double()
        ref.double()
        check(ours, ref, torch.float64)


@pytest.mark.parametrize("make", [lambda: torch.nn.GroupNorm(2, 4), lambda: torch.nn.InstanceNorm2d(4, affine=True),
                                  lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval()],
                         ids=["GroupNorm", "InstanceNorm2d", "InstanceNorm2d-eval"])
def test_input_edited_after_forward_when_the_kernels_read_a_copy(make):
    """An input the kernels cannot read in place (neither channels-first nor channels-last
    dense) is copied, and the copy is what backward keeps, as torch keeps its contiguous copy:
    editing the input in place between forward and backward is no error (float64, torch's
    module the reference)."""
    torch.manual_seed(0)
    ref = make().double()
    ours = bnt.convert(copy.deepcopy(ref))
    grads = []
    for m in (ref, ours):
        leaf = data((2, 4, 3, 5), torch.float64).requires_grad_(True)
        x = (leaf * 1.0).transpose(0, -1).contiguous().transpose(0, -1)  # dims 0 and 3 swapped in memory
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        y = m(x)
        with torch.no_grad():
            x.add_(1.0)
        y.pow(2).sum().backward()
        grads.append([leaf.grad, *[p.grad for p in m.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("make", [lambda: torch.nn.GroupNorm(2, 4), lambda: torch.nn.InstanceNorm2d(4, affine=True),
                                  lambda: torch.nn.LayerNorm([4, 5, 5]), lambda: torch.nn.BatchNorm2d(4),
                                  lambda: torch.nn.BatchNorm2d(4).eval()],
                         ids=["GroupNorm", "InstanceNorm2d", "LayerNorm", "BatchNorm2d-train", "BatchNorm2d-eval"])
@pytest.mark.parametrize("how", ["data", "set_"])
def test_cached_views_follow_a_view_at_the_same_address(make, how):
    """Parameters in one flat buffer: a weight swapped for other elements of it that start at
    the same address (a column, then a row) is a new view, not the cached one. Float64, so
    torch's module is the float64 reference."""
    torch.manual_seed(0)
    ref = make().double()
    ours = bnt.convert(copy.deepcopy(ref))
    numel = ref.weight.numel()
    flat = torch.randn(2 * numel, dtype=torch.float64)
    x = data((3, 4, 5, 5), torch.float64)
    for layout in [(ref.weight.shape, [2 * s for s in ref.weight.stride()]), (ref.weight.shape, ref.weight.stride())]:
        for m in (ref, ours):
            view = flat.as_strided(*layout)
            with torch.no_grad():
                if how == "data":
                    m.weight.data = view
                else:
                    m.weight.set_(flat.untyped_storage(), 0, *layout)
            assert m.weight.data_ptr() == flat.data_ptr()
        x_ref, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_ref, y = ref(x_ref), ours(x_ours)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        y_ref.backward(x)
        y.backward(x)
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("make", [lambda: torch.nn.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4).eval(),
                                  lambda: torch.nn.GroupNorm(2, 4), lambda: torch.nn.LayerNorm([4, 5, 5])],
                         ids=["BatchNorm2d-train", "BatchNorm2d-eval", "GroupNorm", "LayerNorm"])
@pytest.mark.parametrize("how", ["load_state_dict", "to", "assign"])
def test_replaced_tensors_are_not_kept_by_the_cached_views(make, how):
    """The views a module's shortcut caches go when its tensors are replaced through the
    module, so the old tensors are freed at once, as by torch's module; the next call
    normalizes with the new ones (float64 torch module, the reference)."""
    import gc
    import weakref

    torch.manual_seed(0)
    ref = make()
    ours = bnt.convert(copy.deepcopy(ref))
    x = data((3, 4, 5, 5), torch.float32)
    with torch.no_grad():
        ours(x)  # fills the cache
    old = [weakref.ref(t) for t in (*ours.parameters(), *ours.buffers())]
    if how == "load_state_dict":  # new tensors: the old ones must be freed
        state = {k: v.clone() * 1.5 if v.is_floating_point() else v.clone() for k, v in ours.state_dict().items()}
        ours.load_state_dict(state, assign=True)
        ref.load_state_dict(state)
        del state
    elif how == "assign":
        ours.weight = torch.nn.Parameter(torch.full_like(ours.weight, 2.0))
        with torch.no_grad():
            ref.weight.fill_(2.0)
        old = old[:1]
    else:  # .to() keeps the Parameter objects and swaps their memory: the views of it must go
        ours.double()
        x = x.double()
        old = []
        assert ours.__dict__.get("_views") is None
    gc.collect()
    assert all(r() is None for r in old), [r() is not None for r in old]
    with torch.no_grad():
        torch.testing.assert_close(ours(x).double(), ref.double()(x.double()), rtol=1e-5, atol=1e-5)


def test_eager_calls_with_grad_run_the_kernels_without_the_ops(monkeypatch):
    """A plain eager call that records a graph runs the kernels forward and backward through a
    plain autograd function (the ops, patched to raise here, are not dispatched), shown in the
    profiler under the ops' names, with torch's results, gradients and running statistics."""
    def refuse(*args, **kwargs):
        raise AssertionError("the batchnorm:: op was dispatched")
    for op_name in ("layer_norm", "group_norm", "instance_norm_train", "layer_norm_backward", "group_norm_backward"):
        monkeypatch.setattr(ops, op_name, refuse)
    for name, args, kwargs, shape, op in CASES:
        ref, ours = pair(name, args, kwargs, torch.float32)
        x_ref = data(shape, torch.float32).requires_grad_(True)
        x = x_ref.detach().clone().requires_grad_(True)
        grad = data(shape, torch.float32, seed=3)
        with torch.profiler.profile() as prof:
            y = ours(x)
            y.backward(grad)
        names = {e.name for e in prof.events() if e.name.startswith("batchnorm::")}
        ref(x_ref).backward(grad)
        backward = "group_norm_backward" if op != "layer_norm" else "layer_norm_backward"
        assert names == {f"batchnorm::{op}", f"batchnorm::{backward}"}, (name, names)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
        for (key, p), q in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=key)
        assert_states_match(ours, ref, (1e-6, 1e-6))


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return w * 2.0


PRUNABLE = [("BatchNorm2d", (4,), (2, 4, 3, 3)), ("LayerNorm", (4,), (2, 3, 4)), ("GroupNorm", (2, 4), (2, 4, 3, 3)),
            ("InstanceNorm2d", (4,), (2, 4, 3, 3)), ("RMSNorm", (4,), (2, 3, 4))]


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,args,shape", PRUNABLE, ids=[c[0] for c in PRUNABLE])
def test_pruned_and_parametrized_weights_are_used(name, args, shape, training, how):
    """torch.nn.utils.prune and parametrize move the weight out of _parameters and compute the
    attribute (network slimming prunes batch-norm scales): the drop-ins read that weight (they
    read _parameters and ran as if there were no weight), and its gradient reaches the original,
    as torch's module does; both against the same module run in float64."""
    from torch.nn.utils import parametrize, prune
    kwargs = {"affine": True} if name.startswith("Instance") else {}
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*args, **kwargs).train(training)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([2.0, -3.0, 0.5, 4.0]))
    ours = bnt.convert(copy.deepcopy(ref))
    ref64 = copy.deepcopy(ref).double()
    x = data(shape, torch.float32)
    results = []
    for module, inp in ((ref64, x.double()), (ref, x), (ours, x)):
        if how == "prune":
            prune.l1_unstructured(module, "weight", amount=0.5)
        else:
            parametrize.register_parametrization(module, "weight", _Doubled())
        y = module(inp)
        y.pow(2).sum().backward()
        original = module.weight_orig if how == "prune" else module.parametrizations.weight.original
        results.append((y.detach().double(), original.grad.double()))
    (y64, g64), (y_ref, g_ref), (y, g) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, g64, rtol=1e-4, atol=1e-4)


HOOKED = [("BatchNorm2d", (4,), (2, 4, 3, 3)), ("LayerNorm", (4,), (2, 3, 4)), ("RMSNorm", (4,), (2, 3, 4)),
          ("GroupNorm", (2, 4), (2, 4, 3, 3)), ("InstanceNorm2d", (4,), (2, 4, 3, 3))]


@pytest.mark.parametrize("name,args,shape", HOOKED, ids=[c[0] for c in HOOKED])
def test_saved_tensor_hooks_own_the_saved_input(name, args, shape):
    """Saved-tensor hooks (activation checkpointing, offloading) decide what a saved input's
    memory does: with hooks that pack a copy, nothing else holds the input once the caller
    drops it, as with torch's module (the drop-ins kept a NumPy view of it for backward), and
    the gradient is torch's (and that of the module run in float64)."""
    kwargs = {"affine": True} if name.startswith("Instance") else {}
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(*args, **kwargs)
    ours = bnt.convert(copy.deepcopy(ref))
    ref64 = copy.deepcopy(ref).double()
    grads = []
    for module, dtype in ((ref, torch.float32), (ours, torch.float32), (ref64, torch.float64)):
        x = data(shape, dtype).requires_grad_(True)
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.detach().clone()) or len(packed) - 1,
                                                      lambda i: packed[i]):
            h = x * 2.0
            y = module(h)
        storage = h.untyped_storage()
        del h
        assert torch._C._storage_Use_Count(storage._cdata) == 1, type(module).__name__  # this handle alone
        y.pow(2).sum().backward()
        grads.append(x.grad.double())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [5.0, None, (5.0,), "tensor", 5, np.int64(5), (True,)],
                         ids=["float", "None", "float-element", "tensor", "int", "numpy-int", "bool-element"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_functional_normalized_shape_as_torch_takes_it(name, shape):
    """``normalized_shape`` that torch's function refuses (not a sequence of integers) is its
    TypeError, which names the argument (a float element was computed with; a float raised
    "'float' object is not iterable"; an int alone was computed with)."""
    if shape == "tensor":
        shape = torch.tensor([5])
    x = torch.randn(4, 3, 5)
    outcomes = [error_of(lambda: fn(x, shape)) for fn in (getattr(torch.nn.functional, name), getattr(bnt, name))]
    assert outcomes[0] is not None and outcomes[0][0] == "TypeError" and outcomes[1] == outcomes[0]
    for good in ((5,), [5], torch.Size([5]), (np.int64(5),)):
        torch.testing.assert_close(getattr(bnt, name)(x, good), getattr(torch.nn.functional, name)(x, good))


@pytest.mark.parametrize("flag", ["no", None, 1])
def test_functional_use_input_stats_must_be_a_bool_as_in_torch(flag):
    x = torch.randn(4, 3, 5)
    outcomes = [error_of(lambda: fn(x, None, None, None, None, flag))
                for fn in (torch.nn.functional.instance_norm, bnt.instance_norm)]
    assert outcomes[0] is not None and outcomes[0][0] == "TypeError" and outcomes[1] == outcomes[0]


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "GroupNorm"])
def test_sibling_parameter_shrunk_in_place_after_a_call_raises_as_in_torch(name):
    """As for batch norm: a shorter view of the same memory under the same Parameter is
    torch's error, not the cached views of the old length."""
    make = {"LayerNorm": lambda nn: nn.LayerNorm(5), "RMSNorm": lambda nn: nn.RMSNorm(5),
            "GroupNorm": lambda nn: nn.GroupNorm(1, 5)}[name]
    x = torch.randn(4, 5, 5)
    outcomes = []
    for nn in (torch.nn, bnt):
        m = make(nn)
        m(x)
        m.weight.data = m.weight.data[:4]
        outcomes.append(error_of(lambda: m(x)))
    assert outcomes[0] is not None and outcomes[1] == outcomes[0]
