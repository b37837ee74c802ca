"""Backward passes (module and functional) against the float64 reference and PyTorch autograd.

Tolerances (helpers.py): grad_x element-wise with rtol=1e-5 (float32) / 1e-12 (float64)
and atol scaled by max|weight*invstd| * max|grad_y| (the magnitude of the terms grad_x is
built from); grad_weight / grad_bias are sums over n elements, checked against
rtol * sum(|terms|).
"""

import re

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import (same_random_params, torch_cls, DTYPE_IDS, DTYPES, LAYOUTS, SHAPE_IDS, SHAPES, arrange, assert_close,
                     assert_close_sum, channels, in_other_memory_order, layout_ok, logical_data, make_input,
                     module_cls, rand_params, TRANSPOSE_SHAPES)


def check_grads(gx, gw, gb, x, gy, mean, invstd, w, axis, dtype, training=True, eps=None):
    x64 = np.asarray(x, np.float64)
    gy64 = np.asarray(gy, np.float64)
    nd = x64.ndim
    c = channels(x64, axis)
    w64 = np.ones(c) if w is None else np.asarray(w, np.float64)
    if training:
        egx, egw, egb = ref.backward_train(gy64, x64, mean, invstd, w64, axis)
    else:
        egx, egw, egb = ref.backward_eval(gy64, x64, mean, 1.0 / invstd**2 - eps, w64, eps, axis)
    scale = np.max(np.abs(w64 * invstd)) * max(1.0, np.max(np.abs(gy64), initial=0.0))
    assert_close(gx, egx, dtype, scale=scale, err_msg="grad_x")
    xhat = (x64 - ref.bshape(mean, nd, axis)) * ref.bshape(invstd, nd, axis)
    if gw is not None:
        assert_close_sum(gw, egw, ref.per_channel(np.abs(gy64 * xhat), axis).sum(0), dtype, "grad_weight")
    if gb is not None:
        assert_close_sum(gb, egb, ref.per_channel(np.abs(gy64), axis).sum(0), dtype, "grad_bias")


def cases():
    for s, sid in zip(SHAPES, SHAPE_IDS):
        for lay in LAYOUTS:
            if layout_ok(lay, len(s)):
                yield pytest.param(s, lay, id=f"{sid}-{lay}")


@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_backward_train(shape, layout, dtype, threads, rng):
    c = shape[1]
    x, axis = make_input(rng, shape, dtype, layout)
    gy, _ = arrange(rng.standard_normal(shape), dtype, layout)
    m = module_cls(len(shape))(c, dtype=dtype, axis=axis)
    w, b = rand_params(rng, c, dtype)
    m.weight[:] = w
    m.bias[:] = b
    y = m(x)
    gx = m.backward(gy)
    assert isinstance(gx, np.ndarray) and gx.shape == x.shape and gx.dtype == dtype
    assert m.weight_grad.shape == (c,) and m.weight_grad.dtype == dtype
    assert m.bias_grad.shape == (c,) and m.bias_grad.dtype == dtype
    mean, var = ref.stats(x, axis)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    check_grads(gx, m.weight_grad, m.bias_grad, x, gy, mean, invstd, w, axis, dtype)
    assert y.shape == x.shape


