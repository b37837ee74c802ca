"""What ``_NormBase`` owns for every module: the statistics a backward uses are those of
its forward, as saved then (PyTorch's rule), whatever happens to the buffers in between."""

import copy

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, assert_close_sum, logical_data, rand_params


@pytest.mark.parametrize("change", ["in_place", "load_state_dict", "train_forward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_eval_backward_uses_running_stats_as_saved_at_forward(change, dtype, rng):
    m = bn.BatchNorm2d(3, dtype=dtype)
    w, b = rand_params(rng, 3, dtype)
    m.weight[:] = w
    m.bias[:] = b
    m(logical_data(rng, (4, 3, 5, 5)).astype(dtype))
    m.eval()
    mean, var = m.running_mean.copy(), m.running_var.copy()
    x = logical_data(rng, (2, 3, 4, 4), offset=0.5).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    m(x)
    if change == "in_place":
        m.running_mean += 3
        m.running_var *= 4
    elif change == "load_state_dict":
        state = m.state_dict()
        state["running_var"] = state["running_var"] * 9
        m.load_state_dict(state)
    else:  # a training forward on another module sharing the buffers
        other = bn.BatchNorm2d(3, dtype=dtype, momentum=1.0)
        other.running_mean = m.running_mean
        other.running_var = m.running_var
        other(logical_data(rng, (4, 3, 5, 5), offset=7).astype(dtype))
    assert not np.array_equal(m.running_var, var)
    check_eval_backward(m, gy, x, mean, var, w, dtype)


def check_eval_backward(m, gy, x, mean, var, w, dtype):
    """m.backward(gy) after an eval forward of x with running statistics (mean, var)."""
    gx = m.backward(gy)
    egx, egw, egb = ref.backward_eval(gy, x, mean, var, w, 1e-5)
    invstd = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    assert_close(gx, egx, dtype, scale=np.max(np.abs(w * invstd)) * np.max(np.abs(gy)))
    xhat = (x.astype(np.float64) - ref.bshape(mean, 4, 1)) * ref.bshape(invstd, 4, 1)
    assert_close_sum(m.weight_grad, egw, ref.per_channel(np.abs(gy * xhat)).sum(0), dtype)
    assert_close_sum(m.bias_grad, egb, ref.per_channel(np.abs(gy)).sum(0), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_eval_backward_is_not_reached_by_a_copy_of_the_module(dtype, rng):
    """A shallow copy shares the parameter arrays but not what a forward saved: the copy's own
    eval forward, with running statistics of its own, leaves the original's backward alone."""
    m = bn.BatchNorm2d(3, dtype=dtype).eval()
    w = rand_params(rng, 3, dtype)[0]
    m.weight[:] = w
    m.running_mean[:] = rng.standard_normal(3)
    m.running_var[:] = rng.uniform(0.5, 2.0, 3)
    mean, var = m.running_mean.copy(), m.running_var.copy()
    x = logical_data(rng, (2, 3, 4, 4), offset=0.5).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    m(x)
    other = copy.copy(m)
    other.running_mean = mean + 3
    other.running_var = var * 4
    other(logical_data(rng, (2, 3, 4, 4)).astype(dtype))
    check_eval_backward(m, gy, x, mean, var, w, dtype)
