"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm in float16 and bfloat16 storage (float32
parameters and statistics, float32 math), by test_half.py's rule: within 1 half-type ulp of
the float64 result on the upcast input plus 8 float32 roundings of the terms that cancel.

In the forward those terms are x*invstd*w and mean*invstd*w (which cancel to the normalized
value) and the bias. The mean is a float32-lane statistic held to float32's target (relative
error 1e-7, under 2 float32 roundings of |mean|), so it moves y by up to 2 roundings of
|mean*invstd*w|: a value the normalization brings near -bias can miss by more than roundings
of |(x - mean)*invstd*w| + |bias|. (bfloat16 layer norm, 8x2x3x1000: one value in 48,000 did;
its mean was 0.28 float32 roundings off, which reproduces the kernel's output bit for bit.)
Run under every ISA (BATCHNORM_ISA=scalar|avx2|avx512|avx512_bf16)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import assert_unchanged, snapshot
from test_half import FORMAT, HALF, HALF_IDS, assert_within_ulp, half_input

ml_dtypes = pytest.importorskip("ml_dtypes")

ROWS = [(37, 19), (4, 6, 300), (8, 2, 3, 1000)]


def _forward_terms(y64, bias, mean_term):
    """The forward's terms: |y - bias| + |bias| + |mean*invstd*w| (see the module docstring)."""
    return np.abs(y64 - bias) + np.abs(bias) + np.abs(mean_term)


def _per_group(stat, x, groups, axis):
    """(N, G) statistics broadcast against x (channels at ``axis``)."""
    n, c = x.shape[0], x.shape[axis]
    s = np.repeat(np.asarray(stat, np.float64), c // groups, axis=1).reshape((n, c) + (1,) * (x.ndim - 2))
    return np.moveaxis(s, 1, axis)


def _group_mean(z, groups, axis):
    """Each (instance, group)'s mean of z, broadcast against z."""
    zc = np.moveaxis(z, axis, 1)
    return _per_group(zc.reshape(zc.shape[0], groups, -1).mean(-1), z, groups, axis)


def _group_gx_terms(gy64, x64, w, mean, invstd, groups, axis):
    """grad_x = invstd*(dy*w - a - xhat*c) with a = mean(dy*w), c = mean(dy*w*xhat) per group:
    |invstd*w*dy| + |invstd|*(|a| + |xhat*c|)."""
    i = _per_group(invstd, x64, groups, axis)
    g = gy64 * ref.bshape(w.astype(np.float64), x64.ndim, axis)
    xhat = (x64 - _per_group(mean, x64, groups, axis)) * i
    return np.abs(i) * (np.abs(g) + np.abs(_group_mean(g, groups, axis)) + np.abs(xhat * _group_mean(g * xhat, groups, axis)))


def _wb(rng, shape):
    return ((rng.standard_normal(shape) * 0.5 + 1).astype(np.float32),
            rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("shape", ROWS, ids=["x".join(map(str, s)) for s in ROWS])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_layer_and_rms_norm(dtype, shape, rng, threads):
    x = half_input(rng, shape, dtype, offset=3.0, std=2.0)
    r = half_input(rng, shape, dtype)
    gy = half_input(rng, shape, dtype)
    w, b = _wb(rng, shape[-1:])
    x64, r64, gy64, b64 = x.astype(np.float64), r.astype(np.float64), gy.astype(np.float64), b.astype(np.float64)
    y = bn.layer_norm(x, shape[-1:], w, b)
    assert y.dtype == dtype
    y64, mean, invstd = ref.layer_norm(x64, 1, w, b)
    assert_within_ulp(y, y64, dtype, _forward_terms(y64, b64, (mean * invstd)[..., None] * w))
    s = np.empty_like(x)
    y = bn.layer_norm(x, shape[-1:], w, b, residual=r, sum_out=s)
    assert_within_ulp(s, x64 + r64, dtype)
    ys64, ms, vs = ref.layer_norm(s.astype(np.float64), 1, w, b)
    assert_within_ulp(y, ys64, dtype, _forward_terms(ys64, b64, (ms * vs)[..., None] * w))
    y = bn.rms_norm(x, shape[-1:], w, 1e-5)
    assert y.dtype == dtype
    assert_within_ulp(y, ref.rms_norm(x64, 1, w, 1e-5)[0], dtype)

    m32, i32 = mean.astype(np.float32), invstd.astype(np.float32)
    gx, gw, gb = bn.layer_norm_backward(gy, x, shape[-1:], m32, i32, w)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == np.float32
    gx64, gw64, gb64 = ref.layer_norm_backward(gy64, x64, 1, m32, i32, w)
    n = shape[-1]
    xhat = (x64 - m32[..., None]) * i32[..., None]
    k = w * i32[..., None]
    a = (gy64 * w).sum(-1, keepdims=True) / n
    c = (gy64 * w * xhat).sum(-1, keepdims=True) / n
    assert_within_ulp(gx, gx64, dtype, np.abs(k) * np.abs(gy64) + np.abs(i32[..., None]) * (np.abs(a) + np.abs(xhat * c)))
    rows = x.size // n
    np.testing.assert_allclose(gw, gw64, rtol=1e-5, atol=1e-6 * np.sqrt(rows))
    np.testing.assert_allclose(gb, gb64, rtol=1e-5, atol=1e-6 * np.sqrt(rows))

    rr = ref.rms_norm(x64, 1, w, 1e-5)[1].astype(np.float32)
    gx, gw = bn.rms_norm_backward(gy, x, shape[-1:], rr, w)
    gx64, gw64 = ref.rms_norm_backward(gy64, x64, 1, rr, w)
    xr = x64 * rr[..., None]
    c = (gy64 * w * xr).sum(-1, keepdims=True) / n
    assert_within_ulp(gx, gx64, dtype, np.abs(w * rr[..., None] * gy64) + np.abs(rr[..., None] * xr * c))
    np.testing.assert_allclose(gw, gw64, rtol=1e-5, atol=1e-6 * np.sqrt(rows))


GROUPS = [((4, 6, 17, 33), 3), ((2, 8, 5), 8), ((8, 16, 32, 32), 4), ((64, 1200, 10), 400)]


@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
@pytest.mark.parametrize("shape,groups", GROUPS, ids=["x".join(map(str, s)) for s, _ in GROUPS])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_group_and_instance_norm(dtype, shape, groups, axis, rng, threads):
    x = half_input(rng, shape, dtype, offset=2.0, axis=axis)
    gy = half_input(rng, shape, dtype, axis=axis)
    c = shape[1]
    w, b = _wb(rng, c)
    x64, gy64 = x.astype(np.float64), gy.astype(np.float64)
    bb = ref.bshape(b.astype(np.float64), x.ndim, axis)
    y = bn.group_norm(x, groups, w, b, axis=axis)
    assert y.dtype == dtype
    wb = ref.bshape(w.astype(np.float64), x.ndim, axis)
    y64, mean, invstd = ref.group_norm(x64, groups, w, b, axis=axis)
    assert_within_ulp(y, y64, dtype, _forward_terms(y64, bb, _per_group(mean * invstd, x, groups, axis) * wb))
    m32, i32 = mean.astype(np.float32), invstd.astype(np.float32)
    gx, gw, gb = bn.group_norm_backward(gy, x, groups, m32, i32, w, axis=axis)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == np.float32
    gx64, gw64, gb64 = ref.group_norm_backward(gy64, x64, groups, m32, i32, w, axis=axis)
    assert_within_ulp(gx, gx64, dtype, _group_gx_terms(gy64, x64, w, m32, i32, groups, axis))
    per = x.size // c
    np.testing.assert_allclose(gb, gb64, rtol=1e-5, atol=1e-6 * np.sqrt(per))
    np.testing.assert_allclose(gw, gw64, rtol=1e-5, atol=1e-6 * np.sqrt(per))

    rm, rv = rng.standard_normal(c).astype(np.float32), (rng.random(c) + 0.5).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bn.instance_norm(x, rm, rv, w, b, axis=axis)
    y64, mean, invstd, nrm, nrv = ref.instance_norm(x64, rm0, rv0, w, b, 0.1, 1e-5, axis=axis)
    assert y.dtype == dtype and rm.dtype == np.float32
    assert_within_ulp(y, y64, dtype, _forward_terms(y64, bb, _per_group(mean * invstd, x, c, axis) * wb))
    np.testing.assert_allclose(rm, nrm, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(rv, nrv, rtol=2e-6, atol=1e-7)
    m32, i32 = mean.astype(np.float32), invstd.astype(np.float32)
    gx, gw, gb = bn.instance_norm_backward(gy, x, m32, i32, w, axis=axis)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == np.float32
    gx64, gw64, gb64 = ref.instance_norm_backward(gy64, x64, m32, i32, w, axis=axis)
    assert_within_ulp(gx, gx64, dtype, _group_gx_terms(gy64, x64, w, m32, i32, c, axis))
    np.testing.assert_allclose(gb, gb64, rtol=1e-5, atol=1e-6 * np.sqrt(per))
    np.testing.assert_allclose(gw, gw64, rtol=1e-5, atol=1e-6 * np.sqrt(per))


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_statistics_at_large_mean(dtype, rng, threads):
    """float32's targets at a mean of 1e4 (float16) and 1e6 (bfloat16)."""
    offset = FORMAT[dtype.name][2]
    x = half_input(rng, (8, 4, 4096), dtype, offset=offset, std=offset / 50)
    x64 = x.astype(np.float64)
    _, mean, invstd = ref.layer_norm(x64, 1)
    y, m, i = bn._core.layer_norm(x, 1, None, None, 1e-5, False, None, None, None)
    np.testing.assert_allclose(m, mean, rtol=1e-7)
    np.testing.assert_allclose(i, invstd, rtol=1e-6)
    assert_within_ulp(y, ref.layer_norm(x64, 1)[0], dtype)
    _, gm, gi = ref.group_norm(x64, 2)
    y, m, i = bn._core.group_norm(x, 2, None, None, 1e-5, 1, None, False)
    np.testing.assert_allclose(m, gm, rtol=1e-7)
    np.testing.assert_allclose(i, gi, rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_modules_float32_take_half(dtype, rng):
    x = half_input(rng, (4, 6, 10), dtype)
    for m in (bn.LayerNorm(10), bn.RMSNorm(10), bn.GroupNorm(3, 6), bn.InstanceNorm1d(6, affine=True, track_running_stats=True)):
        y = m(x)
        assert y.dtype == dtype and m.weight.dtype == np.float32
        assert m.backward(x).dtype == dtype


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_bad_input(dtype, rng):
    other = HALF[1] if dtype == HALF[0] else HALF[0]
    x = half_input(rng, (4, 6, 10), dtype)
    w = np.ones(10, np.float32)
    before = snapshot(x, w)
    out = np.zeros_like(x)
    with pytest.raises(TypeError, match="weight"):
        bn.layer_norm(x, (10,), w.astype(dtype), out=out)
    with pytest.raises(TypeError, match="weight"):
        bn.rms_norm(x, (10,), w.astype(other), out=out)
    with pytest.raises(TypeError, match="residual"):
        bn.layer_norm(x, (10,), w, residual=x.astype(other), out=out)
    with pytest.raises(TypeError, match="out"):
        bn.layer_norm(x, (10,), w, out=np.zeros(x.shape, other))
    with pytest.raises(TypeError, match="bias"):
        bn.group_norm(x, 2, np.ones(6, np.float32), np.zeros(6, other), out=out)
    rm = np.zeros(6, dtype)
    with pytest.raises(TypeError, match="running_mean"):
        bn.instance_norm(x, rm, np.ones(6, np.float32), out=out)
    with pytest.raises(TypeError, match="grad_y"):
        bn.group_norm_backward(x.astype(other), x, 2, np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="mean"):
        bn.layer_norm_backward(x, x, (10,), np.zeros((4, 6), dtype), np.ones((4, 6), np.float32))
    assert_unchanged(before, x, w)
    assert not out.any()


# ---------------------------------------------------------------- torch drop-ins


def _no_fallback(monkeypatch, torch):
    import batchnorm._torch_norms as tn

    class NoFallback:
        def __getattr__(self, name):
            if name in ("layer_norm", "rms_norm", "group_norm", "instance_norm"):
                def fallback(*args, **kwargs):
                    raise AssertionError(f"torch's {name} ran instead of the kernels")
                return fallback
            return getattr(torch.nn.functional, name)
    monkeypatch.setattr(tn, "F", NoFallback())


@pytest.mark.parametrize("param_dtype", ["float32", "same"])
@pytest.mark.parametrize("tdtype", ["float16", "bfloat16"])
def test_torch_drop_ins_in_half(tdtype, param_dtype, monkeypatch, rng):
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bt
    _no_fallback(monkeypatch, torch)
    dt = getattr(torch, tdtype)
    pdt = torch.float32 if param_dtype == "float32" else dt
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 50) * 2 + 3).to(dt)
    gy = torch.randn(4, 6, 50).to(dt)
    pairs = [(bt.LayerNorm(50), torch.nn.LayerNorm(50)), (bt.RMSNorm(50), torch.nn.RMSNorm(50)),
             (bt.GroupNorm(3, 6), torch.nn.GroupNorm(3, 6)),
             (bt.InstanceNorm1d(6, affine=True, track_running_stats=True),
              torch.nn.InstanceNorm1d(6, affine=True, track_running_stats=True))]
    for mine, theirs in pairs:
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn_like(p) * 0.5 + 1)
        mine.load_state_dict(theirs.state_dict())
        mine = mine.to(pdt)
        # the float64 reference on the parameters mine holds: rounded to pdt
        ref64 = theirs.to(pdt).double()
        xa = x.clone().requires_grad_()
        y = mine(xa)
        assert y.dtype == dt
        y.backward(gy)
        x64 = x.double().requires_grad_()
        y64 = ref64(x64)
        y64.backward(gy.double())
        np_dt = np.dtype(np.float16) if tdtype == "float16" else np.dtype(ml_dtypes.bfloat16)
        b = getattr(ref64, "bias", None)
        terms = np.abs(y64.detach().numpy()) + (0 if b is None else np.abs(b.detach().numpy()).max() * 2)
        assert_within_ulp(y.detach().float().numpy(), y64.detach().numpy(), np_dt, terms)
        for p, q in zip(mine.parameters(), ref64.parameters()):
            assert p.grad.dtype == pdt
            if pdt == torch.float32:
                np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-4, atol=1e-4)
        assert xa.grad.dtype == dt
        gx64 = x64.grad.numpy()
        np.testing.assert_allclose(xa.grad.float().numpy(), gx64, rtol=2 ** -7, atol=0.05 * np.abs(gx64).max())


@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm"])
@pytest.mark.parametrize("tdtype", ["float16", "bfloat16"])
def test_torch_functions_refuse_mixed_half_and_float32_parameters(tdtype, name):
    """A half input takes weight and bias both in its dtype or both float32; torch's CPU kernels
    refuse one of each, and the drop-in functions raise torch's error, not compute."""
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bt
    dt = getattr(torch, tdtype)
    x = torch.randn(2, 4, 5).to(dt)
    for weight, bias in ((torch.ones(4), torch.zeros(4).to(dt)), (torch.ones(4).to(dt), torch.zeros(4))):
        args = {"layer_norm": lambda f: f(x.transpose(1, 2), (4,), weight, bias),
                "group_norm": lambda f: f(x, 2, weight, bias),
                "instance_norm": lambda f: f(x, weight=weight, bias=bias)}[name]
        with pytest.raises(RuntimeError) as theirs:
            args(getattr(torch.nn.functional, name))
        with pytest.raises(RuntimeError) as ours:
            args(getattr(bt, name))
        assert str(ours.value) == str(theirs.value)
