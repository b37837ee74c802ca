"""Outputs too large for the caches are written by non-temporal stores (engine/cache.hpp,
output_writes: a channels-first call whose arrays pass half the L3, in runs of 1 KiB or more):
plain stores up to a run's first cache-line boundary, streamed whole vectors, plain stores for
the rest. The values must be those of any other call: checked here against the float64
reference on arrays of 16 MiB (float32), past half of a 32 MiB L3 in every call, for outputs
that start at several offsets within a cache line and one byte past an aligned address. The
kernel parity test checks the
streamed kernels of every ISA on small arrays; this checks what the engine picks."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import assert_close
from test_misaligned import misaligned

SHAPE = (4, 64, 128, 128)  # 56x56 planes and larger are where ResNet's early stages stream


def inputs(rng, dtype, shape=SHAPE):
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    w = (rng.standard_normal(c) * 0.5 + 1).astype(np.float32 if dtype == np.float16 else dtype)
    b = rng.standard_normal(c).astype(w.dtype)
    return x, w, b


def at_offset(like, values_in):
    """An empty array like ``like`` starting ``values_in`` elements into its buffer."""
    buf = np.empty(like.size + values_in, like.dtype)
    return buf[values_in:].reshape(like.shape)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_train_and_backward(dtype, rng, threads):
    x, w, b = inputs(rng, dtype)
    rm, rv = np.zeros(x.shape[1], dtype), np.ones(x.shape[1], dtype)
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    y64, mean, invstd, new_rm, new_rv = ref.forward_train(x, w, b, np.zeros_like(rm), np.ones_like(rv))
    assert_close(y, y64, dtype, err_msg="training forward")
    assert_close(rm, new_rm, dtype)
    assert_close(rv, new_rv, dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    m, v = bn.batch_norm_stats(x)
    gx, gw, gb = bn.batch_norm_backward(gy, x, m, 1 / np.sqrt(v + dtype(1e-5)), w)
    gx64, gw64, gb64 = ref.backward_train(gy, x, mean, invstd, w)
    assert_close(gx, gx64, dtype, err_msg="grad_x")
    n = x.size // x.shape[1]
    assert_close(gb, gb64, dtype, scale=np.sqrt(n))
    assert_close(gw, gw64, dtype, scale=np.sqrt(n))


@pytest.mark.parametrize("values_in", [0, 1, 5, 15, "byte"])
def test_eval_residual_relu_into_any_offset(values_in, rng, threads):
    dtype = np.float32
    x, w, b = inputs(rng, dtype)
    r = rng.standard_normal(x.shape).astype(dtype)
    rm = rng.standard_normal(x.shape[1]).astype(dtype)
    rv = (rng.random(x.shape[1]) + 0.5).astype(dtype)
    out = misaligned(np.zeros_like(x)) if values_in == "byte" else at_offset(x, values_in)
    got = bn.batch_norm(x, rm, rv, w, b, residual=r, activation="relu", out=out)
    assert got is out
    assert_close(out, ref.fused_eval(x, rm, rv, w, b, 1e-5, 1, r, "relu"), dtype)


def test_float16_within_one_ulp(rng, threads):
    """Half outputs stream as 16-bit lanes: within 1 ulp of float16 at the float64 result, plus
    float32 roundings of the terms (tests/test_half.py's rule)."""
    x, w, b = inputs(rng, np.float16, (8, 64, 128, 128))
    rm, rv = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    x64 = x.astype(np.float64)
    y64 = ref.forward_train(x64, w, b)[0]
    bb = ref.bshape(b.astype(np.float64), x.ndim, 1)
    spacing = np.spacing(np.abs(y64).astype(np.float16)).astype(np.float64)
    bound = spacing + 8 * 2.0**-24 * (np.abs(y64 - bb) + np.abs(bb))
    err = np.abs(y.astype(np.float64) - y64)
    assert y.dtype == np.float16 and np.all(err <= bound), f"{np.count_nonzero(err > bound)} values off"
