"""float32 data whose squares overflow float32 (issue 10.8): statistics and outputs stay finite
and correct. Values near 1e19 have a variance near float32's largest value; values near 1e38
have deviations whose squares (about 1e74) no float32 holds. The kernels' float32 lanes
overflow there; the engine sums such reductions again in float64. Run under every ISA
(BATCHNORM_ISA=scalar|avx2|avx512|avx512_bf16), at 1 and 2 threads, against a float64 reference, and
against PyTorch where PyTorch is right (its running mean; its output is not at these scales).
"""

from __future__ import annotations

import numpy as np
import pytest

from batchnorm import _core


def _ref_norm(x64, axes):
    mean = x64.mean(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(x64.var(axis=axes, keepdims=True) + 1e-5), mean


def _data(rng, shape, layout):
    x = (1e38 + 1e37 * rng.standard_normal(shape)).astype(np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 3, 16, 16), (64, 5), (2, 3, 40000)])
def test_batch_norm_training_near_float32_max(rng, threads, layout, shape):
    x = _data(rng, shape, layout)
    axis = -1 if layout == "channels_last" else 1
    c = x.shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, invstd = _core.forward_train(x, None, None, rm, rv, 0.1, 1e-5, axis)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    ref, ref_mean = _ref_norm(x.astype(np.float64), axes)
    assert np.isfinite(y).all() and np.isfinite(mean).all() and np.isfinite(rm).all()
    assert np.max(np.abs(y - ref)) <= 1e-5
    np.testing.assert_allclose(mean, ref_mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(rm, 0.1 * ref_mean.ravel(), rtol=1e-6)
    np.testing.assert_allclose(1 / np.asarray(invstd, np.float64) ** 2, x.astype(np.float64).var(axis=axes), rtol=1e-6)


def test_batch_stats_variance_near_float32_max(rng, threads):
    # var about 1e38: representable, but the float32 sum of squares is not.
    x = (1e19 * rng.standard_normal((8, 3, 16, 16))).astype(np.float32)
    mean, var = _core.stats(x, 1)
    x64 = x.astype(np.float64)
    assert np.isfinite(var).all()
    np.testing.assert_allclose(var, x64.var(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6 * 1e19)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_family_near_float32_max(rng, threads, layout):
    x = _data(rng, (4, 6, 8, 8), layout)
    axis = -1 if layout == "channels_last" else 1
    x64 = x.astype(np.float64)
    y, _, _ = _core.layer_norm(x, 3, None, None, 1e-5)
    assert np.max(np.abs(y - _ref_norm(x64, (1, 2, 3))[0])) <= 1e-5
    y, _, _ = _core.group_norm(x, 3, None, None, 1e-5, axis)
    g = np.moveaxis(x64, axis, 1).reshape(4, 3, -1)
    ref = np.moveaxis(_ref_norm(g, (2,))[0].reshape(np.moveaxis(x64, axis, 1).shape), 1, axis)
    assert np.max(np.abs(y - ref)) <= 1e-5
    xr = (1e30 * rng.standard_normal((4, 100))).astype(np.float32)  # squares near 1e60
    y, _, _ = _core.layer_norm(xr, 1, None, None, 1e-5, True)
    xr64 = xr.astype(np.float64)
    assert np.max(np.abs(y - xr64 / np.sqrt((xr64**2).mean(axis=1, keepdims=True) + 1e-5))) <= 1e-5


def test_backward_sums_near_float32_max(rng, threads):
    # dy*(x - mean) near 1e38*1e2 overflows float32 lanes; the sums are exact in float64.
    x = _data(rng, (8, 3, 16, 16), "channels_first")
    dy = (100 * rng.standard_normal(x.shape)).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2, 3)).astype(np.float32)
    sum_dy, sum_dy_xmu = _core.batch_norm_backward_reduce(dy, x, mean, 1)
    d = x.astype(np.float64) - mean[None, :, None, None].astype(np.float64)
    np.testing.assert_allclose(sum_dy_xmu, (dy * d).sum(axis=(0, 2, 3)), rtol=1e-6)


def test_running_mean_matches_torch(rng, torch):
    x = _data(rng, (8, 3, 16, 16), "channels_first")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    _core.forward_train(x, None, None, rm, rv, 0.1, 1e-5, 1)
    trm, trv = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=0.1)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 100), (4, 17000)])  # column sums with the row pass; on their own
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16 has float32's range
def test_layer_norm_weight_gradient_near_float32_max(rng, threads, shape, in_place, dtype):
    # grad_bias and grad_weight sum dy and dy*xhat down the rows. Rows of dy near 2e38, -2e38
    # in pairs, x the same two rows over and over: rows 4k and 4k + 2 nearly cancel, as do
    # 4k + 1 and 4k + 3, so the float64 sums stay in float32's range; the float32 lanes do not.
    import batchnorm as bn

    storage = np.float32 if dtype == "float32" else pytest.importorskip("ml_dtypes").bfloat16
    rows, cols = shape
    x = np.tile(rng.standard_normal((2, cols)), (rows // 2, 1)).astype(storage)
    sign = np.where(np.arange(rows) % 4 < 2, 1.0, -1.0)[:, None]
    dy = (2e38 * sign * (1 + 0.01 * rng.standard_normal(shape))).astype(storage)
    w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean = x64.mean(axis=1)
    invstd = 1 / np.sqrt(x64.var(axis=1) + 1e-5)
    mean32, invstd32 = mean.astype(np.float32), invstd.astype(np.float32)
    xhat = (x64 - mean32[:, None]) * invstd32[:, None].astype(np.float64)
    grad_y = dy.copy()
    _, gw, gb = bn.layer_norm_backward(grad_y, x, (cols,), mean32, invstd32, w, out=grad_y if in_place else None)
    np.testing.assert_allclose(gb, dy64.sum(axis=0), rtol=0, atol=1e-6 * np.abs(dy64).sum(axis=0).max())
    terms = dy64 * xhat
    np.testing.assert_allclose(gw, terms.sum(axis=0), rtol=0, atol=1e-6 * np.abs(terms).sum(axis=0).max())
