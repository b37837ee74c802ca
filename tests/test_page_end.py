"""Arrays that end exactly where an unreadable page begins: a vector tail (fewer values than a
SIMD register holds) must touch no byte past the array, reading or writing. Masked moves
suppress faults on their masked-off lanes; other instructions with a masked memory operand do
not (GCC once folded the AVX-512 tail stores into vextractf64x4, which crashed on the ASan
build's heap). Every array here is placed in an mmap whose next page is PROT_NONE
(helpers.PageEnd), so a stray access is a segmentation fault, not a silent read. Half storage:
test_half.py. The suite runs under every BATCHNORM_ISA."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, TAILS, assert_close, page_end_layouts, rand_params

@pytest.mark.parametrize("size", TAILS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_norm_tails_at_a_page_end(size, dtype, page_end, threads, rng):
    for shape, axis in page_end_layouts(size):
        x = (rng.standard_normal(shape) + 2.0).astype(dtype)
        c = shape[axis]
        w, b = rand_params(rng, c, dtype)
        px, pw, pb = page_end.place(x), page_end.place(w), page_end.place(b)
        rm, rv = page_end.place(np.zeros(c, dtype)), page_end.place(np.ones(c, dtype))
        y = page_end.place(np.zeros(shape, dtype))
        bn.batch_norm(px, rm, rv, pw, pb, training=True, axis=axis, out=y)
        ey, mean, invstd, erm, erv = ref.forward_train(x, w, b, np.zeros(c), np.ones(c), 0.1, 1e-5, axis)
        assert_close(y, ey, dtype)
        assert_close(rm, erm, dtype)
        assert_close(rv, erv, dtype)

        bn.batch_norm(px, rm, rv, pw, pb, axis=axis, out=y)
        assert_close(y, ref.forward_eval(x, erm, erv, w, b, 1e-5, axis), dtype)

        gy = rng.standard_normal(shape).astype(dtype)
        gx, gw, gb = bn.batch_norm_backward(page_end.place(gy), px, page_end.place(mean.astype(dtype)),
                                            page_end.place(invstd.astype(dtype)), pw, axis=axis)
        egx, egw, egb = ref.backward_train(gy, x, mean.astype(dtype), invstd.astype(dtype), w, axis)
        n = x.size // c
        assert_close(gx, egx, dtype, scale=4 * np.abs(gy).max())
        assert_close(gw, egw, dtype, scale=4 * n)
        assert_close(gb, egb, dtype, scale=4 * n)


@pytest.mark.parametrize("size", TAILS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_backward_into_a_page_end(size, dtype, page_end, rng):
    x = (rng.standard_normal((2, 3, size)) + 2.0).astype(dtype)
    m = bn.BatchNorm1d(3, dtype=dtype)
    m(page_end.place(x), out=page_end.place(np.zeros_like(x)))
    gy = rng.standard_normal(x.shape).astype(dtype)
    gx = page_end.place(np.zeros_like(x))
    m.backward(page_end.place(gy), out=gx)
    mean, var = ref.stats(x)
    invstd = 1.0 / np.sqrt(var + m.eps)
    egx, _, _ = ref.backward_train(gy, x, mean.astype(dtype), invstd.astype(dtype), m.weight, 1)
    assert_close(gx, egx, dtype, scale=4 * np.abs(gy).max())
