"""Python object manners of the NumPy modules: pickle, copy, equality, repr, writable
parameters. Outputs are compared bit for bit (a copy runs the same kernels on the same
values), except where stated.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import batchnorm as bn
from helpers import logical_data

STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

VARIANTS = [
    (bn.BatchNorm1d, (6, 3), {}),
    (bn.BatchNorm1d, (4, 3, 5), {"momentum": None, "dtype": np.float64}),
    (bn.BatchNorm2d, (2, 3, 4, 4), {"affine": False, "eps": 1e-3}),
    (bn.BatchNorm2d, (2, 4, 4, 3), {"axis": -1}),
    (bn.BatchNorm3d, (2, 3, 2, 3, 2), {"track_running_stats": False}),
]
IDS = ["1d", "1d-f64-cumulative", "2d-noaffine", "2d-axis-1", "3d-notrack"]


def trained(cls, shape, kwargs, rng):
    m = cls(3, **kwargs)
    if m.weight is not None:
        m.weight[:] = rng.uniform(0.5, 1.5, 3)
        m.bias[:] = rng.normal(size=3)
    for step in range(2):
        m(logical_data(rng, shape, offset=step).astype(m.dtype))
    m.backward(logical_data(rng, shape).astype(m.dtype))
    return m


def assert_same_state(a, b, *, shared):
    assert type(a) is type(b)
    for key in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training",
                "dtype", "axis"):
        assert getattr(a, key) == getattr(b, key), key
    for key in STATE + ("weight_grad", "bias_grad"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None), key
        if va is not None:
            assert type(vb) is np.ndarray and vb.dtype == va.dtype and vb.shape == va.shape, key
            np.testing.assert_array_equal(va, vb, err_msg=key)
            assert np.shares_memory(va, vb) == shared, key
    assert repr(a) == repr(b)


COPIES = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "pickle-proto2": lambda m: pickle.loads(pickle.dumps(m, protocol=2)),
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("cls,shape,kwargs", VARIANTS, ids=IDS)
def test_copies_are_equal_and_independent(cls, shape, kwargs, how, rng):
    m = trained(cls, shape, kwargs, rng)
    c = COPIES[how](m)
    assert_same_state(m, c, shared=False)
    # writable, C-contiguous arrays: the kernels can update them in place
    for key in STATE:
        v = getattr(c, key)
        if v is not None:
            assert v.flags.writeable and v.flags.c_contiguous, key
    # the copy evolves exactly like the original, and independently of it
    x = logical_data(rng, shape, offset=3).astype(m.dtype)
    np.testing.assert_array_equal(c(x), m(x))
    assert_same_state(m, c, shared=False)
    if c.weight is not None:
        c.weight[:] = 7.0
        assert not np.any(m.weight == 7.0)
    if c.running_mean is not None:
        c(x + 5)
        assert int(c.num_batches_tracked) == int(m.num_batches_tracked) + 1
        assert not np.array_equal(c.running_mean, m.running_mean)


@pytest.mark.parametrize("how", list(COPIES))
def test_saved_forward_context_is_dropped(how, rng):
    m = bn.BatchNorm2d(3)
    x = logical_data(rng, (4, 3, 16, 16)).astype(np.float32)
    m(x)
    c = COPIES[how](m)
    with pytest.raises(RuntimeError, match="backward needs a forward first"):
        c.backward(x)
    m.backward(x)  # the original keeps its context
    # the input is not in the pickle: far smaller than x's 12 KiB
    assert len(pickle.dumps(m)) < x.nbytes // 2


def test_pickle_after_a_torch_forward_keeps_no_tensor(rng):
    torch = pytest.importorskip("torch")
    m = bn.BatchNorm1d(3)
    m(torch.randn(8, 3, 100))
    data = pickle.dumps(m)
    assert b"torch" not in data
    c = pickle.loads(data)
    assert int(c.num_batches_tracked) == 1


def test_shallow_copy_shares_arrays_like_torch_modules(rng):
    m = trained(bn.BatchNorm2d, (2, 3, 4, 4), {}, rng)
    c = copy.copy(m)
    assert_same_state(m, c, shared=True)
    c.training = False
    assert m.training is True  # attributes are the copy's own; arrays are shared


def test_equality_is_identity_and_modules_are_hashable():
    a, b = bn.BatchNorm2d(3), bn.BatchNorm2d(3)
    assert a == a and a != b and not (a == b)
    assert a != copy.deepcopy(a)
    assert len({a, b, a}) == 2
    assert {a: 1}[a] == 1
    assert type(a).__eq__ is object.__eq__ and type(a).__hash__ is object.__hash__


def test_repr_is_torch_style():
    assert repr(bn.BatchNorm2d(8)) == (
        "BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)")
    assert repr(bn.BatchNorm1d(4, momentum=None, dtype=np.float64, axis=-1)) == (
        "BatchNorm1d(4, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True, "
        "dtype=float64, axis=-1)")


def test_parameters_are_writable_arrays_the_kernels_read(rng):
    m = bn.BatchNorm2d(3).eval()
    x = logical_data(rng, (2, 3, 4, 4)).astype(np.float32)
    m.weight[:] = 2
    m.bias[:] = 0.5
    m.running_var[:] = 4
    expected = (x - 0) * 2 / np.sqrt(4 + 1e-5) + 0.5
    np.testing.assert_allclose(m(x), expected, rtol=1e-6, atol=1e-6)
    weight = m.weight
    m.weight = np.full(3, 3.0, np.float32)  # assignment stores the array itself
    assert m.weight is not weight and m.weight[0] == 3.0
    np.testing.assert_allclose(m(x), expected * 1.5 - 0.25, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value,error", [
    (np.ones(4, np.float32), ValueError),                     # wrong shape
    (np.ones(3, np.float64), TypeError),                      # wrong dtype
    ([1.0, 1.0, 1.0], TypeError),                             # not an array
    (np.ones(6, np.float32)[::2], ValueError),                # not contiguous
    (np.ones(3, np.float32).copy().view(), None),             # fine
], ids=["shape", "dtype", "list", "strided", "ok"])
def test_assigning_a_wrong_array_raises_and_keeps_the_old(value, error):
    m = bn.BatchNorm1d(3)
    old = m.weight
    if error is None:
        m.weight = value
        assert m.weight is value
        return
    with pytest.raises(error, match="weight"):
        m.weight = value
    assert m.weight is old


def test_read_only_parameter_is_rejected():
    m = bn.BatchNorm1d(3)
    frozen = np.ones(3, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        m.running_mean = frozen
