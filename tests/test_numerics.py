"""Accuracy of the statistics and of the output at large means (DESIGN.md "Statistics must
be accurate"), and NaN/Inf confinement.

Targets (DESIGN.md), measured against float64 statistics OF THE SAME float32 data
(reference.stats, corrected two-pass in float64):

* float32: batch-variance relative error <= 1e-6, output absolute error <= 1e-5.
* float64: variance relative error <= 1e-12; output absolute error <= 1e-12 plus the
  representability floor of the mean: a float64 mean near `offset` is only defined to
  half an ulp (offset * 2^-53), and both the library and the reference round it, so
  their outputs may differ by up to ~2 ulps(offset) / std = 4 * eps64 * offset / std.
  (1e-12 itself is what the target says; the floor only matters at offset/std >= 1e3.)
* means are compared with the same rule: error <= rtol * std + one ulp of the stored dtype.
"""

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES

# (offset, std)
DISTS = [(0.0, 1.0), (1e2, 1.0), (1e4, 1.0), (1e6, 1.0), (1e3, 1e-2)]
DIST_IDS = ["off0", "off1e2", "off1e4", "off1e6", "off1e3-std1e-2"]
# (shape, axis)
LAYOUTS = [((8, 16, 28, 28), 1), ((32, 16, 7, 7), 1), ((4096, 16), 1), ((8, 28, 28, 16), -1)]
LAYOUT_IDS = ["NCHW", "NCHW-7x7", "NC", "NHWC-axis-1"]

VAR_RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
OUT_ATOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
EPS64 = np.finfo(np.float64).eps


def data(shape, dtype, offset, std, seed):
    rng = np.random.default_rng(seed)
    return (offset + std * rng.standard_normal(shape)).astype(dtype)


def out_atol(dtype, offset, std):
    d = np.dtype(dtype)
    floor = 4 * EPS64 * abs(offset) / std if d == np.float64 else 0.0
    return OUT_ATOL[d] + floor


def mean_atol(dtype, offset, std):
    """float32 means come out rounded to float32 (half an ulp, one ulp allowed); float64
    means have the same representability floor as the output (see the module docstring)."""
    d = np.dtype(dtype)
    if d == np.float64:
        return VAR_RTOL[d] * std + 4 * EPS64 * abs(offset)
    return VAR_RTOL[d] * std + float(np.spacing(np.asarray(abs(offset) + 6 * std, dtype=d)))


@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_stats_accuracy(dist, layout, dtype, threads):
    offset, std = dist
    shape, axis = layout
    x = data(shape, dtype, offset, std, 1)
    mean, var = bn.batch_norm_stats(x, axis=axis)
    m_ref, v_ref = ref.stats(x, axis)
    d = np.dtype(dtype)
    rel = np.abs(var.astype(np.float64) - v_ref) / v_ref
    # float32 results are rounded to float32 once (<= 2^-24 = 6e-8 relative), inside the bound
    assert rel.max() <= VAR_RTOL[d], f"variance relative error {rel.max():.3g} > {VAR_RTOL[d]}"
    merr = np.abs(mean.astype(np.float64) - m_ref).max()
    assert merr <= mean_atol(dtype, offset, std), f"mean error {merr:.3g}"


# Deviations of one size, +-1.1 around 1e4: every squared deviation rounds the same way when a
# float32 lane adds it, so the error of a lane grows with the values it takes before its flush
# into float64 (the kernels' budget of additions, kFlushVectors in kernels/table.hpp). Random
# data hide a missing flush; here the kernels with their flushes removed were off by 1.3e-6 to
# 2e-5 on these shapes (channel path, plane blocks in and beyond the L2), with them by <= 1e-7.
REPEATED_LAYOUTS = [((1, 4, 100000), 1), ((1, 4, 16000), 1), ((1024, 4, 7, 7), 1), ((4096, 4, 7, 7), 1),
                    ((256, 4, 14, 14), 1), ((2048, 4, 14, 14), 1), ((100000, 4), 1), ((4096, 7, 7, 4), -1)]


