"""Property-based tests (hypothesis): random ranks, shapes, channel axes, memory layouts,
dtypes, offsets, momentum, affine flags and thread counts against the float64 reference.

Tolerances: float32 rtol=atol=1e-5 scaled by the magnitude of the quantity (offsets up to
1e3 make |mean| up to ~1e3, so means/running means use atol * |offset|); float64 1e-12.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import batchnorm as bn  # noqa: E402
import reference as ref  # noqa: E402
from helpers import assert_close, assert_close_sum, module_cls  # noqa: E402

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 9)) for _ in range(ndim)]
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:      # training needs > 1 value per channel
        other = 0 if axis % ndim != 0 else 1
        shape[other] = 2
    perm = draw(st.permutations(range(ndim)))   # memory order
    step = draw(st.sampled_from([1, 1, 2, -1]))   # strided / reversed views
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = draw(st.sampled_from([0.0, 1.0, -30.0, 1e3]))
    seed = draw(st.integers(0, 2**32 - 1))
    threads = draw(st.sampled_from([1, 2]))
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    affine = draw(st.booleans())
    return tuple(shape), axis, perm, step, dtype, offset, seed, threads, momentum, affine


def build(shape, perm, step, dtype, values):
    """An array with the given values, memory order `perm`, and stride `step` on axis perm[-1]."""
    mem_shape = [shape[p] for p in perm]
    last = list(mem_shape)
    last[-1] = last[-1] * abs(step)
    base = np.full(last, 7777.0, dtype)
    idx = [slice(None)] * len(shape)
    idx[-1] = slice(None, None, step)
    view = base[tuple(idx)]
    inv = np.argsort(perm)
    x = np.transpose(view, inv)
    x[...] = values
    return x


@SETTINGS
@given(problems())
def test_forward_backward_property(p):
    shape, axis, perm, step, dtype, offset, seed, threads, momentum, affine = p
    rng = np.random.default_rng(seed)
    values = offset + rng.standard_normal(shape) * rng.uniform(0.5, 2.0)
    x = build(shape, perm, step, dtype, values)
    assert np.array_equal(x, values.astype(dtype))
    c = shape[axis]
    cls = module_cls(len(shape))
    old = bn.get_num_threads()
    bn.set_num_threads(threads)
    try:
        m = cls(c, momentum=momentum, affine=affine, dtype=dtype, axis=axis)
        r = ref.RefBatchNorm(c, momentum=momentum, affine=affine, axis=axis)
        if affine:
            w = rng.uniform(0.5, 1.5, c).astype(dtype)
            m.weight[:] = w
            r.weight = w.astype(np.float64)
        y = m(x)
        ey = r(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert_close(y, ey, dtype)
        big = max(1.0, abs(offset) + 6)
        assert_close(m.running_mean, r.running_mean, dtype, scale=big)
        assert_close(m.running_var, r.running_var, dtype, scale=4)
        gy = rng.standard_normal(shape).astype(dtype)
        gx = m.backward(gy)
        egx, egw, egb = r.backward(gy)
        winv = (np.abs(r.weight) if affine else 1.0) * np.max(r._saved[3])
        assert_close(gx, egx, dtype, scale=np.max(winv) * 2 * max(1.0, np.abs(gy).max()))
        if affine:
            xhat = np.abs(ref.forward_train(x, axis=axis)[0])
            gabs = np.abs(gy.astype(np.float64))
            assert_close_sum(m.weight_grad, egw, ref.per_channel(gabs * xhat, axis).sum(0), dtype, "gw")
            assert_close_sum(m.bias_grad, egb, ref.per_channel(gabs, axis).sum(0), dtype, "gb")
        mean, var = bn.batch_norm_stats(x, axis=axis)
        em, ev = ref.stats(x, axis)
        assert_close(mean, em, dtype, scale=big)
        assert_close(var, ev, dtype, scale=4)
        m.eval()
        r.training = False
        x2 = build(shape, perm, step, dtype, values[::-1])
        assert_close(m(x2), r(x2), dtype)
    finally:
        bn.set_num_threads(old)


@SETTINGS
@given(problems(), st.booleans(), st.sampled_from([None, "relu"]))
def test_eval_fusion_and_in_place_property(p, with_res, act):
    shape, axis, perm, step, dtype, offset, seed, threads, momentum, affine = p
    rng = np.random.default_rng(seed)
    values = offset + rng.standard_normal(shape)
    x = build(shape, perm, step, dtype, values)
    c = shape[axis]
    rm = (offset + rng.standard_normal(c)).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    w = rng.uniform(-1.5, 1.5, c).astype(dtype) if affine else None
    b = rng.uniform(-1, 1, c).astype(dtype) if affine else None
    res = rng.standard_normal(shape).astype(dtype) if with_res else None
    expect = ref.fused_eval(x, rm, rv, w, b, 1e-5, axis, res, act)
    old = bn.get_num_threads()
    bn.set_num_threads(threads)
    try:
        y = bn.batch_norm(x, rm, rv, w, b, axis=axis, out=x, residual=res, activation=act)
    finally:
        bn.set_num_threads(old)
    assert np.shares_memory(y, x)
    assert_close(x, expect, dtype)
