"""Outputs too large for the caches are written by non-temporal stores (engine/cache.hpp,
output_writes: a call whose arrays pass half the L3): channels-first runs and layer norm rows
of 512 bytes or more with plain stores up to their first cache-line boundary and for their last
partial line; channels-last rows of whole lines from the first line boundary, their factors
rotated to match (engine/channels_last.hpp, apply_rows). The values must be those of any other
call: checked here against the float64 reference on arrays of 16 MiB (float32), past half of a
32 MiB L3 in every call, in both layouts, for outputs that start at several offsets within a
cache line and one byte past an aligned address. The kernel parity test checks the streamed
kernels of every ISA on small arrays; this checks what the engine picks."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import assert_close
from test_misaligned import misaligned

SHAPE = (4, 64, 128, 128)  # 56x56 planes and larger are where ResNet's early stages stream
layouts = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])


def inputs(rng, dtype, shape=SHAPE, channels_last=False):
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    if channels_last:  # NHWC memory, the same logical NCHW array
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    w = (rng.standard_normal(c) * 0.5 + 1).astype(np.float32 if dtype == np.float16 else dtype)
    b = rng.standard_normal(c).astype(w.dtype)
    return x, w, b


def at_offset(like, values_in):
    """An empty array like ``like`` (and in its memory order) starting ``values_in`` elements
    into its buffer."""
    buf = np.empty(like.size + values_in, like.dtype)
    if like.flags.c_contiguous:
        return buf[values_in:].reshape(like.shape)
    nhwc = (like.shape[0],) + like.shape[2:] + (like.shape[1],)
    return np.moveaxis(buf[values_in:].reshape(nhwc), -1, 1)


@layouts
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_train_and_backward(dtype, channels_last, rng, threads):
    x, w, b = inputs(rng, dtype, channels_last=channels_last)
    rm, rv = np.zeros(x.shape[1], dtype), np.ones(x.shape[1], dtype)
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    y64, mean, invstd, new_rm, new_rv = ref.forward_train(x, w, b, np.zeros_like(rm), np.ones_like(rv))
    assert_close(y, y64, dtype, err_msg="training forward")
    assert_close(rm, new_rm, dtype)
    assert_close(rv, new_rv, dtype)
    gy = np.empty_like(x)
    gy[...] = rng.standard_normal(x.shape)
    m, v = bn.batch_norm_stats(x)
    gx, gw, gb = bn.batch_norm_backward(gy, x, m, 1 / np.sqrt(v + dtype(1e-5)), w)
    gx64, gw64, gb64 = ref.backward_train(gy, x, mean, invstd, w)
    assert_close(gx, gx64, dtype, err_msg="grad_x")
    n = x.size // x.shape[1]
    assert_close(gb, gb64, dtype, scale=np.sqrt(n))
    assert_close(gw, gw64, dtype, scale=np.sqrt(n))


@pytest.mark.parametrize("values_in", [0, 5])
def test_short_planes(values_in, rng, threads):
    """14x14 float32 planes (784 bytes: 12 whole lines and two partial ones, at a different
    offset within a line from one plane to the next) stream plane by plane in the blocks of
    short planes (engine/plane_blocks.hpp): training, eval and backward, 12.8 MB an array."""
    x, w, b = inputs(rng, np.float32, (64, 256, 14, 14))
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y = bn.batch_norm(x, rm, rv, w, b, training=True, out=at_offset(x, values_in))
    y64, mean, invstd, new_rm, new_rv = ref.forward_train(x, w, b, np.zeros_like(rm), np.ones_like(rv))
    assert_close(y, y64, np.float32, err_msg="training forward")
    assert_close(rv, new_rv, np.float32)
    y = bn.batch_norm(x, rm, rv, w, b, training=False, out=at_offset(x, values_in))
    assert_close(y, ref.fused_eval(x, rm, rv, w, b, 1e-5, 1, None, None), np.float32, err_msg="eval")
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean.astype(np.float32), invstd.astype(np.float32), w,
                                        out=at_offset(x, values_in))
    gx64, gw64, gb64 = ref.backward_train(gy, x, mean, invstd, w)
    assert_close(gx, gx64, np.float32, err_msg="grad_x")
    n = x.size // x.shape[1]
    assert_close(gw, gw64, np.float32, scale=np.sqrt(n))
    assert_close(gb, gb64, np.float32, scale=np.sqrt(n))


@pytest.mark.parametrize("shape", [(64, 256, 14, 14), (32, 512, 14, 14), (16, 1024, 14, 14)],
                         ids=["256", "512", "1024"])
def test_channels_last_rows_from_memory(shape, rng, threads):
    """Channels-last training statistics and gradient sums of arrays too large for the caches
    read rows of less than a page one at a time (kernels/kernel_bodies.inl, reads_in_order); 1024
    channels (a page a row) keep their groups of rows. Training and backward, 12.8 MB an array."""
    x, w, b = inputs(rng, np.float32, shape, channels_last=True)
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    y64, mean, invstd, new_rm, new_rv = ref.forward_train(x, w, b, np.zeros_like(rm), np.ones_like(rv))
    assert_close(y, y64, np.float32, err_msg="training forward")
    assert_close(rm, new_rm, np.float32)
    assert_close(rv, new_rv, np.float32)
    gy = np.empty_like(x)
    gy[...] = rng.standard_normal(x.shape)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean.astype(np.float32), invstd.astype(np.float32), w)
    gx64, gw64, gb64 = ref.backward_train(gy, x, mean, invstd, w)
    assert_close(gx, gx64, np.float32, err_msg="grad_x")
    n = x.size // x.shape[1]
    assert_close(gw, gw64, np.float32, scale=np.sqrt(n))
    assert_close(gb, gb64, np.float32, scale=np.sqrt(n))


@layouts
@pytest.mark.parametrize("values_in", [0, 1, 5, 15, "byte"])
def test_eval_residual_relu_into_any_offset(values_in, channels_last, rng, threads):
    dtype = np.float32
    x, w, b = inputs(rng, dtype, channels_last=channels_last)
    r = np.empty_like(x)
    r[...] = rng.standard_normal(x.shape)
    rm = rng.standard_normal(x.shape[1]).astype(dtype)
    rv = (rng.random(x.shape[1]) + 0.5).astype(dtype)
    if values_in == "byte":
        out = misaligned(np.zeros_like(x), channels_last)
    else:
        out = at_offset(x, values_in)
    assert out.strides == x.strides
    got = bn.batch_norm(x, rm, rv, w, b, residual=r, activation="relu", out=out)
    assert got is out
    assert_close(out, ref.fused_eval(x, rm, rv, w, b, 1e-5, 1, r, "relu"), dtype)


@layouts
def test_float16_within_one_ulp(channels_last, rng, threads):
    """Half outputs stream as 16-bit lanes: within 1 ulp of float16 at the float64 result, plus
    float32 roundings of the terms (tests/test_half.py's rule)."""
    x, w, b = inputs(rng, np.float16, (8, 64, 128, 128), channels_last)
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    x64 = x.astype(np.float64)
    y64 = ref.forward_train(x64, w, b)[0]
    bb = ref.bshape(b.astype(np.float64), x.ndim, 1)
    spacing = np.spacing(np.abs(y64).astype(np.float16)).astype(np.float64)
    bound = spacing + 8 * 2.0**-24 * (np.abs(y64 - bb) + np.abs(bb))
    err = np.abs(y.astype(np.float64) - y64)
    assert y.dtype == np.float16 and np.all(err <= bound), f"{np.count_nonzero(err > bound)} values off"


@layouts
def test_group_norm_forward_and_backward(channels_last, rng, threads):
    """Group norm (and instance norm, one group per channel) stream as batch norm does: by
    planes channels-first, by rows of whole lines channels-last."""
    x, w, b = inputs(rng, np.float32, channels_last=channels_last)
    for groups in (8, x.shape[1]):
        y = bn.group_norm(x, groups, w, b, out=at_offset(x, 3))
        y64, mean, invstd = ref.group_norm(x, groups, w, b)
        assert_close(y, y64, np.float32, err_msg=f"{groups} groups")
        gy = np.empty_like(x)
        gy[...] = rng.standard_normal(x.shape)
        gx, gw, gb = bn.group_norm_backward(gy, x, groups, mean.astype(np.float32), invstd.astype(np.float32), w)
        gx64, gw64, gb64 = ref.group_norm_backward(gy, x, groups, mean, invstd, w)
        assert_close(gx, gx64, np.float32, err_msg=f"{groups} groups grad_x")
        n = x.size // x.shape[1]
        assert_close(gw, gw64, np.float32, scale=np.sqrt(n))
        assert_close(gb, gb64, np.float32, scale=np.sqrt(n))
    assert_close(bn.instance_norm(x, weight=w, bias=b), ref.instance_norm(x, weight=w, bias=b)[0], np.float32)


@pytest.mark.parametrize("hidden", [1024, 1000])
def test_layer_and_rms_norm(hidden, rng, threads):
    """Layer norm and RMS norm stream row by row (rows of 1 KiB or more); a row of 1000 float32
    values starts at every offset within a line."""
    x = (rng.standard_normal((4200, hidden)) * 2 + 3).astype(np.float32)
    w = (rng.standard_normal(hidden) * 0.5 + 1).astype(np.float32)
    b = rng.standard_normal(hidden).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    y64, mean, invstd = ref.layer_norm(x, 1, w, b)
    assert_close(bn.layer_norm(x, (hidden,), w, b, out=at_offset(x, 7)), y64, np.float32)
    assert_close(bn.layer_norm(x, (hidden,), w, b, residual=r), ref.layer_norm(x, 1, w, b, residual=r)[0], np.float32)
    assert_close(bn.rms_norm(x, (hidden,), w, 1e-5), ref.rms_norm(x, 1, w, 1e-5)[0], np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    gx, gw, gb = bn.layer_norm_backward(gy, x, (hidden,), mean.astype(np.float32), invstd.astype(np.float32), w)
    gx64, gw64, gb64 = ref.layer_norm_backward(gy, x, 1, mean, invstd, w)
    assert_close(gx, gx64, np.float32)
    assert_close(gw, gw64, np.float32, scale=np.sqrt(x.shape[0]))
    assert_close(gb, gb64, np.float32, scale=np.sqrt(x.shape[0]))
    # Without a weight (a module without one: the functional call passes ones) the gradient
    # rows take the other streamed kernel body.
    m = bn.LayerNorm(hidden, elementwise_affine=False)
    m(x)
    gx = m.backward(gy, out=at_offset(x, 5))
    assert_close(gx, ref.layer_norm_backward(gy, x, 1, mean, invstd)[0], np.float32)


@pytest.mark.parametrize("cols", [96, 200])
def test_short_rows_of_a_large_array(cols, rng, threads):
    """Rows shorter than 512 bytes go in blocks even where the arrays are too large for the
    caches (engine/rows.hpp, row_blocks); rows of up to 1 KiB prefetch the rows ahead, forward
    and backward (prefetches_rows): 96 and 200 values a row, 33 and 32 MiB an array, past 16 L2s
    of 2 MiB and half a 32 MiB L3 in every call."""
    x = (rng.standard_normal((90000 * 96 // cols, cols)) * 2 + 3).astype(np.float32)
    w = (rng.standard_normal(cols) * 0.5 + 1).astype(np.float32)
    b = rng.standard_normal(cols).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    y, mean, invstd = ref.layer_norm(x, 1, w, b)
    assert_close(bn.layer_norm(x, (cols,), w, b, out=at_offset(x, 3)), y, np.float32)
    assert_close(bn.layer_norm(x, (cols,), w, b, residual=r), ref.layer_norm(x, 1, w, b, residual=r)[0], np.float32)
    y, rinv = ref.rms_norm(x, 1, w, 1e-5)
    assert_close(bn.rms_norm(x, (cols,), w, 1e-5), y, np.float32)
    gy = r
    gx, gw, gb = bn.layer_norm_backward(gy, x, (cols,), mean.astype(np.float32), invstd.astype(np.float32), w)
    egx, egw, egb = ref.layer_norm_backward(gy, x, 1, mean, invstd, w)
    assert_close(gx, egx, np.float32, scale=np.max(np.abs(w)) * np.max(invstd) * np.max(np.abs(gy)))
    assert_close(gw, egw, np.float32, scale=np.abs(gy).sum() / cols)
    assert_close(gb, egb, np.float32, scale=np.abs(gy).sum() / cols)
    gx, gw = bn.rms_norm_backward(gy, x, (cols,), rinv.astype(np.float32), w)
    egx, egw = ref.rms_norm_backward(gy, x, 1, rinv, w)
    assert_close(gx, egx, np.float32, scale=np.max(np.abs(w)) * np.max(rinv) * np.max(np.abs(gy)))
    assert_close(gw, egw, np.float32, scale=np.abs(gy).sum() / cols * 4)


@layouts
def test_backward_apply_from_gathered_sums(channels_last, rng, threads):
    """SyncBatchNorm's input gradient from sums gathered over the participants (here one) goes
    through the engine's one-pass gradient apply, which streams in both layouts too."""
    from batchnorm import _core

    x, w, _ = inputs(rng, np.float32, channels_last=channels_last)
    gy = np.empty_like(x)
    gy[...] = rng.standard_normal(x.shape)
    mean, var = bn.batch_norm_stats(x)
    invstd = (1 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)
    axes = (0, 2, 3)
    xmu = x.astype(np.float64) - ref.bshape(mean.astype(np.float64), 4, 1)
    sum_dy = gy.astype(np.float64).sum(axis=axes)
    sum_dy_xmu = (gy.astype(np.float64) * xmu).sum(axis=axes)
    n = x.size // x.shape[1]
    gx = _core.batch_norm_backward_apply(gy, x, mean, invstd, w, sum_dy, sum_dy_xmu, float(n), 1, at_offset(x, 9))
    assert_close(gx, ref.backward_train(gy, x, mean, invstd, w)[0], np.float32)
