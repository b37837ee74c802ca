"""The normalization family and batch norm's phase functions at the `_core` level, against a
float64 NumPy reference written here from the formulas (and against PyTorch where it applies).

Every test runs under the active ISA (BATCHNORM_ISA=scalar|avx2|avx512|avx512_bf16 selects one) and, where
it takes the `threads` fixture, at 1 and 2 threads. Shapes include channels-last memory, groups
split over threads (few groups, long segments) and rows long enough for several tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import _core

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}


# ---- float64 reference: a segment is the set of values that share one mean and variance ----


def _seg_forward(xs, eps, rms=False):
    """xs: (S, M) float64 segments. Returns (xhat, mean, invstd)."""
    if rms:
        invstd = 1.0 / np.sqrt((xs * xs).mean(axis=1) + eps)
        return xs * invstd[:, None], None, invstd
    mean = xs.mean(axis=1)
    d = xs - mean[:, None]
    invstd = 1.0 / np.sqrt((d * d).mean(axis=1) + eps)
    return d * invstd[:, None], mean, invstd


def _seg_backward(gs, xs, mean, invstd, rms=False):
    """gs = dy*w per element, (S, M). grad_x of xhat = (x - mean)*invstd (or x*rrms)."""
    if rms:
        return invstd[:, None] * gs - xs * invstd[:, None] ** 3 * (gs * xs).mean(axis=1)[:, None]
    xhat = (xs - mean[:, None]) * invstd[:, None]
    return invstd[:, None] * (gs - gs.mean(axis=1)[:, None] - xhat * (gs * xhat).mean(axis=1)[:, None])


def ref_layer_norm(x, nd, w, b, eps, rms=False, dy=None, saved=None):
    """Forward in float64; with dy, the backward too, from ``saved`` = (mean, invstd) when
    given: the statistics the backward kernel is handed, stored in the input's dtype. (With
    few values per row, some rows' variance is tiny, and the rounding of their saved
    statistics moves grad_x beyond float32 tolerances of the exact statistics' gradient.)"""
    x64 = np.asarray(x, np.float64)
    lead, norm = x.shape[: x.ndim - nd], x.shape[x.ndim - nd :]
    xs = x64.reshape(-1, int(np.prod(norm)))
    xhat, mean, invstd = _seg_forward(xs, eps, rms)
    wf = np.ones(xs.shape[1]) if w is None else np.asarray(w, np.float64).ravel()
    bf = np.zeros(xs.shape[1]) if b is None else np.asarray(b, np.float64).ravel()
    y = (xhat * wf + bf).reshape(x.shape)
    out = dict(y=y, mean=None if mean is None else mean.reshape(lead), invstd=invstd.reshape(lead))
    if dy is not None:
        if saved is not None:
            mean = None if saved[0] is None else np.asarray(saved[0], np.float64).ravel()
            invstd = np.asarray(saved[1], np.float64).ravel()
            xhat = (xs if rms else xs - mean[:, None]) * invstd[:, None]
        gs = np.asarray(dy, np.float64).reshape(xs.shape)
        out["gx"] = _seg_backward(gs * wf, xs, mean, invstd, rms).reshape(x.shape)
        out["gw"] = (gs * xhat).sum(axis=0).reshape(norm)
        out["gb"] = gs.sum(axis=0).reshape(norm)
    return out


def ref_group_norm(x, groups, w, b, eps, axis=1, dy=None, saved=None):
    """As ref_layer_norm: the backward from ``saved`` = (mean, invstd) when given."""
    x64 = np.moveaxis(np.asarray(x, np.float64), axis, 1)
    n, c = x64.shape[:2]
    xs = x64.reshape(n * groups, -1)
    xhat, mean, invstd = _seg_forward(xs, eps)
    bshape = (1, c) + (1,) * (x64.ndim - 2)
    wf = np.ones(bshape) if w is None else np.asarray(w, np.float64).reshape(bshape)
    bf = np.zeros(bshape) if b is None else np.asarray(b, np.float64).reshape(bshape)
    xhat_full = xhat.reshape(x64.shape)
    y = np.moveaxis(xhat_full * wf + bf, 1, axis)
    out = dict(y=y, mean=mean.reshape(n, groups), invstd=invstd.reshape(n, groups))
    if dy is not None:
        if saved is not None:
            mean, invstd = (np.asarray(a, np.float64).ravel() for a in saved)
            xhat_full = ((xs - mean[:, None]) * invstd[:, None]).reshape(x64.shape)
        g = np.moveaxis(np.asarray(dy, np.float64), axis, 1)
        gs = (g * wf).reshape(xs.shape)
        out["gx"] = np.moveaxis(_seg_backward(gs, xs, mean, invstd).reshape(x64.shape), 1, axis)
        red = (0,) + tuple(range(2, x64.ndim))
        out["gw"] = (g * xhat_full).sum(axis=red)
        out["gb"] = g.sum(axis=red)
    return out


