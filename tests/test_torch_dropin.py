"""batchnorm.torch: torch.nn.BatchNorm1d/2d/3d on batchnorm's kernels, and convert().

Compared with torch's own modules step by step (forward, backward, running statistics,
num_batches_tracked) and with torch.autograd.gradcheck in float64. Element-wise tolerances
as in helpers.py (float32 1e-5, float64 1e-12); per-channel sums (grad_weight, grad_bias)
are compared with rtol * sum|terms| (assert_close_sum), because summation order differs.
"""

import copy
import io
import pickle
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm.torch as bnt  # noqa: E402
from helpers import (DTYPE_IDS, DTYPES, assert_close, assert_close_sum, error_of, last_two_swapped,  # noqa: E402
                     torch_dtype)

CASES = [  # (drop-in class, torch class, input shape, memory format)
    ("1d-NC", 1, (16, 5), None),
    ("1d-NCL", 1, (4, 5, 9), None),
    ("2d", 2, (3, 5, 6, 7), None),
    ("2d-cl", 2, (3, 5, 6, 7), "channels_last"),
    ("3d", 3, (2, 5, 3, 4, 3), None),
    ("3d-cl", 3, (2, 5, 3, 4, 3), "channels_last_3d"),
    # dense memory orders whose output torch makes contiguous, not alike (code after the norm
    # may .view it): (C, N) memory, a (N, L, C) sequence transposed for BatchNorm1d, W before H
    ("1d-NC-transposed", 1, (16, 5), "transposed"),
    ("1d-NLC", 1, (4, 5, 9), "transposed"),
    ("2d-transposed", 2, (3, 5, 6, 7), "transposed"),
]


def classes(dim):
    return {1: (bnt.BatchNorm1d, torch.nn.BatchNorm1d), 2: (bnt.BatchNorm2d, torch.nn.BatchNorm2d),
            3: (bnt.BatchNorm3d, torch.nn.BatchNorm3d)}[dim]


def make_x(rng, shape, dtype, fmt, offset=0.0):
    x = torch.from_numpy((rng.standard_normal(shape) * 2 + offset).astype(dtype))
    if fmt == "transposed":
        return last_two_swapped(x)
    return x if fmt is None else x.to(memory_format=getattr(torch, fmt))