@pytest.mark.parametrize("shape", [(5, 3), (2, 17, 5), (2, 3, 4, 5), (1, 33, 3, 3), (2, 3, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_backward_eval_uses_running_stats(shape, layout, dtype, rng):
    c = shape[1]
    m = module_cls(len(shape))(c, dtype=dtype, axis=1 if layout != "channels_last" else -1)
    w, b = rand_params(rng, c, dtype)
    m.weight[:] = w
    m.bias[:] = b
    for _ in range(2):
        warm, axis = make_input(rng, shape, dtype, layout)
        m(warm)
    m.eval()
    x, axis = make_input(rng, shape, dtype, layout, offset=0.5)
    gy, _ = arrange(rng.standard_normal(shape), dtype, layout)
    m(x)
    gx = m.backward(gy)
    rmean = m.running_mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(m.running_var.astype(np.float64) + 1e-5)
    check_grads(gx, m.weight_grad, m.bias_grad, x, gy, rmean, invstd, w, axis, dtype,
                training=False, eps=1e-5)
    # grad_x is dy * weight * invstd_running: independent of x
    gx2 = m.backward(gy)
    np.testing.assert_array_equal(gx2, gx)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_backward_eval_without_running_stats_uses_batch_stats(dtype, rng):
    x = logical_data(rng, (3, 4, 5, 2)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    m = bn.BatchNorm2d(4, track_running_stats=False, dtype=dtype).eval()
    w, b = rand_params(rng, 4, dtype)
    m.weight[:] = w
    m.bias[:] = b
    m(x)
    gx = m.backward(gy)
    mean, var = ref.stats(x)
    check_grads(gx, m.weight_grad, m.bias_grad, x, gy, mean, 1 / np.sqrt(var + 1e-5), w, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_uses_last_forward(dtype, rng):
    m = bn.BatchNorm1d(3, dtype=dtype)
    x1 = logical_data(rng, (6, 3)).astype(dtype)
    x2 = logical_data(rng, (4, 3, 5), offset=2).astype(dtype)
    m(x1)
    m(x2)
    gy = rng.standard_normal(x2.shape).astype(dtype)
    gx = m.backward(gy)
    mean, var = ref.stats(x2)
    check_grads(gx, m.weight_grad, m.bias_grad, x2, gy, mean, 1 / np.sqrt(var + 1e-5), None, 1, dtype)


def test_backward_no_affine(rng):
    x = logical_data(rng, (4, 3, 5))
    gy = rng.standard_normal(x.shape)
    m = bn.BatchNorm1d(3, affine=False, dtype=np.float64)
    m(x)
    gx = m.backward(gy)
    mean, var = ref.stats(x)
    check_grads(gx, None, None, x, gy, mean, 1 / np.sqrt(var + 1e-5), None, 1, np.float64)


def test_backward_after_in_place_forward(rng):
    """out=x overwrites x.  DESIGN.md does not say whether backward is possible afterwards:
    it must either refuse clearly (RuntimeError naming the in-place forward) or give the
    gradient of the original x -- never a gradient computed from the overwritten x."""
    x = logical_data(rng, (4, 3, 5, 5)).astype(np.float32)
    x0 = x.copy()
    gy = rng.standard_normal(x.shape).astype(np.float32)
    m = bn.BatchNorm2d(3)
    m.weight[:] = [0.5, -1.0, 2.0]
    m(x, out=x)
    try:
        gx = m.backward(gy)
    except RuntimeError as e:
        assert re.search(r"in-place|in place|out=x", str(e)), str(e)
        return
    mean, var = ref.stats(x0)
    check_grads(gx, m.weight_grad, m.bias_grad, x0, gy, mean, 1 / np.sqrt(var + 1e-5), m.weight, 1, np.float32)


@pytest.mark.parametrize("make", [lambda: bn.BatchNorm1d(3), lambda: bn.LayerNorm(3), lambda: bn.GroupNorm(1, 3)],
                         ids=["BatchNorm1d", "LayerNorm", "GroupNorm"])
def test_backward_after_a_forward_beside_its_input(make, rng):
    """out and x side by side in one buffer ([x | bn(x)], a concatenation's buffer): out lies
    within x's bounds but shares no element with it, so x is intact and backward works (it
    raised as after out=x), giving what a separate out gives."""
    buffer = logical_data(rng, (8, 6)).astype(np.float32)
    x, out = buffer[:, :3], buffer[:, 3:]
    gy = rng.standard_normal((8, 3)).astype(np.float32)
    m, separate = make(), make()
    for module in (m, separate):
        module.weight[:] = [0.5, -1.0, 2.0]
    m(x, out=out)
    expected_y = separate(x.copy())
    np.testing.assert_array_equal(out, expected_y)
    np.testing.assert_array_equal(m.backward(gy), separate.backward(gy))
    np.testing.assert_array_equal(m.weight_grad, separate.weight_grad)


@pytest.mark.parametrize("shape,layout", [
    pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
    for s in [(5, 3), (2, 17, 5), (2, 3, 4, 5), (1, 33, 3, 3), (2, 1, 2, 3, 4)]
    for lay in LAYOUTS if layout_ok(lay, len(s))])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["w", "now"])
def test_functional_backward(shape, layout, dtype, with_weight, threads, rng):
    x, axis = make_input(rng, shape, dtype, layout)
    gy, _ = arrange(rng.standard_normal(shape), dtype, layout)
    c = channels(x, axis)
    w = rand_params(rng, c, dtype)[0] if with_weight else None
    mean64, var64 = ref.stats(x, axis)
    mean = mean64.astype(dtype)
    invstd = (1.0 / np.sqrt(var64 + 1e-5)).astype(dtype)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean, invstd, w, axis=axis)
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == gb.shape == (c,)
    check_grads(gx, gw, gb, x, gy, mean.astype(np.float64), invstd.astype(np.float64), w, axis, dtype)


def _odd_views(rng, shape, dtype):
    """grad_y views the bindings must copy before the kernels read them, by name: the gradient
    of ``y.sum()`` (every stride 0), a per-channel broadcast, reversed axes, a transpose."""
    n, c, length = shape
    return {
        "sum": np.broadcast_to(dtype(1.5), shape),
        "per_channel": np.broadcast_to(rng.standard_normal((1, c, 1)).astype(dtype), shape),
        "reversed": rng.standard_normal(shape).astype(dtype)[::-1, :, ::-1],
        "transposed": rng.standard_normal((length, c, n)).astype(dtype).transpose(2, 1, 0),
    }


@pytest.mark.parametrize("view", ["sum", "per_channel", "reversed", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional_backward_of_copied_grad_y(view, dtype, threads, rng):
    """A grad_y whose memory the kernels cannot read in place (broadcast, reversed,
    transposed) gives exactly the gradients of its dense copy, in every norm's backward."""
    shape = (3, 4, 37)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(dtype)
    gy = _odd_views(rng, shape, dtype)[view]
    assert not gy.flags.c_contiguous
    dense = _functional_backwards(x, np.ascontiguousarray(gy), w)
    for name, (call, expected, scale) in _functional_backwards(x, gy, w).items():
        got, want = call(None), dense[name][0](None)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {view}")
        assert_close(got[0], expected, dtype, scale=scale, err_msg=f"{name} {view}")


def _functional_backwards(x, gy, w):
    """Every functional backward as (call taking out, float64 reference grad_x, its scale),
    on statistics computed in float64 from ``x`` of shape (N, C, L)."""
    n, c = x.shape[:2]
    per_channel_mean, per_channel_var = ref.stats(x)
    _, ln_mean, ln_invstd = ref.layer_norm(x, 1)
    _, rms_invstd = ref.rms_norm(x, 1)
    _, gn_mean, gn_invstd = ref.group_norm(x, 2)
    _, in_mean, in_invstd = ref.group_norm(x, c)
    bn_invstd = 1.0 / np.sqrt(per_channel_var + 1e-5)
    dt = x.dtype

    def cast(*arrays):
        return [a.astype(dt) for a in arrays]

    def bound(invstd):
        return np.max(np.abs(invstd)) * np.max(np.abs(w)) * max(1.0, np.max(np.abs(gy)))

    bn_stats, ln_stats = cast(per_channel_mean, bn_invstd), cast(ln_mean, ln_invstd)
    gn_stats, in_stats = cast(gn_mean, gn_invstd), cast(in_mean, in_invstd)
    wl = np.resize(w, x.shape[-1]).astype(dt)  # layer/RMS weights span the last axis
    rms_stats = cast(rms_invstd)
    return {
        "batch_norm": (lambda out: bn.batch_norm_backward(gy, x, *bn_stats, w, out=out),
                       ref.backward_train(gy, x, per_channel_mean, bn_invstd, w)[0], bound(bn_invstd)),
        "layer_norm": (lambda out: bn.layer_norm_backward(gy, x, x.shape[-1], *ln_stats, wl, out=out),
                       ref.layer_norm_backward(gy, x, 1, ln_mean, ln_invstd, wl)[0], bound(ln_invstd)),
        "rms_norm": (lambda out: bn.rms_norm_backward(gy, x, x.shape[-1], *rms_stats, wl, out=out),
                     ref.rms_norm_backward(gy, x, 1, rms_invstd, wl)[0], bound(rms_invstd)),
        "group_norm": (lambda out: bn.group_norm_backward(gy, x, 2, *gn_stats, w, out=out),
                       ref.group_norm_backward(gy, x, 2, gn_mean, gn_invstd, w)[0], bound(gn_invstd)),
        "instance_norm": (lambda out: bn.instance_norm_backward(gy, x, *in_stats, w, out=out),
                          ref.instance_norm_backward(gy, x, in_mean, in_invstd, w)[0], bound(in_invstd)),
    }


OUT_KINDS = ["fresh", "strided", "grad_y"]


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"])
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
# Rows of 20000 are wider than the layer-norm backward's fused column sums take (a second pass).
@pytest.mark.parametrize("shape", [(3, 4, 37), (2, 2, 20000)], ids=["short", "wide"])
def test_functional_backward_into_out(name, out_kind, dtype, shape, threads, rng):
    """``out=`` receives grad_x in place (any strides, or grad_y itself) and is returned; the
    other gradients are the same as without it, to the bit."""
    x = logical_data(rng, shape, offset=0.5).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    w = rand_params(rng, shape[1], dtype)[0]
    call, expected_gx, scale = _functional_backwards(x, gy, w)[name]
    allocated = call(None)
    if out_kind == "fresh":
        out = np.full_like(x, np.nan)
    elif out_kind == "strided":
        out = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, dtype)[..., ::2]
    else:
        out = gy  # in place over grad_y: the reference and the first call read it before
    grads = call(out)
    assert grads[0] is out
    assert len(grads) == len(allocated)
    np.testing.assert_array_equal(out, allocated[0])
    for into, new in zip(grads[1:], allocated[1:]):
        np.testing.assert_array_equal(into, new)
    assert_close(out, expected_gx, dtype, scale=scale, err_msg="grad_x")


def test_functional_backward_into_torch_out(torch, rng):
    """A torch tensor as ``out`` is written through DLPack and returned as given."""
    x = logical_data(rng, (4, 3, 5, 5)).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    mean64, var64 = ref.stats(x)
    invstd64 = 1.0 / np.sqrt(var64 + 1e-5)
    mean, invstd = mean64.astype(np.float32), invstd64.astype(np.float32)
    out = torch.empty(x.shape).to(memory_format=torch.channels_last)
    gx, gw, gb = bn.batch_norm_backward(torch.from_numpy(gy), torch.from_numpy(x), mean, invstd, out=out)
    assert gx is out and isinstance(gw, torch.Tensor) and isinstance(gb, torch.Tensor)
    check_grads(out.numpy(), gw.numpy(), gb.numpy(), x, gy, mean64, invstd64, None, 1, np.float32)


@pytest.mark.parametrize("shape", [(5, 3), (4, 17, 33), (1, 3, 17, 3), (2, 33, 3, 1), (2, 3, 3, 1, 17)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_backward_matches_torch_autograd(torch, shape, dtype, training, rng):
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    c = shape[1]
    tcls = torch_cls(torch, len(shape))
    tm = tcls(c, dtype=tdt)
    m = module_cls(len(shape))(c, dtype=dtype)
    same_random_params(rng, m, tm, dtype)
    warm = logical_data(rng, shape).astype(dtype)
    m(warm)
    tm(torch.from_numpy(warm))
    m.train(training)
    tm.train(training)
    x = logical_data(rng, shape, offset=0.3).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    tm(xt).backward(torch.from_numpy(gy))
    m(x)
    gx = m.backward(gy)
    gy64 = gy.astype(np.float64)
    scale = np.max(np.abs(m.weight.astype(np.float64))) * 2 * max(1.0, np.abs(gy64).max())
    assert_close(gx, xt.grad.numpy(), dtype, scale=scale)
    if training:
        xhat = np.abs(ref.forward_train(x)[0])
    else:
        xhat = np.abs(ref.forward_eval(x, m.running_mean, m.running_var))
    assert_close_sum(m.weight_grad, tm.weight.grad.numpy(), ref.per_channel(np.abs(gy64) * xhat).sum(0), dtype)
    assert_close_sum(m.bias_grad, tm.bias.grad.numpy(), ref.per_channel(np.abs(gy64)).sum(0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_weight", [True, False])
def test_functional_backward_matches_torch_autograd(torch, dtype, with_weight, rng):
    F = torch.nn.functional
    x = logical_data(rng, (4, 5, 3, 6)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    w = rand_params(rng, 5, dtype)[0] if with_weight else None
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True) if with_weight else None
    bt = torch.zeros(5, dtype=xt.dtype, requires_grad=True)
    F.batch_norm(xt, None, None, wt, bt, True, 0.1, 1e-5).backward(torch.from_numpy(gy))
    mean, var = bn.batch_norm_stats(x)
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(dtype)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean, invstd, w)
    gy64 = gy.astype(np.float64)
    assert_close(gx, xt.grad.numpy(), dtype, scale=4 * max(1.0, np.abs(gy64).max()))
    xhat = np.abs(ref.forward_train(x)[0])
    if with_weight:
        assert_close_sum(gw, wt.grad.numpy(), ref.per_channel(np.abs(gy64) * xhat).sum(0), dtype)
    assert_close_sum(gb, bt.grad.numpy(), ref.per_channel(np.abs(gy64)).sum(0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rows_applied_in_many_chunks(dtype, threads, rng):
    # (N, C) rows past a sixteenth of any L2 this library meets: the apply pass of training and
    # backward walks each thread's rows in several chunks, last first, the first one short.
    shape = (200_003, 3)
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    w, b = rand_params(rng, 3, dtype)
    y = bn.batch_norm(x, None, None, w, b, training=True)
    assert_close(y, ref.forward_train(x, w, b)[0], dtype)
    mean64, var64 = ref.stats(x)
    mean, invstd = mean64.astype(dtype), (1.0 / np.sqrt(var64 + 1e-5)).astype(dtype)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean, invstd, w)
    check_grads(gx, gw, gb, x, gy, mean.astype(np.float64), invstd.astype(np.float64), w, 1, dtype)


@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES, ids=str)
@pytest.mark.parametrize("x_layout", ["channels_last", "cl_view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_backward_gy_in_the_transposed_layout(shape, x_layout, dtype, rng):
    """grad_y in the other of NCHW / NHWC memory (as autograd hands over a gradient that a
    different-layout op produced): copied into x's layout, in tiles, before the kernels run.
    Sizes not multiples of the tile leave partial tiles on both axes."""
    x, axis = make_input(rng, shape, dtype, x_layout if len(shape) > 2 else "contiguous")
    gy = in_other_memory_order(rng, shape, x, axis, dtype)
    c = x.shape[axis]
    m = module_cls(len(shape))(c, dtype=dtype, axis=axis)
    w, b = rand_params(rng, c, dtype)
    m.weight[:] = w
    m.bias[:] = b
    m(x)
    gx = m.backward(gy)
    mean, var = ref.stats(x, axis)
    check_grads(gx, m.weight_grad, m.bias_grad, x, gy, mean, 1.0 / np.sqrt(var + 1e-5), w, axis, dtype)
