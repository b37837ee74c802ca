"""Inference: the fused act(bn(x) + residual) and folding BN into the preceding layer.

Tolerances as in helpers.py.  For folding, the comparison is layer'(x) vs bn(layer(x)):
both are sums of Ci*kh*kw products of O(1) terms, so atol is scaled by that sum's
magnitude (sum of |terms|).
"""

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import (DTYPE_IDS, DTYPES, TRANSPOSE_SHAPES, assert_close, in_other_memory_order,
                     logical_data, make_input, module_cls, rand_params)

FUSION_SHAPES = [(5, 3), (2, 17, 33), (2, 3, 17, 33), (1, 33, 3, 3), (2, 1, 3, 3, 17)]


def eval_module(rng, shape, dtype, axis):
    c = shape[1]
    m = module_cls(len(shape))(c, dtype=dtype, axis=axis)
    w, b = rand_params(rng, c, dtype)
    m.weight[:] = w
    m.bias[:] = b
    m.running_mean[:] = rng.standard_normal(c)
    m.running_var[:] = rng.uniform(0.5, 2.0, c)
    return m.eval()


@pytest.mark.parametrize("shape,layout", [
    pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
    for s in FUSION_SHAPES for lay in ["contiguous", "channels_last", "strided", "cl_view"]
    if not (lay == "cl_view" and len(s) < 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["res", "nores"])
def test_module_fusion(shape, layout, dtype, activation, with_residual, threads, rng):
    x, axis = make_input(rng, shape, dtype, layout)
    m = eval_module(rng, shape, dtype, axis)
    res = None
    if with_residual:
        # residual in a different layout than x on purpose (any strides allowed)
        res = np.asfortranarray(rng.standard_normal(x.shape).astype(dtype))
    y = m(x, residual=res, activation=activation)
    assert y.shape == x.shape and y.dtype == dtype
    y_ref = ref.fused_eval(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, axis,
                           residual=res, activation=activation)
    assert_close(y, y_ref, dtype)
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_functional_fusion(dtype, activation, rng):
    x, axis = make_input(rng, (3, 5, 4, 6), dtype, "channels_last")
    c = 5
    w, b = rand_params(rng, c, dtype)
    rm = rng.standard_normal(c).astype(dtype)
    rv = rng.uniform(0.5, 2, c).astype(dtype)
    res = rng.standard_normal(x.shape).astype(dtype)
    y = bn.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3, axis=axis, residual=res, activation=activation)
    assert_close(y, ref.fused_eval(x, rm, rv, w, b, 1e-3, axis, res, activation), dtype)
    y = bn.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-3, axis=axis, activation=activation)
    assert_close(y, ref.fused_eval(x, rm, rv, None, None, 1e-3, axis, None, activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("alias", ["x", "residual"])
def test_fusion_in_place(dtype, alias, rng):
    """out may be x; out may also be the residual (the ResNet pattern y += bn(x))."""
    x = logical_data(rng, (2, 3, 5, 5)).astype(dtype)
    res = rng.standard_normal(x.shape).astype(dtype)
    m = eval_module(rng, x.shape, dtype, 1)
    y_ref = ref.fused_eval(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, 1,
                           residual=res, activation="relu")
    out = x if alias == "x" else res
    y = m(x, out=out, residual=res, activation="relu")
    assert np.shares_memory(y, out)
    assert_close(out, y_ref, dtype)


def _fold_check(y_fold, y_ref, terms_abs, dtype):
    d = np.dtype(dtype)
    tol = (1e-5 if d == np.float32 else 1e-12) * (terms_abs + 1.0)
    err = np.abs(np.asarray(y_fold, np.float64) - y_ref)
    assert (err <= tol).all(), float((err / tol).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear(dtype, with_bias, affine, rng):
    cin, cout = 7, 5
    W = rng.standard_normal((cout, cin)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if with_bias else None
    m = bn.BatchNorm1d(cout, affine=affine, dtype=dtype)
    x = rng.standard_normal((9, cin)).astype(dtype)
    for step in range(2):  # realistic running stats from training on the layer's output
        m(ref.linear(x + step, W, b).astype(dtype))
    m.eval()
    Wf, bf = bn.fold(m, W, b)
    assert Wf.shape == W.shape and bf.shape == (cout,)
    assert Wf.dtype == dtype and bf.dtype == dtype
    eW, eb = ref.fold(W, b, m.running_mean, m.running_var, m.weight, m.bias, m.eps, axis=0)
    assert_close(Wf, eW, dtype)
    assert_close(bf, eb, dtype, scale=np.abs(eb).max())
    xt = rng.standard_normal((6, cin)).astype(dtype)
    y_lib = m(ref.linear(xt, W, b).astype(dtype))  # bn(linear(x)) run through the library
    y_ref = ref.forward_eval(ref.linear(xt, W, b), m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    terms = np.abs(xt.astype(np.float64)) @ np.abs(eW.T) + np.abs(eb)
    _fold_check(ref.linear(xt, Wf, bf), y_ref, terms, dtype)
    _fold_check(y_lib, y_ref, terms, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 3])
def test_fold_conv(dtype, k, rng):
    cin, cout = 3, 4
    W = rng.standard_normal((cout, cin, k, k)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    m = bn.BatchNorm2d(cout, dtype=dtype)
    m.weight[:], m.bias[:] = rand_params(rng, cout, dtype)
    m(ref.conv2d(rng.standard_normal((2, cin, 6, 6)), W, b).astype(dtype))
    m.eval()
    Wf, bf = bn.fold(m, W, b)
    x = rng.standard_normal((2, cin, 5, 6)).astype(dtype)
    conv = ref.conv2d(x, W, b).astype(dtype)
    y_lib = m(conv)          # the library's BN on the float conv output
    y_fold = ref.conv2d(x, Wf, bf)
    y_ref = ref.forward_eval(ref.conv2d(x, W, b), m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    eW, eb = ref.fold(W, b, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
    terms = ref.conv2d(np.abs(x), np.abs(eW)) + np.abs(eb).reshape(1, -1, 1, 1)
    _fold_check(y_fold, y_ref, terms, dtype)
    _fold_check(y_lib, y_ref, terms, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_matches_torch_fuse_conv_bn_weights(torch, dtype, transpose, with_bias, rng):
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    cin, cout = 3, 6
    shape = (cin, cout, 1, 1) if transpose else (cout, cin, 3, 3)
    W = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if with_bias else None
    m = bn.BatchNorm2d(cout, eps=1e-3, dtype=dtype)
    m.weight[:], m.bias[:] = rand_params(rng, cout, dtype)
    m.running_mean[:] = rng.standard_normal(cout)
    m.running_var[:] = rng.uniform(0.5, 2, cout)
    m.eval()
    Wf, bf = bn.fold(m, W, b, axis=1 if transpose else 0)
    t = (lambda a: None if a is None else torch.from_numpy(a))
    tW, tb = fuse_conv_bn_weights(t(W), t(b), t(m.running_mean), t(m.running_var), m.eps,
                                  t(m.weight), t(m.bias), transpose=transpose)
    assert_close(Wf, tW.detach().numpy(), dtype, scale=np.abs(Wf).max())
    assert_close(bf, tb.detach().numpy(), dtype, scale=np.abs(bf).max())
    if transpose:
        x = rng.standard_normal((2, cin, 3, 4)).astype(dtype)
        y_ref = ref.forward_eval(ref.conv_transpose2d_1x1(x, W, b), m.running_mean, m.running_var,
                                 m.weight, m.bias, m.eps)
        terms = np.abs(ref.conv_transpose2d_1x1(np.abs(x), np.abs(Wf.astype(np.float64)))) + \
            np.abs(bf.astype(np.float64)).reshape(1, -1, 1, 1)
        _fold_check(ref.conv_transpose2d_1x1(x, Wf, bf), y_ref, terms, dtype)


@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_residual_in_the_transposed_layout(shape, dtype, activation, rng):
    """A channels-last x with a residual in NCHW memory (inductor hands these over: a
    channels-last conv output and an NCHW graph input): the residual is copied into x's
    layout, in tiles; partial tiles on both axes."""
    x, axis = make_input(rng, shape, dtype, "channels_last" if len(shape) > 2 else "contiguous")
    res = in_other_memory_order(rng, shape, x, axis, dtype)
    m = eval_module(rng, shape, dtype, axis)
    y = m(x, residual=res, activation=activation)
    y_ref = ref.fused_eval(x, m.running_mean, m.running_var, m.weight, m.bias, m.eps, axis,
                           residual=res, activation=activation)
    assert_close(y, y_ref, dtype)