def pair(dim, dtype, **kwargs):
    ours_cls, torch_cls = classes(dim)
    tdt = torch_dtype(torch, dtype)
    ours, ref = ours_cls(5, dtype=tdt, **kwargs), torch_cls(5, dtype=tdt, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def check_step(ours, ref, x, gy, dtype):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    assert ya.stride() == yb.stride()  # same memory format as torch's output
    assert_close(ya.detach(), yb.detach().numpy(), dtype)
    ya.backward(gy)
    yb.backward(gy)
    assert_close(xa.grad, xb.grad.numpy(), dtype, scale=4)
    xhat = (yb.detach().numpy() - (0 if ref.bias is None else ref.bias.detach().numpy().reshape(
        [1, -1] + [1] * (x.dim() - 2))))
    gabs = np.abs(gy.numpy().astype(np.float64))
    axes = tuple(d for d in range(x.dim()) if d != 1)
    for name, terms in (("weight", gabs * np.abs(xhat) * 4), ("bias", gabs)):
        pa, pb = getattr(ours, name), getattr(ref, name)
        if pb is None:
            assert pa is None
            continue
        assert_close_sum(pa.grad, pb.grad.numpy(), terms.sum(axes), dtype, name)
        pa.grad = pb.grad = None
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b.numpy(), dtype, scale=10)
    if ref.num_batches_tracked is not None:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)],
                         ids=["affine-track", "track", "affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_matches_torch_over_steps(case, momentum, affine, track, dtype, rng, no_fallback):
    _, dim, shape, fmt = case
    ours, ref = pair(dim, dtype, momentum=momentum, affine=affine, track_running_stats=track)
    for step in range(3):  # training: batch statistics, running statistics updated
        x = make_x(rng, shape, dtype, fmt, offset=step)
        check_step(ours, ref, x, make_x(rng, shape, dtype, fmt), dtype)
    ours.eval()
    ref.eval()
    for step in range(2):  # eval: running statistics (batch statistics without them)
        x = make_x(rng, shape, dtype, fmt, offset=1)
        check_step(ours, ref, x, make_x(rng, shape, dtype, fmt), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_threads_agree_with_torch(threads, dtype, rng, no_fallback):
    ours, ref = pair(2, dtype)
    x = make_x(rng, (8, 5, 24, 24), dtype, None, offset=3)
    check_step(ours, ref, x, make_x(rng, x.shape, dtype, None), dtype)
    x = make_x(rng, (8, 5, 24, 24), dtype, "channels_last", offset=3)
    check_step(ours, ref, x, make_x(rng, x.shape, dtype, "channels_last"), dtype)


def test_momentum_none_is_cumulative_average(rng, no_fallback):
    ours = bnt.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    batches = [torch.from_numpy(rng.standard_normal((10, 3)) + k) for k in range(4)]
    for b in batches:
        ours(b)
    means = torch.stack([b.mean(0) for b in batches]).mean(0)
    variances = torch.stack([b.var(0, unbiased=True) for b in batches])
    # after k batches: running = average of the k batch statistics (from mean 0 / var 1,
    # the first factor 1/1 replaces the initial values)
    torch.testing.assert_close(ours.running_mean, means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, variances.mean(0), rtol=1e-12, atol=1e-12)
    assert int(ours.num_batches_tracked) == 4


# ---------------------------------------------------------------- gradients


def _fn(training, running):
    def f(x, w, b):
        rm, rv = running if running is not None else (None, None)
        return bnt.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    return f


@pytest.mark.parametrize("training,with_running", [(True, False), (True, True), (False, True)],
                         ids=["train", "train-running", "eval"])
@pytest.mark.parametrize("shape,fmt", [((4, 3, 5), None), ((3, 2, 3, 4), "channels_last")],
                         ids=["NCL", "NHWC"])
def test_gradcheck_float64(training, with_running, shape, fmt, rng, no_fallback):
    x = make_x(rng, shape, np.float64, fmt).requires_grad_(True)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, shape[1])).requires_grad_(True)
    b = torch.from_numpy(rng.standard_normal(shape[1])).requires_grad_(True)
    running = None
    if with_running:
        running = (torch.from_numpy(rng.standard_normal(shape[1])),
                   torch.from_numpy(rng.uniform(0.5, 2, shape[1])))
    if training and with_running:
        # every evaluation updates the running stats; gradients do not depend on them
        running = tuple(r.clone() for r in running)
    assert torch.autograd.gradcheck(_fn(training, running), (x, w, b))


def test_gradcheck_without_affine_and_partial_requires_grad(rng, no_fallback):
    x = make_x(rng, (5, 3, 4), np.float64, None).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: bnt.batch_norm(x, None, None, None, None, True), (x,))
    # input without grad, weight with grad (a frozen feature extractor in front)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = bnt.batch_norm(x.detach(), None, None, w, b, True)
    y.sum().backward()
    assert w.grad is not None and b.grad is not None
    torch.testing.assert_close(b.grad, torch.full((3,), 20.0, dtype=torch.float64))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward(training, rng):
    x = make_x(rng, (4, 3, 5), np.float64, None).requires_grad_(True)
    w = torch.from_numpy(rng.uniform(0.5, 1.5, 3)).requires_grad_(True)
    b = torch.from_numpy(rng.standard_normal(3)).requires_grad_(True)
    running = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(_fn(training, None if training else running), (x, w, b))


def test_no_grad_forward_builds_no_graph_and_updates_stats(rng, no_fallback):
    ours, ref = pair(2, np.float32)
    x = make_x(rng, (4, 5, 3, 3), np.float32, None).requires_grad_(True)
    with torch.no_grad():
        y, yr = ours(x), ref(x)
    assert y.grad_fn is None and not y.requires_grad
    assert_close(y, yr.numpy(), np.float32)
    assert_close(ours.running_var, ref.running_var.numpy(), np.float32)


# ---------------------------------------------------------------- fallback