def _close(got, want, dtype, scale=1.0):
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _data(rng, shape, dtype, offset=0.0, layout=None):
    x = (rng.standard_normal(shape) + offset).astype(dtype)
    if layout == "channels_last":  # same logical shape, channel axis innermost in memory
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose((0, x.ndim - 1) + tuple(range(1, x.ndim - 1)))
    return x


DTYPES = [np.float32, np.float64]


# ---- layer norm and RMS norm -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,nd", [((4, 7), 1), ((3, 5, 768), 1), ((2, 3, 4, 5), 2), ((2, 300000), 1), ((6,), 1),
                                      ((200000, 3), 1)])  # short rows, the scalar loop, over threads
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rms", [False, True])
def test_layer_norm_matches_reference(rng, threads, dtype, shape, nd, affine, rms):
    x = _data(rng, shape, dtype, offset=3.0)
    norm = shape[len(shape) - nd :]
    w = rng.standard_normal(norm).astype(dtype) if affine else None
    b = rng.standard_normal(norm).astype(dtype) if affine and not rms else None
    dy = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = _core.layer_norm(x, nd, w, b, 1e-5, rms)
    ref = ref_layer_norm(x, nd, w, b, 1e-5, rms, dy, saved=(mean, invstd))
    _close(y, ref["y"], dtype)
    _close(invstd, ref["invstd"], dtype)
    assert invstd.shape == shape[: len(shape) - nd] and invstd.dtype == dtype
    if rms:
        assert mean is None
    else:
        _close(mean, ref["mean"], dtype)
    gx, gw, gb = _core.layer_norm_backward(dy, x, mean, invstd, w, nd, rms)
    scale = np.sqrt(np.prod(shape) / np.prod(norm))  # column sums grow with the rows
    _close(gx, ref["gx"], dtype, scale=10)
    if affine:
        _close(gw, ref["gw"], dtype, scale=scale)
        assert gw.shape == norm
        if rms:
            assert gb is None
        else:
            _close(gb, ref["gb"], dtype, scale=scale)
    else:
        assert gw is None and gb is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("with_sum", [False, True])
def test_layer_norm_residual_writes_the_sum(rng, threads, dtype, rms, with_sum):
    x = _data(rng, (5, 1000), dtype)
    r = _data(rng, (5, 1000), dtype)
    w = rng.standard_normal(1000).astype(dtype)
    sum_out = np.full_like(x, np.nan) if with_sum else None
    y, _, _ = _core.layer_norm(x, 1, w, None, 1e-5, rms, None, r, sum_out)
    s = (x + r).astype(dtype)  # the sum is rounded to dtype, as the kernel stores it
    _close(y, ref_layer_norm(s, 1, w, None, 1e-5, rms)["y"], dtype)
    if with_sum:
        np.testing.assert_array_equal(sum_out, s)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_in_place_with_residual(rng, dtype):
    x = _data(rng, (3, 64), dtype)
    r = _data(rng, (3, 64), dtype)
    want = ref_layer_norm((x + r).astype(dtype), 1, None, None, 1e-5)["y"]
    y, _, _ = _core.layer_norm(x, 1, None, None, 1e-5, False, x, r)
    assert y is x
    _close(x, want, dtype)


# ---- group norm and instance norm --------------------------------------------------------------