@pytest.mark.parametrize("layout", REPEATED_LAYOUTS, ids=lambda layout: "x".join(map(str, layout[0])))
def test_stats_accuracy_repeated_squares(layout, threads):
    shape, axis = layout
    signs = np.random.default_rng(0).integers(0, 2, size=shape)
    x = (1e4 + np.where(signs == 1, 1.1, -1.1)).astype(np.float32)
    _, var = bn.batch_norm_stats(x, axis=axis)
    _, v_ref = ref.stats(x, axis)
    rel = np.abs(var.astype(np.float64) - v_ref) / v_ref
    assert rel.max() <= VAR_RTOL[np.dtype(np.float32)], f"variance relative error {rel.max():.3g}"


@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_train_output_accuracy(dist, layout, dtype, threads):
    offset, std = dist
    shape, axis = layout
    c = shape[axis]
    x = data(shape, dtype, offset, std, 2)
    cls = {2: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)]
    m = cls(c, momentum=1.0, dtype=dtype, axis=axis)   # momentum 1: running = this batch's stats
    y = m(x)
    y_ref, m_ref, _, rm_ref, rv_ref = ref.forward_train(x, None, None, np.zeros(c), np.ones(c),
                                                       1.0, 1e-5, axis)
    err = np.abs(y.astype(np.float64) - y_ref).max()
    assert err <= out_atol(dtype, offset, std), f"output abs error {err:.3g}"
    d = np.dtype(dtype)
    rel = np.abs(m.running_var.astype(np.float64) - rv_ref) / rv_ref
    assert rel.max() <= VAR_RTOL[d], f"running_var relative error {rel.max():.3g}"
    merr = np.abs(m.running_mean.astype(np.float64) - rm_ref).max()
    assert merr <= mean_atol(dtype, offset, std), f"running_mean error {merr:.3g}"

    # eval with those running stats, as stored (the reference uses the stored values)
    m.eval()
    x2 = data(shape, dtype, offset, std, 3)
    y2 = m(x2)
    y2_ref = ref.forward_eval(x2, m.running_mean, m.running_var, None, None, 1e-5, axis)
    err = np.abs(y2.astype(np.float64) - y2_ref).max()
    assert err <= out_atol(dtype, offset, std), f"eval output abs error {err:.3g}"