# half tensors (model.bfloat16(), float16 input) run on the kernels now: tests/test_half.py
@pytest.mark.parametrize("what", ["running-requires-grad", "empty", "one-value-per-channel", "mixed-dtype",
                                  "eps0", "eps-bool", "momentum-bool", "interleaved-running-stats", "meta"])
def test_falls_back_to_torch_where_kernels_do_not_apply(what, fallback_calls, rng):
    m, ref = bnt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    if what == "running-requires-grad":
        for mod in (m, ref):
            mod.running_mean.requires_grad_(True)
        m.eval()
        ref.eval()
    elif what == "empty":
        x = torch.randn(0, 3, 4, 4)
    elif what == "one-value-per-channel":
        x = torch.randn(1, 3, 1, 1)
    elif what == "mixed-dtype":
        x = x.double()
    elif what == "eps0":
        m.eps = ref.eps = 0.0
    elif what in ("eps-bool", "momentum-bool"):  # torch reads True as 1.0; the kernels' bindings take no bool
        setattr(m, what[:-5], True)
        setattr(ref, what[:-5], True)
    elif what == "interleaved-running-stats":  # two views of one buffer, no element shared
        for mod in (m, ref):
            stats = torch.zeros(3, 2)
            stats[:, 1] = 1
            mod.running_mean, mod.running_var = stats[:, 0], stats[:, 1]
    elif what == "meta":
        m, ref, x = m.to("meta"), ref.to("meta"), x.to("meta")
    try:
        expected = ref(x)
    except Exception as e:  # torch's own error, then ours must be the same
        with pytest.raises(type(e), match=re.escape(str(e))):
            m(x)
        assert len(fallback_calls) == 1
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)
        return
    y = m(x)
    assert len(fallback_calls) == 1
    assert y.dtype == expected.dtype and y.shape == expected.shape and y.device == expected.device
    if what != "meta":
        torch.testing.assert_close(y, expected)
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradients_of_nhwc_memory_with_a_size_one_height(training, rng, no_fallback):
    """(2, 6, 1, 4) in NWHC memory: channels_last-contiguous, with a height stride no format
    gives it. torch 2.13's own BatchNorm2d gets this input's gradient wrong (off by up to 1.7
    here); the drop-in's matches the float64 reference."""
    import reference as ref

    x64 = rng.standard_normal((2, 6, 1, 4)) * 3 + 2
    x = torch.from_numpy(x64.astype(np.float32)).permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)
    gy = rng.standard_normal((2, 6, 1, 4)).astype(np.float32)
    m = bnt.BatchNorm2d(6).train(training)
    with torch.no_grad():
        m.running_var.fill_(2.0)
    x.requires_grad_()
    m(x).backward(torch.from_numpy(gy))
    xs = x.detach().double().numpy()
    if training:
        mean, var = ref.stats(xs)
        expected = ref.backward_train(gy, xs, mean, 1 / np.sqrt(var + 1e-5), np.ones(6))[0]
    else:
        expected = ref.backward_eval(gy, xs, np.zeros(6), np.full(6, 2.0), np.ones(6))[0]
    assert_close(x.grad.numpy(), expected, np.float32, scale=4)


def test_kernels_run_for_plain_cpu_tensors(fallback_calls):
    m = bnt.BatchNorm2d(3)
    m(torch.randn(2, 3, 4, 4))
    m.eval()(torch.randn(2, 3, 4, 4, dtype=torch.float32))
    bnt.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, training=True)
    assert fallback_calls == []


def test_wrong_rank_raises_torch_error():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bnt.BatchNorm2d(3)(torch.randn(2, 3, 4))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_wrong_channel_count_raises_torchs_error_with_a_warm_cache(training, track):
    # The first call fills the module's cached views; later calls with another channel count
    # must still reach torch's check (and words), not a kernel's complaint about `weight`.
    m, ref = bnt.BatchNorm2d(4, track_running_stats=track), torch.nn.BatchNorm2d(4, track_running_stats=track)
    for mod in (m, ref):
        mod.train(training)
    good, bad = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(m(good), ref(good))
    for _ in range(2):  # cold and warm: the failed call leaves the cache as it was
        with pytest.raises(Exception) as expected:
            ref(bad)
        with pytest.raises(type(expected.value), match=re.escape(str(expected.value))):
            m(bad)
        if track:
            assert int(m.num_batches_tracked) == int(ref.num_batches_tracked)
    torch.testing.assert_close(m(good), ref(good))