GROUP_CASES = [
    ((2, 6, 5), 3),
    ((3, 8, 4, 4), 2),
    ((2, 64, 16, 16), 32),
    ((1, 4, 70000), 2),  # few long segments: split over threads
    ((4, 6), 3),  # no spatial dims
    ((2, 40000, 3), 8),  # many channels, short planes
    ((64, 3000, 4), 1500),  # many short segments (8 values): the scalar path, split over threads
    ((200000, 2, 2), 1),  # many tiny samples: the scalar path in channels-last memory too
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "axis_last"])
def test_group_norm_matches_reference(rng, threads, dtype, shape, groups, layout):
    c = shape[1]
    axis = 1
    if layout == "axis_last":
        shape = (shape[0],) + shape[2:] + (c,)
        axis = -1
    x = _data(rng, shape, dtype, offset=2.0, layout="channels_last" if layout == "channels_last" else None)
    w = rng.standard_normal(c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, mean, invstd = _core.group_norm(x, groups, w, b, 1e-5, axis)
    ref = ref_group_norm(x, groups, w, b, 1e-5, axis, dy, saved=(mean, invstd))
    assert y.strides == x.strides  # output in the input's memory layout
    _close(y, ref["y"], dtype)
    _close(mean, ref["mean"], dtype)
    _close(invstd, ref["invstd"], dtype)
    gx, gw, gb = _core.group_norm_backward(dy, x, mean, invstd, w, groups, axis)
    _close(gx, ref["gx"], dtype, scale=10)
    _close(gw, ref["gw"], dtype, scale=np.sqrt(np.prod(shape) / c))
    _close(gb, ref["gb"], dtype, scale=np.sqrt(np.prod(shape) / c))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_relu(rng, dtype):
    x = _data(rng, (2, 4, 9), dtype)
    y, _, _ = _core.group_norm(x, 2, None, None, 1e-5, 1, None, True)
    _close(y, np.maximum(ref_group_norm(x, 2, None, None, 1e-5)["y"], 0), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_running_stats(rng, threads, dtype, layout):
    x = _data(rng, (3, 5, 6, 7), dtype, offset=1.0, layout=None if layout == "contiguous" else "channels_last")
    rm = rng.standard_normal(5).astype(dtype)
    rv = rng.uniform(0.5, 2, 5).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = _core.instance_norm(x, None, None, rm, rv, 0.1, 1e-5)
    ref = ref_group_norm(x, 5, None, None, 1e-5)
    _close(y, ref["y"], dtype)
    _close(mean, ref["mean"], dtype)
    x64 = np.asarray(x, np.float64).reshape(3, 5, -1)
    _close(rm, 0.9 * rm0 + 0.1 * x64.mean(axis=2).mean(axis=0), dtype)
    _close(rv, 0.9 * rv0 + 0.1 * x64.var(axis=2, ddof=1).mean(axis=0), dtype)


def test_instance_norm_matches_torch(rng, torch):
    x = rng.standard_normal((4, 3, 10)).astype(np.float32)
    w, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    trm, trv = torch.zeros(3), torch.ones(3)
    y, _, _ = _core.instance_norm(x, w, b, rm, rv, 0.3, 1e-5)
    ty = torch.nn.functional.instance_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                           torch.from_numpy(b), True, 0.3, 1e-5)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-6, atol=1e-7)


def test_family_matches_torch_autograd(rng, torch):
    x = rng.standard_normal((2, 8, 5, 3))
    dy = rng.standard_normal(x.shape)
    w8, b8 = rng.standard_normal(8), rng.standard_normal(8)
    w15, b15 = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    cases = [
        ("group", lambda t, w, b: torch.nn.functional.group_norm(t, 4, w, b, 1e-5), w8, b8,
         lambda: _core.group_norm(x, 4, w8, b8, 1e-5),
         lambda m, s: _core.group_norm_backward(dy, x, m, s, w8, 4)),
        ("layer", lambda t, w, b: torch.nn.functional.layer_norm(t, (5, 3), w, b, 1e-5), w15, b15,
         lambda: _core.layer_norm(x, 2, w15, b15, 1e-5),
         lambda m, s: _core.layer_norm_backward(dy, x, m, s, w15, 2)),
        ("rms", lambda t, w, b: torch.nn.functional.rms_norm(t, (5, 3), w, 1e-5), w15, None,
         lambda: _core.layer_norm(x, 2, w15, None, 1e-5, True),
         lambda m, s: _core.layer_norm_backward(dy, x, m, s, w15, 2, True)),
    ]
    for name, fn, w, b, fwd, bwd in cases:
        tx = torch.tensor(x, requires_grad=True)
        tw = torch.tensor(w, requires_grad=True)
        tb = None if b is None else torch.tensor(b, requires_grad=True)
        ty = fn(tx, tw, tb)
        ty.backward(torch.tensor(dy))
        y, m, s = fwd()
        gx, gw, gb = bwd(m, s)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
        np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)
        if tb is not None:
            np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10, atol=1e-10, err_msg=name)


