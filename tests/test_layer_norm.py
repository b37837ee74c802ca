"""LayerNorm and RMSNorm specifics: the functional forms (also fused with a residual add, the
sum optionally written out), their backward helpers, eps=None, bad input, and accuracy at
mean 1e6 (the family-wide checks are in test_norm_family.py)."""

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, assert_unchanged, logical_data, snapshot
from test_numerics import VAR_RTOL, data, out_atol

SHAPES = [((1, 768), 1), ((4, 7), 1), ((2, 3, 17), 1), ((3, 5, 4), 2), ((2, 2, 3, 33), 3)]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-nd{nd}" for s, nd in SHAPES]


def params(rng, shape, dtype):
    w = rng.uniform(0.5, 1.5, shape).astype(dtype)
    b = rng.uniform(-1, 1, shape).astype(dtype)
    return w, b


@pytest.mark.parametrize("shape,nd", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_functional(shape, nd, dtype, affine, threads, rng):
    x = logical_data(rng, shape).astype(dtype)
    w, b = params(rng, shape[-nd:], dtype) if affine else (None, None)
    y = bn.layer_norm(x, shape[-nd:], w, b, 1e-4)
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, ref.layer_norm(x, nd, w, b, 1e-4)[0], dtype)
    out = np.empty_like(x)
    assert bn.layer_norm(x, shape[-nd:], w, b, 1e-4, out=out) is out
    np.testing.assert_array_equal(out, y)


@pytest.mark.parametrize("shape,nd", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_functional(shape, nd, dtype, threads, rng):
    x = logical_data(rng, shape).astype(dtype)
    w, _ = params(rng, shape[-nd:], dtype)
    y = bn.rms_norm(x, shape[-nd:], w, 1e-6)
    assert_close(y, ref.rms_norm(x, nd, w, 1e-6)[0], dtype)
    eps = float(np.finfo(dtype).eps)  # eps=None: the dtype's machine epsilon, as torch
    assert_close(bn.rms_norm(x, shape[-nd:], w), ref.rms_norm(x, nd, w, eps)[0], dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 768), (3, 5, 33)], ids=str)