@pytest.mark.parametrize("dist", DISTS, ids=DIST_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional_output_accuracy(dist, dtype, threads):
    offset, std = dist
    x = data((8, 28, 28, 16), dtype, offset, std, 4)
    y = bn.batch_norm(x, None, None, training=True, axis=-1)
    y_ref = ref.forward_train(x, axis=-1)[0]
    err = np.abs(y.astype(np.float64) - y_ref).max()
    assert err <= out_atol(dtype, offset, std), f"output abs error {err:.3g}"


# ------------------------------------------------------------------ NaN / Inf confinement

NAN_CASES = [((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1), ((64, 5), 1), ((3, 5, 40), 1)]
NAN_IDS = ["NCHW", "NHWC", "NC", "NCL"]


def poison(x, axis):
    """NaN at one element of channel 1, +Inf at one element of channel 3."""
    x = x.copy()
    xm = np.moveaxis(x, axis, -1)   # view
    xm[(0,) * (x.ndim - 1) + (1,)] = np.nan
    xm[(-1,) * (x.ndim - 1) + (3,)] = np.inf
    return x


def chan(a, axis, c):
    return np.take(a, c, axis=axis)


@pytest.mark.parametrize("case", NAN_CASES, ids=NAN_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_stays_in_its_channel_training(case, dtype, threads):
    shape, axis = case
    rng = np.random.default_rng(5)
    x = poison(rng.standard_normal(shape).astype(dtype), axis)
    clean = [0, 2, 4]
    mean, var = bn.batch_norm_stats(x, axis=axis)
    assert np.isnan(mean[1]) and np.isnan(var[1])
    assert mean[3] == np.inf and np.isnan(var[3])  # as float64 NumPy and torch: inf, and inf - inf
    m_ref, v_ref = ref.stats(np.take(x, clean, axis=axis), axis)
    np.testing.assert_allclose(mean[clean], m_ref, rtol=1e-5, atol=1e-6 if dtype == np.float32 else 1e-12)
    np.testing.assert_allclose(var[clean], v_ref, rtol=1e-6 if dtype == np.float32 else 1e-12)

    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](5, dtype=dtype, axis=axis)
    y = m(x)
    for c in (1, 3):
        assert not np.isfinite(chan(y, axis, c)).any(), f"channel {c} should be non-finite"
    y_ref = ref.forward_train(np.take(x, clean, axis=axis), axis=axis)[0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.take(y, clean, axis=axis), y_ref, **tol)
    assert np.isfinite(m.running_mean[clean]).all() and np.isfinite(m.running_var[clean]).all()
    assert np.isnan(m.running_mean[1]) and m.running_mean[3] == np.inf
    assert np.isnan(m.running_var[1]) and np.isnan(m.running_var[3]), m.running_var

    gy = rng.standard_normal(shape).astype(dtype)
    gx = m.backward(gy)
    assert np.isfinite(np.take(gx, clean, axis=axis)).all()
    assert np.isfinite(m.weight_grad[clean]).all() and np.isfinite(m.bias_grad).all()
    assert np.isnan(m.weight_grad[1])


# Every statistics path: channels-first planes (with several tiles per channel), short planes
# read in blocks or as rows, channels-last.
INF_CASES = [((4, 5, 6, 7), 1), ((64, 5, 2), 1), ((64, 5, 8), 1), ((4096, 5), 1), ((3, 5, 50000), 1),
             ((4, 6, 7, 5), -1)]
INF_IDS = ["NCHW", "NCL-2", "NCL-8", "NC", "NCL-tiles", "NHWC"]


@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("case", INF_CASES, ids=INF_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_infinity_gives_an_infinite_mean(case, dtype, sign, threads):
    """A channel holding one infinity has that infinity as its mean and a NaN variance, as the
    float64 mean and torch give; the first value of channel 1 is one (where a shift would be
    probed), the last of channel 3 (after the shift was chosen)."""
    shape, axis = case
    x = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    xm = np.moveaxis(x, axis, -1)
    xm[(0,) * (x.ndim - 1) + (1,)] = sign * np.inf
    xm[(-1,) * (x.ndim - 1) + (3,)] = sign * np.inf
    ref_mean = np.mean(np.moveaxis(x, axis, -1).reshape(-1, 5).astype(np.float64), axis=0)
    assert ref_mean[1] == ref_mean[3] == sign * np.inf
    mean, var = bn.batch_norm_stats(x, axis=axis)
    np.testing.assert_array_equal(mean[[1, 3]], ref_mean[[1, 3]])
    assert np.isnan(var[[1, 3]]).all()
    np.testing.assert_allclose(mean[[0, 2, 4]], ref_mean[[0, 2, 4]], rtol=1e-5, atol=1e-6)

    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](5, dtype=dtype, axis=axis)
    y = m(x)
    assert np.isnan(chan(y, axis, 1)).all() and np.isnan(chan(y, axis, 3)).all()
    np.testing.assert_array_equal(m.running_mean[[1, 3]], [sign * np.inf] * 2)
    assert np.isnan(m.running_var[[1, 3]]).all() and np.isfinite(m.running_var[[0, 2, 4]]).all()

    torch = pytest.importorskip("torch")
    t = torch.nn.functional
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    t.batch_norm(torch.from_numpy(np.moveaxis(x, axis, 1).astype(np.float64)), rm, rv, training=True)
    np.testing.assert_array_equal(m.running_mean[[1, 3]], rm.numpy()[[1, 3]])
    np.testing.assert_array_equal(np.isnan(m.running_var), np.isnan(rv.numpy()))


def test_sync_merge_keeps_an_infinite_rank_mean():
    """SyncBatchNorm's merge of the ranks' partials: a rank whose mean is +inf makes the mean
    +inf (not NaN), and finite ranks merge to the float64 mean of all their values."""
    from batchnorm.distributed import merge

    parts = [np.array([1.0, 2.0, 4.0]), np.array([3.0, 7.0]), np.array([np.inf, 1.0]), np.array([5.0])]
    counts = np.array([len(p) for p in parts], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        means = np.array([[p.mean(), p.mean()] for p in parts])
        m2s = np.array([[((p - p.mean()) ** 2).sum()] * 2 for p in parts])
    means[2, 1], m2s[2, 1] = 2.0, 2.0  # column 1: rank 2 finite
    count, mean, m2 = merge(counts, means, m2s)
    assert count == 8
    assert mean[0] == np.inf and np.isnan(m2[0])
    finite = np.concatenate([parts[0], parts[1], [1.0, 3.0], parts[3]])
    np.testing.assert_allclose(mean[1], finite.mean(), rtol=1e-15)
    np.testing.assert_allclose(m2[1], ((finite - finite.mean()) ** 2).sum(), rtol=1e-14)


@pytest.mark.parametrize("case", NAN_CASES, ids=NAN_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nonfinite_stays_in_its_element_eval(case, dtype, threads):
    shape, axis = case
    rng = np.random.default_rng(6)
    x = poison(rng.standard_normal(shape).astype(dtype), axis)
    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](5, dtype=dtype, axis=axis).eval()
    m.running_mean[:] = np.arange(5) * 0.1
    m.running_var[:] = 1.0 + np.arange(5) * 0.2
    y = m(x)
    bad = ~np.isfinite(x)
    assert bad.sum() == 2
    assert np.isnan(y[np.isnan(x)]).all()
    assert (y[np.isposinf(x)] == np.inf).all()
    assert np.isfinite(y[~bad]).all()
    y_ref = ref.forward_eval(np.where(bad, 0, x), m.running_mean, m.running_var, None, None, 1e-5, axis)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[~bad], y_ref[~bad], **tol)


@pytest.mark.parametrize("case", NAN_CASES, ids=NAN_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_eval_gradient_does_not_read_the_input(case, dtype, threads):
    """In eval the input gradient is grad_y * weight / sqrt(running_var + eps) and does not
    depend on x: a NaN or inf in x leaves it finite (as torch's), while the weight's gradient,
    which does depend on x, is not finite for those two channels. Through the NumPy module, and
    through the drop-in with and without parameter gradients (a frozen batch norm asks for
    grad_x only)."""
    shape, axis = case
    rng = np.random.default_rng(8)
    x = poison(rng.standard_normal(shape).astype(dtype), axis)
    gy = rng.standard_normal(shape).astype(dtype)
    m = {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d}[len(shape)](5, dtype=dtype, axis=axis).eval()
    m.weight[:] = 1.0 - np.arange(5) * 0.3
    m.running_mean[:] = np.arange(5) * 0.1
    m.running_var[:] = 1.0 + np.arange(5) * 0.2
    m(x)
    gx = m.backward(gy)
    k = m.weight.astype(np.float64) / np.sqrt(m.running_var.astype(np.float64) + 1e-5)
    gx_ref = gy.astype(np.float64) * k.reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(gx, gx_ref, **tol)
    assert not np.isfinite(m.weight_grad[[1, 3]]).any() and np.isfinite(m.weight_grad[[0, 2, 4]]).all()

    torch = pytest.importorskip("torch")
    import batchnorm.torch as bnt

    channels_first = [0, axis % len(shape)] + [d for d in range(1, len(shape)) if d != axis % len(shape)]
    tx, tgy = (torch.from_numpy(np.ascontiguousarray(a.transpose(channels_first))) for a in (x, gy))
    for frozen in (False, True):
        module = bnt.BatchNorm1d(5, dtype=tx.dtype) if len(shape) < 4 else bnt.BatchNorm2d(5, dtype=tx.dtype)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(m.weight))
            module.running_mean.copy_(torch.from_numpy(m.running_mean))
            module.running_var.copy_(torch.from_numpy(m.running_var))
        module.eval().requires_grad_(not frozen)
        leaf = tx.clone().requires_grad_()
        module(leaf).backward(tgy)
        np.testing.assert_allclose(leaf.grad.numpy(), gx_ref.transpose(channels_first), **tol)
        assert frozen == (module.weight.grad is None)