# ---- accuracy at a large offset ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["layer", "rms", "group", "group_cl", "instance"])
def test_float32_accuracy_at_mean_1e6(rng, threads, case):
    x64 = rng.standard_normal((4, 8, 64, 64)) + 1e6
    x = x64.astype(np.float32)
    if case == "layer":
        y, _, invstd = _core.layer_norm(x, 3, None, None, 1e-5)
        ref = ref_layer_norm(x, 3, None, None, 1e-5)
    elif case == "rms":
        y, _, invstd = _core.layer_norm(x, 3, None, None, 1e-5, True)
        ref = ref_layer_norm(x, 3, None, None, 1e-5, True)
    else:
        xx = x
        if case == "group_cl":
            xx = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        groups = 8 if case == "instance" else 2
        axis = -1 if case == "group_cl" else 1
        y, _, invstd = _core.group_norm(xx, groups, None, None, 1e-5, axis)
        ref = ref_group_norm(xx, groups, None, None, 1e-5, axis)
    var_ref = 1 / ref["invstd"].astype(np.float64) ** 2 - 1e-5
    var = 1 / np.asarray(invstd, np.float64) ** 2 - 1e-5
    assert np.max(np.abs(var / var_ref - 1)) <= 1e-6 * 4  # invstd is rounded to float32 (2^-24 each)
    assert np.max(np.abs(np.asarray(y, np.float64) - ref["y"])) <= 1e-5


