"""The inference path of ``BatchNorm1d/2d/3d.__call__`` in C++ (``_core.module_eval``): taken
for an eval-mode module with running statistics on an exact NumPy input, with the result,
saved context and backward of the Python method; everywhere else it returns None having
changed nothing, and the Python method runs with its own checks and messages."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import batchnorm.modules as modules
import reference as ref
from batchnorm import _core
from helpers import assert_close, module_cls, rand_params, snapshot, assert_unchanged

CASES = [((4, 6), 1), ((3, 5, 7), 1), ((2, 5, 4, 3), 1), ((2, 4, 3, 3, 2), 1), ((2, 4, 3, 5), -1), ((3, 7), -1)]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]


def eval_module(rng, shape, axis, dtype=np.float32, affine=True):
    c = shape[axis]
    m = module_cls(len(shape))(c, eps=1e-3, affine=affine, dtype=dtype, axis=axis)
    if affine:
        m.weight[:], m.bias[:] = rand_params(rng, c, dtype)
    m.running_mean[:] = rng.uniform(-1, 1, c)
    m.running_var[:] = rng.uniform(0.5, 2, c)
    m.eval()(np.zeros(shape, dtype))  # the first call, in Python, makes the saved-statistics array
    return m


def python_path(monkeypatch):
    """Make __call__ take its Python path: the C++ one declines every call."""
    monkeypatch.setattr(modules, "_module_eval", lambda module, x, out: None)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape, axis", CASES, ids=CASE_IDS)
def test_eval_call_is_the_reference_and_keeps_its_backward(rng, shape, axis, dtype, affine):
    m = eval_module(rng, shape, axis, dtype, affine)
    x = rng.standard_normal(shape).astype(dtype)
    y = _core.module_eval(m, x, None)
    assert y is not None  # the C++ path applies
    assert_close(y, ref.forward_eval(x, m.running_mean, m.running_var, m.weight, m.bias, 1e-3, axis), dtype)
    stats = (m.running_mean.copy(), m.running_var.copy())
    m.running_mean[:] += 5  # the backward uses the forward's statistics, not the buffers' new values
    gy = rng.standard_normal(shape).astype(dtype)
    gx = m.backward(gy)
    expected = ref.backward_eval(gy, x, *stats, m.weight, 1e-3, axis)
    assert_close(gx, expected[0], dtype)
    if affine:
        assert_close(m.weight_grad, expected[1], dtype, scale=np.abs(gy).sum() / shape[axis])
        assert_close(m.bias_grad, expected[2], dtype, scale=np.abs(gy).sum() / shape[axis])


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("shape, axis", CASES, ids=CASE_IDS)
def test_the_call_matches_the_python_method_bit_for_bit(rng, monkeypatch, shape, axis, with_out):
    x = rng.standard_normal(shape).astype(np.float32)
    results = []
    for path in ("c++", "python"):
        if path == "python":
            python_path(monkeypatch)
        m = eval_module(np.random.default_rng(1), shape, axis)
        out = np.full(shape, np.nan, np.float32) if with_out else None
        y = m(x, out)
        assert (y is out) if with_out else (y is not x)
        saved_x, saved_out = m._saved[0], m._saved[1]
        assert saved_x is x and saved_out is out
        results.append((y.copy(), m.backward(np.ones(shape, np.float32)).copy(), m.weight_grad.copy()))
    for fast, slow in zip(*results):
        np.testing.assert_array_equal(fast, slow)


def test_half_input_of_a_float32_module(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = eval_module(rng, (2, 5, 3, 3), 1)
    for half in (np.float16, ml_dtypes.bfloat16):
        x = rng.standard_normal((2, 5, 3, 3)).astype(half)
        y = _core.module_eval(m, x, None)
        assert y is not None and y.dtype == half
        np.testing.assert_array_equal(y.view(np.uint16), bn.functional.batch_norm(
            x, m.running_mean, m.running_var, m.weight, m.bias, eps=1e-3).view(np.uint16))


class Subclass(np.ndarray):
    pass


def declined_cases(rng):
    """(name, module, x, out): calls the C++ path leaves to the Python method."""
    x = rng.standard_normal((2, 5, 3, 3)).astype(np.float32)
    cases = [("training", eval_module(rng, x.shape, 1).train(), x, None),
             ("ndarray subclass", eval_module(rng, x.shape, 1), x.view(Subclass), None),
             ("a list", eval_module(rng, x.shape, 1), x.tolist(), None),
             ("rank the class refuses", eval_module(rng, x.shape, 1), x[0], None),
             ("other channel count", eval_module(rng, x.shape, 1), x[:, :4], None),
             ("float64 input", eval_module(rng, x.shape, 1), x.astype(np.float64), None),
             ("read-only out", eval_module(rng, x.shape, 1), x, np.zeros_like(x)),
             ("out of another shape", eval_module(rng, x.shape, 1), x, np.zeros((2, 5, 3, 2), np.float32))]
    cases[6][3].flags.writeable = False
    untracked = bn.BatchNorm2d(5, track_running_stats=False).eval()  # no running statistics
    cases.append(("no running statistics", untracked, x, None))
    fresh = bn.BatchNorm2d(5).eval()  # no call yet: the Python method makes that array first
    cases.append(("no saved-statistics array yet", fresh, x, None))
    huge_axis = eval_module(rng, x.shape, 1)
    huge_axis.axis = 1 << 70
    cases.append(("axis past a C long", huge_axis, x, None))
    return cases


@pytest.mark.parametrize("case", range(11))
def test_declined_calls_change_nothing(rng, case):
    name, m, x, out = declined_cases(rng)[case]
    before = snapshot(m, *(a for a in (x, out) if isinstance(a, np.ndarray)))
    saved = m._saved
    assert _core.module_eval(m, x, out) is None, name
    assert m._saved is saved, name
    assert_unchanged(before, m, *(a for a in (x, out) if isinstance(a, np.ndarray)))


def test_declined_calls_raise_the_python_methods_errors(rng, monkeypatch):
    messages = []
    for attempt in ("c++", "python"):
        if attempt == "python":
            python_path(monkeypatch)
        found = []
        for name, m, x, out in declined_cases(np.random.default_rng(2)):
            try:
                m(x, out)
                found.append((name, None))
            except Exception as error:  # noqa: BLE001 - the comparison is the point
                found.append((name, f"{type(error).__name__}: {error}"))
        messages.append(found)
    assert messages[0] == messages[1]
    assert dict(messages[0])["float64 input"].startswith("TypeError: x has dtype float64")
    assert dict(messages[0])["training"] is None  # a training call goes on in Python
