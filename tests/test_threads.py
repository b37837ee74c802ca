"""Results at 1 and 2 threads agree (and both agree with the reference).

Problems are large enough that the library actually splits them (it runs calls that move
less than 2 MiB on one thread; every case here moves more in float32): channels-first with
C=1 and C=3 < threads so a channel is split; channels-last with many rows.  Agreement is
within float tolerance (the split changes summation order): element-wise outputs
rtol=atol=1e-5 (float32) / 1e-12 (float64); reductions rtol * sum|terms|.
"""

import threading

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, assert_close_sum, make_input, module_cls

BIG = [((2, 1, 512, 512), "contiguous"), ((4, 3, 192, 192), "contiguous"),
       ((8, 33, 40, 40), "channels_last"), ((120000, 5), "contiguous"), ((4, 7, 128, 128), "cl_view")]
BIG_IDS = ["C1", "C3", "NHWC33", "NC-rows", "clview"]


def run_all(x, axis, gy, dtype, threads):
    old = bn.get_num_threads()
    bn.set_num_threads(threads)
    try:
        c = x.shape[axis]
        m = module_cls(x.ndim)(c, dtype=dtype, axis=axis)
        y = m(x)
        gx = m.backward(gy)
        mean, var = bn.batch_norm_stats(x, axis=axis)
        m.eval()
        ye = m(x)
        return dict(y=y, gx=gx, gw=m.weight_grad.copy(), gb=m.bias_grad.copy(), mean=mean, var=var,
                    rm=m.running_mean.copy(), rv=m.running_var.copy(), ye=ye)
    finally:
        bn.set_num_threads(old)


@pytest.mark.parametrize("case", BIG, ids=BIG_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_and_two_threads_agree(case, dtype, rng):
    shape, layout = case
    x, axis = make_input(rng, shape, dtype, layout, offset=50.0)
    gy = rng.standard_normal(x.shape).astype(dtype)
    r1 = run_all(x, axis, gy, dtype, 1)
    r2 = run_all(x, axis, gy, dtype, 2)
    _check_agree(x, axis, gy, dtype, r1, r2)
    # 3 threads on 2 cores: an uneven split must still be right
    _check_agree(x, axis, gy, dtype, r1, run_all(x, axis, gy, dtype, 3))


def _check_agree(x, axis, gy, dtype, r1, r2):
    mean, var = ref.stats(x, axis)
    for k in ("y", "ye", "gx"):
        assert_close(r2[k], r1[k], dtype, scale=4, err_msg=k)
    n = x.size // x.shape[axis]
    expect = dict(mean=mean, var=var, rm=0.1 * mean, rv=0.9 + 0.1 * var * n / (n - 1))
    for k in ("mean", "rm", "var", "rv"):
        assert_close(r2[k], r1[k], dtype, scale=60, err_msg=k)
        assert_close(r1[k], expect[k], dtype, scale=60, err_msg=k)
    xhat = np.abs(ref.forward_train(x, axis=axis)[0])
    gabs = np.abs(gy.astype(np.float64))
    assert_close_sum(r2["gw"], r1["gw"], ref.per_channel(gabs * xhat, axis).sum(0), dtype, "grad_weight")
    assert_close_sum(r2["gb"], r1["gb"], ref.per_channel(gabs, axis).sum(0), dtype, "grad_bias")


def test_threads_fixture_restores(threads):
    assert bn.get_num_threads() == threads


def test_set_num_threads_roundtrip():
    old = bn.get_num_threads()
    try:
        for n in (1, 2, 4):
            bn.set_num_threads(n)
            # A serial build (no OpenMP) accepts the setting and keeps running on one thread.
            assert bn.get_num_threads() == (n if bn._core.openmp_enabled() else 1)
    finally:
        bn.set_num_threads(old)


@pytest.mark.skipif(not bn._core.openmp_enabled(), reason="serial build: the count is always 1")
def test_count_is_process_wide():
    """A count set in one Python thread is the count of calls made from every other one."""
    old = bn.get_num_threads()
    seen = []

    def look():
        seen.append(bn.get_num_threads())

    def set_to(n):
        bn.set_num_threads(n)

    try:
        for n in (1, 3):
            bn.set_num_threads(n)  # from this thread, seen by a new one
            worker = threading.Thread(target=look)
            worker.start()
            worker.join()
            assert seen.pop() == n
        setter = threading.Thread(target=set_to, args=(5,))  # from another thread, seen here
        setter.start()
        setter.join()
        assert bn.get_num_threads() == 5
    finally:
        bn.set_num_threads(old)