# ---- batch norm's phase functions ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((8, 3, 5, 5), 1), ((8, 5, 5, 3), -1), ((50, 4), 1)])
def test_phases_compose_to_batch_norm(rng, threads, dtype, shape, axis):
    x = _data(rng, shape, dtype, offset=5.0)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    # Two "processes" holding halves of the batch, merged with Chan's formula in float64.
    halves = np.split(x, 2)
    parts = [_core.batch_moments(h, axis) for h in halves]
    (na, ma, m2a), (nb, mb, m2b) = parts
    assert ma.dtype == np.float64 and na == np.prod(shape) / 2 / c
    n = na + nb
    delta = mb - ma
    mean = ma + delta * nb / n
    m2 = m2a + m2b + delta**2 * na * nb / n
    y_ref, mean_ref, invstd_ref = _core.forward_train(x, w, b, None, None, 0.1, 1e-5, axis)
    ref_axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x64 = x.astype(np.float64)
    # float32 values are summed in float32 lanes flushed to float64 every few dozen values
    tol = 1e-12 if dtype == np.float64 else 1e-7
    np.testing.assert_allclose(mean, x64.mean(axis=ref_axes), rtol=tol)
    np.testing.assert_allclose(m2 / n, x64.var(axis=ref_axes), rtol=tol)
    invstd = (1 / np.sqrt(m2 / n + 1e-5)).astype(dtype)
    ys = [_core.batch_norm_apply(h, mean.astype(dtype), invstd, w, b, axis) for h in halves]
    _close(np.concatenate(ys), y_ref, dtype)
    dys = np.split(dy, 2)
    sums = [_core.batch_norm_backward_reduce(g, h, mean.astype(dtype), axis) for g, h in zip(dys, halves)]
    sum_dy = sums[0][0] + sums[1][0]
    sum_dy_xmu = sums[0][1] + sums[1][1]
    assert sum_dy.dtype == np.float64
    gxs = [_core.batch_norm_backward_apply(g, h, mean.astype(dtype), invstd, w, sum_dy, sum_dy_xmu, n, axis)
           for g, h in zip(dys, halves)]
    gx_ref, _, _ = _core.backward(dy, x, mean.astype(dtype), invstd, w, axis)
    _close(np.concatenate(gxs), gx_ref, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided_stats"])
def test_forward_eval_saves_the_statistics_it_used(rng, dtype, strided):
    """`saved` receives the running mean and 1/sqrt(running_var + eps), the latter computed in
    float64 and rounded once (what an eval backward takes as invstd), and y is unchanged by it."""
    x = _data(rng, (4, 5, 3, 3), dtype, offset=2.0)
    stats = rng.uniform(0.25, 3.0, (2, 5, 2)).astype(dtype)
    rm, rv = (stats[0, :, 0], stats[1, :, 0]) if strided else (stats[0, :, 0].copy(), stats[1, :, 0].copy())
    w, b = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    saved = np.full((2, 5), np.nan, dtype)
    y = _core.forward_eval(x, rm, rv, w, b, 1e-3, 1, None, None, False, saved)
    np.testing.assert_array_equal(saved[0], rm)
    np.testing.assert_array_equal(saved[1], (1.0 / np.sqrt(rv.astype(np.float64) + 1e-3)).astype(dtype))
    np.testing.assert_array_equal(y, _core.forward_eval(x, rm, rv, w, b, 1e-3, 1))
    x64 = x.astype(np.float64)
    expected = (x64 - rm[:, None, None]) / np.sqrt(rv.astype(np.float64)[:, None, None] + 1e-3) \
        * w[:, None, None] + b[:, None, None]
    _close(y, expected, dtype)


def test_forward_eval_rejects_a_bad_saved_and_writes_nothing():
    x, out = np.ones((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    read_only = np.zeros((2, 3), np.float32)
    read_only.flags.writeable = False
    stats = np.zeros((2, 3), np.float32)
    bad = [
        (np.zeros((2, 3), np.float64), TypeError, "saved has dtype float64"),
        (np.zeros((3, 2), np.float32), ValueError, r"saved must be a C-contiguous array of shape \(2, 3\)"),
        (np.zeros((3, 2), np.float32).T, ValueError, "saved must be a C-contiguous"),
        (read_only, ValueError, "saved is read-only"),
        (np.zeros((2, 12), np.float32)[:, :3], ValueError, "saved must be a C-contiguous"),
    ]
    for saved, error, message in bad:
        with pytest.raises(error, match=message):
            _core.forward_eval(x, rm, rv, None, None, 1e-5, 1, out, None, False, saved)
    with pytest.raises(ValueError, match="saved overlaps another argument"):
        _core.forward_eval(x, stats[0], stats[1], None, None, 1e-5, 1, out, None, False, stats)
    assert not out.any() and not stats.any()


# ---- bad input: named, and nothing written ------------------------------------------------------


def test_bad_input_is_named_and_changes_nothing():
    x = np.ones((2, 6, 4), np.float32)
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        _core.group_norm(x, 4, None, None, 1e-5, 1, out)
    with pytest.raises(ValueError, match="normalized_ndim"):
        _core.layer_norm(x, 4, None, None, 1e-5, False, out)
    with pytest.raises(ValueError, match="weight must have shape \\(6, 4\\)"):
        _core.layer_norm(x, 2, np.ones((4, 6), np.float32), None, 1e-5, False, out)
    with pytest.raises(TypeError, match="weight has dtype float64"):
        _core.layer_norm(x, 1, np.ones(4), None, 1e-5, False, out)
    with pytest.raises(ValueError, match="bias must be None"):
        _core.layer_norm(x, 1, None, np.ones(4, np.float32), 1e-5, True, out)
    with pytest.raises(ValueError, match="sum_out needs a residual"):
        _core.layer_norm(x, 1, None, None, 1e-5, False, out, None, np.zeros_like(x))
    with pytest.raises(ValueError, match="out overlaps sum_out"):
        _core.layer_norm(x, 1, None, None, 1e-5, False, out, x, out)
    with pytest.raises(ValueError, match="weight must have shape \\(6,\\)"):
        _core.group_norm(x, 3, np.ones(5, np.float32), None, 1e-5, 1, out)
    with pytest.raises(ValueError, match="batch axis"):
        _core.group_norm(x, 3, None, None, 1e-5, 0, out)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        _core.instance_norm(np.ones((2, 6, 1), np.float32), None, None, rm, rv, 0.1, 1e-5)
    for empty in [(0, 6, 1), (0, 6, 1, 1)]:  # torch reads the spatial sizes of an empty batch too
        with pytest.raises(ValueError, match="more than 1 spatial element"):
            bn.InstanceNorm1d(6)(np.ones(empty, np.float32)) if len(empty) == 3 else bn.instance_norm(np.ones(empty))
    with pytest.raises(ValueError, match="eps"):
        _core.instance_norm(x, None, None, rm, rv, 0.1, -1.0, 1, out)
    with pytest.raises(TypeError, match="sum_dy must have dtype float64"):
        _core.batch_norm_backward_apply(x, x, rm, rv, None, rm, rm, 8.0)
    with pytest.raises(ValueError, match="count must be positive"):
        _core.batch_norm_backward_apply(x, x, rm, rv, None, np.zeros(6), np.zeros(6), 0.0)
    assert not out.any()
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