def test_eval_without_running_stats_is_torchs_error():
    with pytest.raises(Exception) as expected:
        torch.nn.functional.batch_norm(torch.randn(4, 3), None, None, training=False)
    with pytest.raises(type(expected.value), match=f"^{re.escape(str(expected.value))}$"):
        bnt.batch_norm(torch.randn(4, 3), None, None, training=False)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_module_made_in_inference_mode_behaves_like_torchs(grad, rng):
    """Buffers made under ``torch.inference_mode`` cannot be updated outside it: training
    there is torch's error, with torch's state afterwards (NumPy views would write them
    silently); under inference mode, and in eval without grad, both run alike."""
    with torch.inference_mode():
        ours, ref = bnt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.from_numpy(rng.standard_normal((4, 3, 2, 2)).astype(np.float32) + 5)
    for _ in range(2):  # cold and warm cache
        with torch.set_grad_enabled(grad):
            with pytest.raises(RuntimeError) as expected:
                ref(x)
            with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
                ours(x)
        for name, buffer in ref.named_buffers():
            assert torch.equal(getattr(ours, name), buffer), name
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- module identity, state


def test_same_class_surface_as_torch():
    for ours_cls, torch_cls in (classes(1), classes(2), classes(3)):
        m, t = ours_cls(7, momentum=None, affine=False), torch_cls(7, momentum=None, affine=False)
        assert isinstance(m, torch_cls)
        assert repr(m) == repr(t)
        assert list(m.state_dict()) == list(t.state_dict())
        assert [n for n, _ in m.named_buffers()] == [n for n, _ in t.named_buffers()]
        assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_state_dict_round_trip_with_torch_modules(dim, rng):
    ours_cls, torch_cls = classes(dim)
    shape = {1: (8, 4), 2: (4, 4, 3, 3), 3: (2, 4, 2, 3, 3)}[dim]
    ref = torch_cls(4)
    for _ in range(2):
        ref(torch.randn(shape))
    ours = ours_cls(4)
    assert not ours.load_state_dict(ref.state_dict()).missing_keys
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours(torch.randn(shape))
    back = torch_cls(4)
    back.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert int(back.num_batches_tracked) == 3
    # whole-module serialization and copies
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is ours_cls
    for m in (loaded, copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(m) is ours_cls
        for k, v in ours.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k


# ---------------------------------------------------------------- convert


class Custom(torch.nn.BatchNorm2d):
    """A user subclass: may override forward, so convert leaves it alone."""


def test_convert_swaps_every_batch_norm_in_place_keeping_state(rng):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6), torch.nn.BatchNorm1d(6)),
        torch.nn.ModuleList([torch.nn.BatchNorm3d(2, momentum=None, affine=False)]),
        torch.nn.SyncBatchNorm(4),
        torch.nn.LazyBatchNorm2d(),
        Custom(4),
    )
    model[1].eval()
    calls = []
    handle = model[1].register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    old_bn = model[1]
    out = bnt.convert(model)
    assert out is model
    assert type(model[1]) is bnt.BatchNorm2d and model[1] is not old_bn
    assert type(model[2][2]) is bnt.BatchNorm1d
    assert type(model[3][0]) is bnt.BatchNorm3d and model[3][0].momentum is None
    assert type(model[4]) is torch.nn.SyncBatchNorm
    assert type(model[5]) is torch.nn.LazyBatchNorm2d
    assert type(model[6]) is Custom
    assert model[1].training is False and model[2][2].training is True
    assert len(model[1]._forward_hooks) == 1
    model[1](torch.randn(2, 4, 3, 3))
    assert calls == [1]
    handle.remove()  # a handle from before convert still works
    model[1](torch.randn(2, 4, 3, 3))
    assert calls == [1]
    after = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert after[name] is t, name  # the same tensors: optimizers keep working
    # the old module is independent of the new one
    old_bn.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(model[1].named_buffers())


