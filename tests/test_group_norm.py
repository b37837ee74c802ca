"""GroupNorm specifics: the functional form in every channel layout (axis), the fused ReLU,
the backward helper, bad input, and accuracy at mean 1e6 (family-wide checks:
test_norm_family.py)."""

import re

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, assert_unchanged, logical_data, snapshot
from test_numerics import VAR_RTOL, data, out_atol

# (logical shape, groups)
CASES = [((2, 6, 5, 7), 3), ((3, 32, 17), 8), ((4, 5), 5), ((1, 8, 3, 3, 3), 2), ((2, 12, 1, 9), 4)]
CASE_IDS = [f"{'x'.join(map(str, s))}-g{g}" for s, g in CASES]
AXES = [1, -1, 2]  # channels first, last, and between the batch axis (0) and the rest
# every case with every axis its rank has (a 2D input has no axis 2)
LAYOUT_CASES = [(shape, groups, axis) for shape, groups in CASES for axis in AXES if axis < len(shape)]
LAYOUT_IDS = [f"{case_id}-axis{axis}" for (shape, groups), case_id in zip(CASES, CASE_IDS)
              for axis in AXES if axis < len(shape)]


def place(logical, axis):
    """Logical (N, C, ...) data with its channel axis moved to ``axis``."""
    return np.ascontiguousarray(np.moveaxis(logical, 1, axis))


@pytest.mark.parametrize("shape,groups,axis", LAYOUT_CASES, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_group_norm_functional_every_layout(shape, groups, axis, dtype, threads, rng):
    c = shape[1]
    x = place(logical_data(rng, shape), axis).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.uniform(-1, 1, c).astype(dtype)
    # the reference takes the channel axis too: it sees exactly x
    ey, mean, invstd = ref.group_norm(x, groups, w, b, 1e-5, axis)
    y = bn.group_norm(x, groups, w, b, axis=axis)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, ey, dtype)
    relu = bn.group_norm(x, groups, w, b, axis=axis, activation="relu")
    assert_close(relu, np.maximum(ey, 0), dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gx, gw, gb = bn.group_norm_backward(gy, x, groups, mean.astype(dtype), invstd.astype(dtype), w, axis=axis)
    egx, egw, egb = ref.group_norm_backward(gy, x, groups, mean, invstd, w, axis)
    assert_close(gx, egx, dtype, scale=np.max(np.abs(w)) * np.max(invstd) * np.max(np.abs(gy)))
    n_per_channel = x.size // c
    assert_close(gw, egw, dtype, scale=3 * n_per_channel)
    assert_close(gb, egb, dtype, scale=3 * n_per_channel)


def test_module_with_channels_last_matches_torch(torch, rng):
    x = logical_data(rng, (2, 8, 5, 6)).astype(np.float32)
    m = bn.GroupNorm(4, 8, axis=-1)
    tm = torch.nn.GroupNorm(4, 8)
    y = m(place(x, -1))
    assert_close(np.moveaxis(y, -1, 1), tm(torch.from_numpy(x)).detach().numpy(), np.float32)
    # a channels_last torch tensor through the functional form (axis=1: its logical layout)
    xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    assert_close(bn.group_norm(xt, 4).numpy(), tm(xt).detach().numpy(), np.float32)


def test_fused_forward_has_no_backward(rng):
    m = bn.GroupNorm(2, 4, dtype=np.float64)
    x = logical_data(rng, (2, 4, 3))
    assert_close(m(x, activation="relu"), np.maximum(ref.group_norm(x, 2)[0], 0), np.float64)
    with pytest.raises(RuntimeError, match="activation"):
        m.backward(np.ones_like(x))
    with pytest.raises(ValueError, match="activation"):
        m(x, activation="gelu")


# torch's count of values per group (F.group_norm's _verify_batch_size): (N*C // G) times the
# spatial sizes must not be 1. Lopsided, but torch's: (2, 4) in 4 groups passes.
@pytest.mark.parametrize("shape,groups", [((1, 4), 4), ((1, 4, 1), 4), ((1, 2), 2), ((1, 4, 1, 1), 4),
                                          ((2, 4), 4), ((1, 4, 1, 1), 2), ((1, 4, 2), 4), ((0, 4), 4)],
                         ids=str)
def test_one_value_per_group_as_torch(torch, shape, groups):
    x = np.ones(shape, np.float32)
    try:
        torch.nn.functional.group_norm(torch.from_numpy(x), groups)
    except ValueError as e:
        expected = str(e)
    else:
        expected = None
    calls = {"functional": lambda: bn.group_norm(x, groups),
             "module": lambda: bn.GroupNorm(groups, shape[1])(x),
             "channels-last": lambda: bn.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), groups, axis=-1)}
    for name, call in calls.items():
        if expected is None:
            call()
        else:
            with pytest.raises(ValueError, match=re.escape(expected)):
                call()


def test_one_value_per_group_is_refused_without_torch():
    with pytest.raises(ValueError, match=re.escape("Expected more than 1 value per channel when training, "
                                                   "got input size [1, 4, 1]")):
        bn.group_norm(np.ones((1, 4, 1), np.float32), 4)


@pytest.mark.parametrize("args,error,match", [
    ((4, 6), ValueError, r"num_channels \(6\) must be divisible by num_groups \(4\)"),
    ((0, 6), ValueError, "num_groups"),
    ((2, 0), ValueError, "num_channels"),
    ((2.0, 6), TypeError, "num_groups"),
    ((2, 6, 0.0), ValueError, "eps"),
], ids=str)
def test_constructor_arguments(args, error, match):
    with pytest.raises(error, match=match):
        bn.GroupNorm(*args)


def test_bad_input_changes_nothing(rng):
    m = bn.GroupNorm(2, 6)
    x = logical_data(rng, (2, 6, 4)).astype(np.float32)
    out = np.zeros_like(x)
    before = snapshot(m, x, out)
    with pytest.raises(ValueError, match="channels"):
        m(np.ones((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        m(np.ones(6, np.float32))
    with pytest.raises(ValueError, match="num_groups"):
        bn.group_norm(x, 4, out=out)
    with pytest.raises(ValueError, match="weight"):
        bn.group_norm(x, 2, np.ones(5, np.float32), out=out)
    with pytest.raises(ValueError, match="axis"):  # axis 0 holds the batch, never the channels
        bn.group_norm(np.moveaxis(x, 1, 0), 2, axis=0)
    with pytest.raises(ValueError, match="axis"):
        bn.group_norm(x, 2, axis=3, out=out)
    with pytest.raises(TypeError):
        bn.group_norm(x.astype(np.int32), 2, out=out)
    with pytest.raises(TypeError, match="dtype|float"):
        m(x.astype(np.float64))
    assert_unchanged(before, m, x, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((4, 32, 16, 16), 1), ((4, 16, 16, 32), -1), ((64, 32, 3), 1)],
                         ids=["NCHW", "NHWC", "short-groups"])
def test_accuracy_at_mean_1e6(dtype, shape, axis, threads):
    x = data(shape, dtype, 1e6, 1.0, 4)
    y, mean, invstd = bn._core.group_norm(x, 8, None, None, 1e-5, axis)
    ey, _, inv_ref = ref.group_norm(x, 8, None, None, 1e-5, axis)
    var = 1.0 / invstd.astype(np.float64) ** 2 - 1e-5
    v_ref = 1.0 / inv_ref**2 - 1e-5
    assert np.max(np.abs(var - v_ref) / v_ref) <= VAR_RTOL[np.dtype(dtype)]
    assert np.max(np.abs(y - ey)) <= out_atol(dtype, 1e6, 1.0)
