"""The float64 reference checked on its own: against PyTorch (float64) and against
finite differences / exact arithmetic.  These tests do not import batchnorm, so they
validate the yardstick even while the library is being written.

Tolerances: float64 everywhere (1e-12 relative/absolute for O(1) values); the finite
difference checks use a central difference with h = 1e-6 in float64, whose truncation +
rounding error is ~1e-9 relative, so they use 1e-6.
"""

from fractions import Fraction

import numpy as np
import pytest

import reference as ref
from helpers import arrange, logical_data

SHAPES = [(5, 3), (4, 17, 33), (1, 3, 17, 3), (2, 33, 3, 1), (2, 3, 3, 1, 17)]


def _torch_bn_cls(torch, ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[ndim]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("momentum", [0.1, 0.75, None])
def test_reference_module_matches_torch(torch, rng, shape, momentum):
    c = shape[1]
    tm = _torch_bn_cls(torch, len(shape))(c, momentum=momentum, dtype=torch.float64)
    rm = ref.RefBatchNorm(c, momentum=momentum)
    w = rng.uniform(0.5, 1.5, c)
    b = rng.uniform(-1, 1, c)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))
    rm.weight, rm.bias = w.copy(), b.copy()
    for step in range(3):
        x = logical_data(rng, shape, offset=step)
        xt = torch.from_numpy(x).requires_grad_(True)
        yt = tm(xt)
        y = rm(x)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        gy = rng.standard_normal(shape)
        yt.backward(torch.from_numpy(gy))
        gx, gw, gb = rm.backward(gy)
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gw, tm.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(gb, tm.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
        tm.weight.grad = None
        tm.bias.grad = None
        np.testing.assert_allclose(rm.running_mean, tm.running_mean.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rm.running_var, tm.running_var.numpy(), rtol=1e-12, atol=1e-12)
        assert rm.num_batches_tracked == int(tm.num_batches_tracked)
    tm.eval()
    rm.training = False
    x = logical_data(rng, shape)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tm(xt)
    np.testing.assert_allclose(rm(x), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    gy = rng.standard_normal(shape)
    yt.backward(torch.from_numpy(gy))
    gx, gw, gb = rm.backward(gy)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, tm.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gb, tm.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_reference_no_running_stats_eval_uses_batch_stats(torch, rng):
    tm = torch.nn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64).eval()
    rm = ref.RefBatchNorm(3, track_running_stats=False)
    rm.training = False
    x = logical_data(rng, (2, 3, 4, 5))
    np.testing.assert_allclose(rm(x), tm(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "axis0", "axis2", "strided", "reversed", "fortran"])
def test_reference_axis_handling(rng, layout):
    logical = logical_data(rng, (3, 5, 4, 6))
    x, axis = arrange(logical, np.float64, layout)
    m0, v0 = ref.stats(logical, 1)
    m1, v1 = ref.stats(x, axis)
    np.testing.assert_allclose(m1, m0, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(v1, v0, rtol=1e-13, atol=1e-14)
    y0 = ref.forward_train(logical)[0]
    y1 = ref.forward_train(x, axis=axis)[0]
    np.testing.assert_allclose(np.moveaxis(y1, axis, 1) if layout in ("channels_last", "axis0", "axis2") else y1,
                               y0, rtol=1e-13, atol=1e-13)


def test_reference_stats_exact_rational(rng):
    """Large-offset stats compared with exact rational arithmetic."""
    x = 1e6 + rng.standard_normal((257, 2))
    mean, var = ref.stats(x, axis=1)
    for c in range(2):
        xs = [Fraction(float(v)) for v in x[:, c]]
        n = len(xs)
        m = sum(xs) / n
        v = sum((a - m) ** 2 for a in xs) / n
        assert abs(Fraction(float(mean[c])) - m) <= Fraction(float(np.spacing(1e6)))  # 1 ulp of 1e6
        assert abs(float(var[c]) - float(v)) <= 1e-13 * float(v)


def test_reference_backward_finite_differences(rng):
    shape = (3, 4, 5)
    x = logical_data(rng, shape)
    w = rng.uniform(0.5, 1.5, 4)
    b = rng.uniform(-1, 1, 4)
    gy = rng.standard_normal(shape)

    def loss(xx, ww, bb):
        return float((ref.forward_train(xx, ww, bb)[0] * gy).sum())

    _, mean, invstd, _, _ = ref.forward_train(x, w, b)
    gx, gw, gb = ref.backward_train(gy, x, mean, invstd, w)
    h = 1e-6
    for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 4), (0, 1, 4)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd = (loss(xp, w, b) - loss(xm, w, b)) / (2 * h)
        assert abs(fd - gx[idx]) <= 1e-6 * max(1.0, abs(fd))
    for c in range(4):
        e = np.zeros(4)
        e[c] = h
        fdw = (loss(x, w + e, b) - loss(x, w - e, b)) / (2 * h)
        fdb = (loss(x, w, b + e) - loss(x, w, b - e)) / (2 * h)
        assert abs(fdw - gw[c]) <= 1e-6 * max(1.0, abs(fdw))
        assert abs(fdb - gb[c]) <= 1e-6 * max(1.0, abs(fdb))


def test_reference_fold_matches_torch(torch, rng):
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    W = rng.standard_normal((5, 3, 3, 3))
    bconv = rng.standard_normal(5)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    g, bt = rng.standard_normal(5), rng.standard_normal(5)
    Wf, bf = ref.fold(W, bconv, rm, rv, g, bt, 1e-5)
    tW, tb = fuse_conv_bn_weights(*(torch.from_numpy(a) for a in (W, bconv, rm, rv)), 1e-5,
                                  torch.from_numpy(g), torch.from_numpy(bt))
    np.testing.assert_allclose(Wf, tW.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bf, tb.detach().numpy(), rtol=1e-12, atol=1e-12)
    # and the reference conv matches torch's conv
    x = rng.standard_normal((2, 3, 6, 7))
    np.testing.assert_allclose(
        ref.conv2d(x, W, bconv),
        torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(bconv)).numpy(),
        rtol=1e-12, atol=1e-12)


def test_reference_fused_eval(rng):
    x = logical_data(rng, (2, 3, 4))
    r = rng.standard_normal(x.shape)
    mean, var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y = ref.forward_eval(x, mean, var)
    np.testing.assert_array_equal(ref.fused_eval(x, mean, var, residual=r, activation="relu"),
                                  np.maximum(y + r, 0))
    assert (ref.fused_eval(x, mean, var, residual=r, activation="relu") >= 0).all()