def test_convert_and_revert_replace_a_module_registered_twice_by_one_module():
    """Every registration is swapped, not only the first (``named_children`` skips repeats),
    and a module shared by two parents stays one module."""
    bn, ln = torch.nn.BatchNorm1d(4), torch.nn.LayerNorm(4)
    inner = torch.nn.Sequential(bn, ln)
    model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, ln, inner)
    bnt.convert(model)
    assert type(model[0]) is bnt.BatchNorm1d and type(model[3]) is bnt.LayerNorm
    assert model[0] is model[2] is model[4][0] and model[3] is model[4][1]
    assert model[0].weight is bn.weight and model[3].weight is ln.weight
    model[0].eps = 0.5  # one module: every place sees it
    assert model[2].eps == model[4][0].eps == 0.5
    bnt.revert(model)
    assert type(model[0]) is torch.nn.BatchNorm1d and type(model[3]) is torch.nn.LayerNorm
    assert model[0] is model[2] is model[4][0] and model[3] is model[4][1]
    bnt.convert(model, sync=True)
    assert type(model[0]) is bnt.SyncBatchNorm and model[0] is model[2] is model[4][0]


def test_convert_top_level_returns_replacement():
    bn = torch.nn.BatchNorm2d(3)
    new = bnt.convert(bn)
    assert type(new) is bnt.BatchNorm2d and new.weight is bn.weight
    assert bnt.convert(new) is new  # already converted: unchanged


@pytest.mark.parametrize("make", [lambda: bnt.BatchNorm2d(3), lambda: bnt.GroupNorm(1, 3), lambda: bnt.LayerNorm(5)],
                         ids=["BatchNorm2d", "GroupNorm", "LayerNorm"])
def test_copies_of_a_compiled_module_run_themselves(make):
    """As torch's modules: a copy or a pickle of a module compiled with ``Module.compile()``
    leaves the compiled call behind (it is bound to the original), so the copy runs itself."""
    m = make()
    m.compile(backend="eager")
    x = torch.randn(4, 3, 5, 5)
    m(x)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        before = {k: v.clone() for k, v in m.state_dict().items()}
        c.eval() if isinstance(c, bnt.BatchNorm2d) else c.weight.data.mul_(2)  # a change only the copy sees
        y = c(x)
        if isinstance(c, bnt.BatchNorm2d):  # eval: the running statistics, and nothing counted
            torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, c.running_mean, c.running_var, c.weight,
                                                                         c.bias, False, 0.1, c.eps))
        else:
            assert not torch.equal(y, m(x))
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_convert_a_compiled_batch_norm():
    """A batch norm compiled with ``Module.compile()`` and then converted (or reverted): the
    replacement runs itself (eagerly), not the old module's compiled call."""
    ref = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    for m, swap in ((torch.nn.BatchNorm2d(3), bnt.convert), (bnt.BatchNorm2d(3), bnt.revert)):
        m.compile(backend="eager")
        new = swap(m).eval()
        torch.testing.assert_close(new(x), ref(x))  # eval: the running statistics
        assert int(new.num_batches_tracked) == 0


def small_cnn(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10),
    )