def test_residual_and_sum_out(rms, dtype, shape, threads, rng):
    """LN(x + residual) in one call; sum_out receives x + residual (SkipLayerNormalization)."""
    x = logical_data(rng, shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    w, b = params(rng, shape[-1:], dtype)
    s = np.empty_like(x)
    if rms:
        y = bn.rms_norm(x, shape[-1], w, 1e-5, residual=r, sum_out=s)
        expected = ref.rms_norm(x, 1, w, 1e-5, residual=r)[0]
    else:
        y = bn.layer_norm(x, shape[-1], w, b, residual=r, sum_out=s)
        expected = ref.layer_norm(x, 1, w, b, residual=r)[0]
    assert_close(y, expected, dtype)
    assert_close(s, x.astype(np.float64) + r, dtype)
    # without sum_out, the same normalized result
    y2 = bn.layer_norm(x, shape[-1], w, b, residual=r) if not rms else bn.rms_norm(x, shape[-1], w, 1e-5, residual=r)
    np.testing.assert_array_equal(y2, y)


def test_residual_matches_onnx_runtime_skip_layer_norm_semantics(torch, rng):
    """The fusion equals torch's LayerNorm of the sum (what SkipLayerNormalization computes)."""
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    r = rng.standard_normal((2, 8, 64)).astype(np.float32)
    w, b = params(rng, (64,), np.float32)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x + r), [64], torch.from_numpy(w), torch.from_numpy(b))
    assert_close(bn.layer_norm(x, 64, w, b, residual=r), expected.numpy(), np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_helpers(dtype, rng):
    shape, nd = (3, 5, 4), 2
    x = logical_data(rng, shape).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    w, _ = params(rng, shape[-nd:], dtype)
    _, mean, invstd = ref.layer_norm(x, nd, w, None)
    gx, gw, gb = bn.layer_norm_backward(gy, x, shape[-nd:], mean.astype(dtype), invstd.astype(dtype), w)
    egx, egw, egb = ref.layer_norm_backward(gy, x, nd, mean, invstd, w)
    scale = np.max(np.abs(w)) * np.max(invstd) * np.max(np.abs(gy))
    assert_close(gx, egx, dtype, scale=scale)
    assert_close(gw, egw, dtype, scale=np.abs(gy).sum() / w.size)
    assert_close(gb, egb, dtype, scale=np.abs(gy).sum() / w.size)
    _, rinv = ref.rms_norm(x, nd, w, 1e-5)
    gx, gw = bn.rms_norm_backward(gy, x, shape[-nd:], rinv.astype(dtype), w)
    egx, egw = ref.rms_norm_backward(gy, x, nd, rinv, w)
    assert_close(gx, egx, dtype, scale=np.max(np.abs(w)) * np.max(rinv) * np.max(np.abs(gy)))
    assert_close(gw, egw, dtype, scale=np.abs(gy).sum() / w.size * 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_helpers_without_a_weight_give_the_parameter_gradients(dtype, rng):
    """weight None means 1, so every backward gives the gradients of that weight and of the
    bias (a layer with a bias and no weight needs the bias one, as torch's autograd gives it):
    the float64 reference's with a weight of ones, and bit for bit what ones passed explicitly give."""
    shape, nd = (3, 5, 4), 2
    x = logical_data(rng, shape).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    ones = np.ones(shape[-nd:], dtype)
    _, mean, invstd = ref.layer_norm(x, nd)
    _, rinv = ref.rms_norm(x, nd, None, 1e-5)
    _, gmean, ginv = ref.group_norm(x, 5)
    _, imean, iinv, _, _ = ref.instance_norm(x)
    cast = [a.astype(dtype) for a in (mean, invstd, rinv, gmean, ginv, imean, iinv)]
    cases = {
        "layer": (lambda w: bn.layer_norm_backward(gy, x, shape[-nd:], cast[0], cast[1], w), ones,
                  ref.layer_norm_backward(gy, x, nd, mean, invstd)),
        "rms": (lambda w: bn.rms_norm_backward(gy, x, shape[-nd:], cast[2], w), ones,
                ref.rms_norm_backward(gy, x, nd, rinv)),
        "group": (lambda w: bn.group_norm_backward(gy, x, 5, cast[3], cast[4], w), np.ones(5, dtype),
                  ref.group_norm_backward(gy, x, 5, gmean, ginv)),
        "instance": (lambda w: bn.instance_norm_backward(gy, x, cast[5], cast[6], w), np.ones(5, dtype),
                     ref.instance_norm_backward(gy, x, imean, iinv)),
        # the channel axis as a NumPy integer (read from an array's shape or attributes)
        "group, NumPy axis": (lambda w: bn.group_norm_backward(gy, x, 5, cast[3], cast[4], w, axis=np.int64(1)),
                              np.ones(5, dtype), ref.group_norm_backward(gy, x, 5, gmean, ginv)),
        "instance, NumPy axis": (lambda w: bn.instance_norm_backward(gy, x, cast[5], cast[6], w, axis=np.intp(-2)),
                                 np.ones(5, dtype), ref.instance_norm_backward(gy, x, imean, iinv)),
    }
    for name, (backward, explicit, expected) in cases.items():
        got, with_ones = backward(None), backward(explicit)
        assert len(got) == len(expected), name
        for g, o in zip(got, with_ones):
            assert g is not None and np.array_equal(g, o), name
        for g, e in zip(got[1:], expected[1:]):
            assert e is not None and g.shape == e.shape, name
            assert_close(g, e, dtype, scale=np.abs(gy).sum() / e.size * 4)


def test_module_eps_none_is_the_input_dtypes_epsilon(rng):
    x = logical_data(rng, (3, 8))
    m = bn.RMSNorm(8, dtype=np.float64)
    assert m.eps is None
    assert_close(m(x), ref.rms_norm(x, 1, None, np.finfo(np.float64).eps)[0], np.float64)


@pytest.mark.parametrize("make", [lambda: bn.LayerNorm((4, 5)), lambda: bn.RMSNorm((4, 5))], ids=["layer", "rms"])
@pytest.mark.parametrize("bad_shape", [(3, 5, 4), (5,), (3, 4)], ids=str)
def test_normalized_shape_not_matching_the_trailing_dims(make, bad_shape, rng):
    m = make()
    x = np.ones(bad_shape, np.float32)
    before = snapshot(m, x)
    with pytest.raises(ValueError, match=r"normalized_shape=\[4, 5\]"):
        m(x)
    with pytest.raises(ValueError, match=r"normalized_shape=\[4, 5\]"):
        bn.layer_norm(x, (4, 5))
    assert_unchanged(before, m, x)


@pytest.mark.parametrize("args,error,match", [
    ((-1,), ValueError, "normalized_shape"),
    (((),), ValueError, "normalized_shape"),
    (("4",), TypeError, "normalized_shape"),
    ((4.0,), TypeError, "normalized_shape"),
    ((4, -1e-5), ValueError, "eps"),
    ((4, 1e-5, True, True), None, None),
], ids=str)
def test_constructor_arguments(args, error, match):
    if error is None:
        assert bn.LayerNorm(*args).normalized_shape == (4,)
        return
    with pytest.raises(error, match=match):
        bn.LayerNorm(*args)


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_zero_size_normalized_shape(cls):
    """torch's LayerNorm(0) and RMSNorm([0, 4]) normalize an empty input to an empty output,
    and their backward gives empty gradients; so do these."""
    for shape, x_shape in [(0, (2, 3, 0)), ([0, 4], (2, 0, 4))]:
        m = getattr(bn, cls)(shape)
        x = np.zeros(x_shape, np.float32)
        y = m(x)
        assert y.shape == x_shape and y.dtype == np.float32
        gx = m.backward(np.ones_like(y))
        assert gx.shape == x_shape and m.weight_grad.shape == m.weight.shape == m.normalized_shape
        torch = pytest.importorskip("torch")
        t = getattr(torch.nn, cls)(shape)
        assert tuple(t(torch.from_numpy(x)).shape) == y.shape and tuple(t.weight.shape) == m.weight.shape


def test_wrong_dtype_and_weight_change_nothing(rng):
    x = rng.standard_normal((3, 8))  # float64 into a float32 module
    m = bn.LayerNorm(8)
    before = snapshot(m, x)
    with pytest.raises(TypeError, match="float64"):
        m(x)
    with pytest.raises(ValueError, match="weight"):
        bn.layer_norm(x, 8, np.ones(7))
    with pytest.raises(TypeError):
        bn.rms_norm(x.astype(np.int64), 8)
    out = np.zeros((3, 8))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        bn.layer_norm(x, 8, out=out)
    assert_unchanged(before, m, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cols", [64, 1000])
def test_rows_the_probe_misses(dtype, cols, threads, rng):
    """Short rows go in blocks whose shifts come from 8 evenly spaced values of each row (as
    the planes of batch norm's blocks). Rows that are 1e4 there and 1e4 + 1000 elsewhere put
    the shift over 2 standard deviations from their mean, so they are summed again around it;
    beside ordinary rows, every row's variance and output match float64 as at mean 1e4."""
    probes = [(2 * i + 1) * cols // 16 for i in range(8)]
    high = np.ones(cols, bool)
    high[probes] = False
    x = 1e4 + rng.standard_normal((64, cols))
    x[::2] += 1000 * high  # every other row
    mean, std = x[0].mean(), x[0].std()
    assert abs(x[0, probes].mean() - mean) > 2 * std  # the premise: the probe misses
    x = x.astype(dtype)
    y, _, invstd = bn._core.layer_norm(x, 1, None, None, 1e-5)
    ey, _, inv_ref = ref.layer_norm(x, 1)
    var, v_ref = 1.0 / invstd.astype(np.float64) ** 2 - 1e-5, 1.0 / inv_ref**2 - 1e-5
    assert np.max(np.abs(var - v_ref) / v_ref) <= VAR_RTOL[np.dtype(dtype)]
    assert np.max(np.abs(y - ey)) <= out_atol(dtype, 1e4, 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(4, 768), (2, 3, 4096)], ids=str)
def test_accuracy_at_mean_1e6(dtype, shape, threads):
    x = data(shape, dtype, 1e6, 1.0, 3)
    y, mean, invstd = bn._core.layer_norm(x, 1, None, None, 1e-5)
    _, m_ref, inv_ref = ref.layer_norm(x, 1)
    var = 1.0 / invstd.astype(np.float64) ** 2 - 1e-5
    v_ref = 1.0 / inv_ref**2 - 1e-5
    assert np.max(np.abs(var - v_ref) / v_ref) <= VAR_RTOL[np.dtype(dtype)]
    ey = ref.layer_norm(x, 1)[0]
    assert np.max(np.abs(y - ey)) <= out_atol(dtype, 1e6, 1.0)