def train(model, data, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for step in range(steps):
        x, target = data[step]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_small_cnn_trains_like_torch(fmt, no_fallback):
    """5 SGD steps of conv-bn-relu x2 + linear, with and without convert, from the same seed.

    Tolerance: rtol = atol = 1e-5, helpers.py's float32 tolerance. The kernels sum in
    another order than torch (with float64 partials), so each BN output differs from
    torch's by float32 rounding (~1e-7 relative); the convolutions, the loss and 5 SGD
    steps with momentum carry that along without amplifying it much: measured differences
    are <= 1.1e-7 relative in the losses and <= 5e-7 (relative to the largest element) in
    the parameters, a factor 20 below the tolerance. A real mistake (wrong channel,
    variance, momentum or gradient) shows at 1e-3 or more after one step.
    """
    memory_format = getattr(torch, fmt.replace("contiguous", "contiguous_format"))
    gen = torch.Generator().manual_seed(1)
    # labels that depend on the input (which channel is brightest), so the loss can fall
    data = []
    for _ in range(5):
        x = torch.randn(32, 3, 8, 8, generator=gen) * 2 + 1
        data.append((x.to(memory_format=memory_format), x.mean((2, 3)).argmax(1)))
    plain = small_cnn(0).to(memory_format=memory_format)
    converted = bnt.convert(small_cnn(0).to(memory_format=memory_format))
    assert sum(type(m) is bnt.BatchNorm2d for m in converted.modules()) == 2
    losses_plain, losses_converted = train(plain, data), train(converted, data)
    np.testing.assert_allclose(losses_converted, losses_plain, rtol=1e-5, atol=1e-5)
    assert losses_plain[-1] < losses_plain[0]  # it learns something
    for (name, a), (_, b) in zip(converted.state_dict().items(), plain.state_dict().items()):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), name
        else:
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # eval mode agrees too
    x = data[0][0]
    with torch.no_grad():
        np.testing.assert_allclose(converted.eval()(x).numpy(), plain.eval()(x).numpy(),
                                   rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- graph capture


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_torchscript_scripts_and_saves_with_torchs_op(rng):
    """TorchScript cannot call the kernels (Python-bound): a scripted module runs torch's op."""
    for training in (True, False):
        ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnt.BatchNorm2d(4, momentum=None))
        ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=None))
        ref.load_state_dict(ours.state_dict())
        ours.train(training)
        ref.train(training)
        warm = torch.randn(2, 3, 8, 8)  # a module that has run (and cached its views) scripts too
        torch.testing.assert_close(ours(warm), ref(warm))
        scripted = torch.jit.script(ours)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        x = torch.randn(2, 3, 8, 8)
        expected = ref(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_trace_records_torchs_batch_norm(fallback_calls):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnt.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(m, x)
    assert "aten::batch_norm" in str(traced.inlined_graph)
    traced_calls = len(fallback_calls)
    assert traced_calls >= 1  # while tracing (and trace's check run)
    torch.testing.assert_close(traced(x), m(x))
    assert len(fallback_calls) == traced_calls  # the eager module runs the kernels again


# ---------------------------------------------------------------- the eager shortcut's cache


def test_cached_views_follow_swapped_memory_dtype_and_eps(rng, no_fallback):
    """The module caches NumPy views of its tensors; .data swaps, .double() and eps changes
    must be seen (a stale view would normalize with old parameters)."""
    ours, ref = pair(2, np.float32)
    ours.eval()
    ref.eval()
    x = make_x(rng, (2, 5, 3, 3), np.float32, None)
    with torch.no_grad():
        assert_close(ours(x), ref(x).numpy(), np.float32)
        for m in (ours, ref):
            m.weight.data = m.weight.data * 2 + 1  # new memory under the same Parameter
            m.running_var.data = m.running_var.data + 3
        assert_close(ours(x), ref(x).numpy(), np.float32)
        ours.eps = ref.eps = 0.5
        assert_close(ours(x), ref(x).numpy(), np.float32)
        ours.double()
        ref.double()
        assert_close(ours(x.double()), ref(x.double()).numpy(), np.float64)
        ours.load_state_dict(pair(2, np.float64)[1].state_dict())  # copied in place
        ref.load_state_dict(ours.state_dict())
        assert_close(ours(x.double()), ref(x.double()).numpy(), np.float64)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_cached_counter_follows_a_swapped_num_batches_tracked(grad, rng, no_fallback):
    """The shortcut counts batches through a cached view of num_batches_tracked; a counter
    replaced (a new tensor, .data, load_state_dict) must be the one counted, and with
    momentum=None the cumulative factor must come from it."""
    ours, ref = pair(2, np.float32, momentum=None)
    ref.load_state_dict(ours.state_dict())
    x = make_x(rng, (2, 5, 3, 3), np.float32, None, offset=1.0).requires_grad_(grad)

    def step() -> None:
        assert_close(ours(x).detach(), ref(x).detach().numpy(), np.float32)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        assert_close(ours.running_mean, ref.running_mean.numpy(), np.float32)
        assert_close(ours.running_var, ref.running_var.numpy(), np.float32)

    step()
    for m in (ours, ref):
        m.num_batches_tracked = torch.tensor(7)  # a new buffer object
    step()
    for m in (ours, ref):
        m.num_batches_tracked.data = torch.tensor(2)  # new memory under the same tensor
    step()
    state = ref.state_dict()
    state["num_batches_tracked"] = torch.tensor(40)
    for m in (ours, ref):
        m.load_state_dict(state)  # copied in place
    step()
    assert int(ours.num_batches_tracked) == 41


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_running_stats_version_counter_moves_like_torchs(grad, rng, no_fallback):
    ours, ref = pair(2, np.float32)
    x = make_x(rng, (2, 5, 3, 3), np.float32, None).requires_grad_(grad)
    before = [t._version for t in (ours.running_mean, ours.running_var, ref.running_mean, ref.running_var)]
    ours(x)
    ref(x)
    after = [t._version for t in (ours.running_mean, ours.running_var, ref.running_mean, ref.running_var)]
    # torch 2.13's CPU kernel updates them without a bump; so do the kernels
    assert after[0] - before[0] == after[2] - before[2]
    assert after[1] - before[1] == after[3] - before[3]


def test_input_requiring_grad_under_no_grad(rng, no_fallback):
    for training in (True, False):
        ours, ref = pair(2, np.float32)
        ours.train(training)
        ref.train(training)
        x = make_x(rng, (2, 5, 3, 3), np.float32, None).requires_grad_(True)
        with torch.no_grad():
            y = ours(x)
            assert_close(y, ref(x).numpy(), np.float32)
        assert not y.requires_grad


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_running_stats_made_to_require_grad_after_a_call_raise_as_in_torch(training):
    """requires_grad_ on the running statistics changes no memory the shortcut's cached views
    are keyed on: a module that has run before still gives torch's error for it, and no
    statistic moves."""
    x = torch.randn(4, 3, 5, 5)
    outcomes = []
    for cls in (torch.nn.BatchNorm2d, bnt.BatchNorm2d):
        m = cls(3).train(training)
        m(x)  # (the drop-in caches its views here)
        m.running_mean.requires_grad_(True)
        m.running_var.requires_grad_(True)
        before = [t.detach().clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        outcomes.append(error_of(lambda: m(x)))
        after = [m.running_mean.detach(), m.running_var.detach(), m.num_batches_tracked]
        assert all(torch.equal(a, b) for a, b in zip(before[:2], after[:2]))
    assert outcomes[0] is not None and outcomes[1] == outcomes[0]


def test_a_parameter_shrunk_in_place_after_a_call_raises_as_in_torch():
    """``.data =`` a shorter view of the same memory (same address, same stride): the cached
    views no longer apply, and the call is torch's error, not a read of the old length."""
    x = torch.randn(4, 3, 5, 5)
    outcomes = []
    for cls in (torch.nn.BatchNorm2d, bnt.BatchNorm2d):
        m = cls(3).eval()
        m(x)
        m.weight.data = m.weight.data[:2]
        outcomes.append(error_of(lambda: m(x)))
    assert outcomes[0] is not None and outcomes[1] == outcomes[0]


@pytest.mark.parametrize("training", ["no", None, 0, 1.0, np.True_, "tensor"])
def test_functional_training_must_be_a_bool_as_in_torch(training):
    """torch's batch_norm takes only a bool for ``training``: any other value is its TypeError
    (a truthy string ran a training step, moving the running statistics), nothing moved."""
    if training == "tensor":
        training = torch.tensor(False)
    x = torch.randn(4, 3, 5)
    outcomes = []
    for fn in (torch.nn.functional.batch_norm, bnt.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        outcomes.append(error_of(lambda: fn(x, rm, rv, None, None, training)))
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    assert outcomes[0] is not None and outcomes[0][0] == "TypeError" and outcomes[1] == outcomes[0]
