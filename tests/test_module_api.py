"""Module API: state_dict / load_state_dict (NumPy and torch), train/eval, resets, repr,
parameter assignment.  Tolerances as in helpers.py (float32 1e-5, float64 1e-12).
"""

import re

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import (same_random_params, DTYPE_IDS, DTYPES, assert_close, logical_data, rand_params,
                     torch_cls, torch_dtype)

CLASSES = [(bn.BatchNorm1d, (6, 4, 5)), (bn.BatchNorm2d, (3, 4, 5, 2)), (bn.BatchNorm3d, (2, 4, 3, 2, 2))]
CLS_IDS = ["1d", "2d", "3d"]


def expected_keys(affine, track):
    keys = []
    if affine:
        keys += ["weight", "bias"]
    if track:
        keys += ["running_mean", "running_var", "num_batches_tracked"]
    return keys


def to_np(v):
    if hasattr(v, "detach"):
        return v.detach().numpy()
    return np.asarray(v)


@pytest.mark.parametrize("cls,shape", CLASSES, ids=CLS_IDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dict_equals_torch(torch, cls, shape, affine, track, dtype, rng):
    c = shape[1]
    m = cls(c, affine=affine, track_running_stats=track, dtype=dtype)
    tm = torch_cls(torch, len(shape))(c, affine=affine, track_running_stats=track,
                                      dtype=torch_dtype(torch, dtype))
    if affine:
        same_random_params(rng, m, tm, dtype)
    for step in range(3):
        x = logical_data(rng, shape, offset=step).astype(dtype)
        m(x)
        tm(torch.from_numpy(x))
    sd, tsd = m.state_dict(), tm.state_dict()
    assert list(sd.keys()) == list(tsd.keys()) == expected_keys(affine, track)
    for k in sd:
        v, tv = np.asarray(sd[k]), tsd[k].numpy()
        assert v.shape == tv.shape, k
        if k == "num_batches_tracked":
            assert v.dtype == np.int64 and int(v) == int(tv) == 3
        else:
            assert v.dtype == dtype, k
            assert_close(v, tv, dtype, err_msg=k)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_without_bias_like_torch(torch, training, dtype, rng):
    # torch's `bias=False`: a learnable weight and no bias (no "bias" key, no bias_grad)
    m = bn.BatchNorm2d(3, bias=False, dtype=dtype)
    tm = torch.nn.BatchNorm2d(3, bias=False, dtype=torch_dtype(torch, dtype))
    assert m.bias is None and tm.bias is None and m.weight is not None
    m.weight[:] = rng.uniform(0.5, 1.5, 3)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in m.state_dict().items()})
    assert list(m.state_dict()) == list(tm.state_dict()) == ["weight", "running_mean", "running_var",
                                                           "num_batches_tracked"]
    m.train(training)
    tm.train(training)
    x = logical_data(rng, (4, 3, 5, 5)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = tm(xt)
    yt.backward(torch.from_numpy(gy))
    y = m(x)
    gx = m.backward(gy)
    assert_close(y, yt.detach().numpy(), dtype)
    assert_close(gx, xt.grad.numpy(), dtype, scale=np.abs(gy).max())
    assert_close(m.weight_grad, tm.weight.grad.numpy(), dtype, scale=x.size)
    assert m.bias_grad is None
    # against float64 NumPy: weight-only affine is bias 0
    if training:
        mean, var = ref.stats(x.astype(np.float64))
        expected = ref.forward_eval(x.astype(np.float64), mean, var, m.weight.astype(np.float64), np.zeros(3), 1e-5, 1)
    else:
        expected = ref.forward_eval(x.astype(np.float64), np.zeros(3), np.ones(3), m.weight.astype(np.float64),
                                    np.zeros(3), 1e-5, 1)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("cls,shape", CLASSES, ids=CLS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_load_state_dict_from_torch_tensors(torch, cls, shape, dtype, rng):
    c = shape[1]
    tm = torch_cls(torch, len(shape))(c, dtype=torch_dtype(torch, dtype))
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(rand_params(rng, c, dtype)[0]))
        tm.bias.copy_(torch.from_numpy(rand_params(rng, c, dtype)[1]))
    for step in range(4):
        tm(torch.from_numpy(logical_data(rng, shape, offset=step).astype(dtype)))
    m = cls(c, dtype=dtype)
    m.load_state_dict(tm.state_dict())
    for k, tv in tm.state_dict().items():
        np.testing.assert_array_equal(np.asarray(getattr(m, k)), tv.numpy(), err_msg=k)
    assert int(m.num_batches_tracked) == 4
    m.eval()
    tm.eval()
    x = logical_data(rng, shape).astype(dtype)
    assert_close(m(x), tm(torch.from_numpy(x)).detach().numpy(), dtype)
    # training continues from the loaded state exactly like torch
    m.train()
    tm.train()
    x = logical_data(rng, shape).astype(dtype)
    assert_close(m(x), tm(torch.from_numpy(x)).detach().numpy(), dtype)
    assert_close(m.running_var, tm.running_var.numpy(), dtype)
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_load_state_dict_numpy_roundtrip(dtype, rng):
    m = bn.BatchNorm2d(5, dtype=dtype)
    m.weight[:] = rng.standard_normal(5)
    for step in range(2):
        m(logical_data(rng, (3, 5, 2, 2), offset=step).astype(dtype))
    sd = {k: np.array(v, copy=True) for k, v in m.state_dict().items()}
    m2 = bn.BatchNorm2d(5, dtype=dtype)
    res = m2.load_state_dict(sd)
    for k in sd:
        np.testing.assert_array_equal(np.asarray(getattr(m2, k)), sd[k], err_msg=k)
    # the loaded arrays are copied in: mutating the source dict does not alias the module
    sd["running_mean"][:] = 123.0
    assert not np.any(m2.running_mean == 123.0)
    if res is not None:  # torch returns (missing_keys, unexpected_keys)
        assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []
    x = logical_data(rng, (3, 5, 2, 2)).astype(dtype)
    m.eval()
    m2.eval()
    np.testing.assert_array_equal(m(x), m2(x))


def test_load_state_dict_non_strict_like_torch(torch, rng):
    tm = torch.nn.BatchNorm2d(3)
    m = bn.BatchNorm2d(3)
    w = rng.standard_normal(3).astype(np.float32)
    sd = {"weight": w, "extra": np.zeros(2, np.float32)}
    tres = tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    snap_rm = m.running_mean.copy()
    res = m.load_state_dict(sd, strict=False)
    np.testing.assert_array_equal(m.weight, w)
    np.testing.assert_array_equal(m.running_mean, snap_rm)
    assert sorted(res.missing_keys) == sorted(tres.missing_keys)
    assert sorted(res.unexpected_keys) == sorted(tres.unexpected_keys) == ["extra"]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("versioned", [True, False], ids=["torch-state-dict", "plain-dict"])
def test_instance_norm_checkpoint_with_running_stats_like_torch(torch, versioned, strict):
    """Running statistics in a checkpoint for an instance norm that does not track them: an
    error even when not strict if the checkpoint has no version (torch's pre-0.4 rule), else
    unexpected keys; torch's messages, and nothing written on error."""
    checkpoint = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).state_dict()
    checkpoint = checkpoint if versioned else dict(checkpoint)
    results = []
    ref = torch.nn.InstanceNorm2d(3, affine=True)
    with torch.no_grad():
        ref.weight.fill_(2)
    m = bn.InstanceNorm2d(3, affine=True)
    m.weight[...] = 2
    for m in (ref, m):
        try:
            keys = m.load_state_dict(checkpoint, strict=strict)
            results.append((None, sorted(keys.missing_keys), sorted(keys.unexpected_keys)))
        except RuntimeError as error:
            results.append((str(error), None, None))
            if isinstance(m, bn.InstanceNorm2d):  # nothing written (torch's module copies as it goes)
                assert float(m.weight[0]) == 2
    assert results[1] == results[0]


def test_load_state_dict_one_element_counter_like_torch(torch):
    """A 1-element num_batches_tracked (checkpoints of torch 0.3) loads into the 0-d counter."""
    checkpoint = dict(torch.nn.BatchNorm1d(3).state_dict())
    checkpoint["num_batches_tracked"] = torch.tensor([7])
    ref, m = torch.nn.BatchNorm1d(3), bn.BatchNorm1d(3)
    ref.load_state_dict(checkpoint)
    m.load_state_dict(checkpoint)
    assert m.num_batches_tracked.shape == () and int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 7


@pytest.mark.parametrize("cls", [bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d], ids=CLS_IDS)
def test_train_eval_return_self(cls):
    m = cls(3)
    assert m.training is True
    assert m.eval() is m and m.training is False
    assert m.train() is m and m.training is True
    assert m.train(False) is m and m.training is False
    assert m.train(mode=True) is m and m.training is True


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reset_running_stats_and_parameters(dtype, rng):
    m = bn.BatchNorm2d(4, dtype=dtype)
    m.weight[:] = rng.standard_normal(4)
    m.bias[:] = rng.standard_normal(4)
    for _ in range(2):
        m(logical_data(rng, (2, 4, 3, 3), offset=5).astype(dtype))
    w = m.weight.copy()
    m.reset_running_stats()
    np.testing.assert_array_equal(m.running_mean, np.zeros(4))
    np.testing.assert_array_equal(m.running_var, np.ones(4))
    assert int(m.num_batches_tracked) == 0
    assert m.running_mean.dtype == dtype
    np.testing.assert_array_equal(m.weight, w)  # parameters untouched
    m(logical_data(rng, (2, 4, 3, 3), offset=5).astype(dtype))
    m.reset_parameters()  # torch: resets running stats too, weight=1, bias=0
    np.testing.assert_array_equal(m.weight, np.ones(4))
    np.testing.assert_array_equal(m.bias, np.zeros(4))
    np.testing.assert_array_equal(m.running_mean, np.zeros(4))
    np.testing.assert_array_equal(m.running_var, np.ones(4))
    assert int(m.num_batches_tracked) == 0
    assert m.weight.dtype == dtype


def test_reset_momentum_none_restarts_average(rng):
    m = bn.BatchNorm1d(3, momentum=None, dtype=np.float64)
    m(logical_data(rng, (5, 3), offset=100))
    m.reset_running_stats()
    x = logical_data(rng, (5, 3))
    m(x)
    mu, var = ref.stats(x)
    assert_close(m.running_mean, mu, np.float64)  # first batch after reset: factor 1
    assert_close(m.running_var, var * 5 / 4, np.float64)


@pytest.mark.parametrize("kwargs", [
    {}, {"eps": 1e-3}, {"momentum": None}, {"momentum": 0.25, "affine": False},
    {"track_running_stats": False}, {"eps": 2e-5, "momentum": 0.5, "affine": False, "track_running_stats": False},
    {"bias": False}, {"affine": False, "bias": True},
], ids=str)
@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_repr_like_torch(torch, name, kwargs):
    assert repr(getattr(bn, name)(7, **kwargs)) == repr(getattr(torch.nn, name)(7, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_slice_assignment_takes_effect(dtype, rng):
    m = bn.BatchNorm2d(3, dtype=dtype)
    w, b = rand_params(rng, 3, dtype)
    m.weight[:] = w
    m.bias[:] = b
    x = logical_data(rng, (2, 3, 4, 4)).astype(dtype)
    y = m(x)
    assert_close(y, ref.forward_train(x, w, b)[0], dtype)
    m.weight[1] = 0.0
    y = m(x)
    assert_close(y[:, 1], np.full_like(y[:, 1], b[1]), dtype)
    m.eval()
    m.running_mean[:] = 1.0
    m.running_var[:] = 4.0
    assert_close(m(x), ref.forward_eval(x, np.ones(3), np.full(3, 4.0), m.weight, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_weight_attribute_assignment_takes_effect(dtype, rng):
    m = bn.BatchNorm1d(3, dtype=dtype)
    w, b = rand_params(rng, 3, dtype)
    m.weight = w.copy()
    m.bias = b.copy()
    np.testing.assert_array_equal(m.weight, w)
    x = logical_data(rng, (6, 3)).astype(dtype)
    assert_close(m(x), ref.forward_train(x, w, b)[0], dtype)


def test_modules_are_independent():
    a, b = bn.BatchNorm1d(3), bn.BatchNorm1d(3)
    a.weight[:] = 5
    a.running_mean[:] = 2
    np.testing.assert_array_equal(b.weight, np.ones(3))
    np.testing.assert_array_equal(b.running_mean, np.zeros(3))


def test_dtype_and_defaults():
    m = bn.BatchNorm2d(3)
    assert m.weight.dtype == np.float32
    assert m.eps == 1e-5 and m.momentum == 0.1
    assert m.num_features == 3
    assert m.affine is True and m.track_running_stats is True
    m64 = bn.BatchNorm3d(2, dtype=np.float64)
    assert m64.running_var.dtype == np.float64


def test_version_and_threads_api():
    assert isinstance(bn.__version__, str) and bn.__version__
    assert bn.isa() in ("avx512", "avx2", "neon", "scalar")
    old = bn.get_num_threads()
    assert isinstance(old, int) and old >= 1
    try:
        bn.set_num_threads(2)
        # A serial build (no OpenMP) accepts the setting and keeps running on one thread.
        assert bn.get_num_threads() == (2 if bn._core.openmp_enabled() else 1)
        bn.set_num_threads(1)
        assert bn.get_num_threads() == 1
    finally:
        bn.set_num_threads(old)
    assert bn.get_num_threads() == old


def test_get_include_and_cmake_dir():
    import os
    inc = bn.get_include()
    assert os.path.isfile(os.path.join(inc, "batchnorm", "batchnorm.hpp")), inc
    cm = bn.get_cmake_dir()
    assert os.path.isdir(cm)
    names = [f.lower() for f in os.listdir(cm)]
    assert "batchnormconfig.cmake" in names or "batchnorm-config.cmake" in names, names


_MODULES_WITH_SCALARS = {
    "BatchNorm1d": (lambda: bn.BatchNorm1d(3), ("eps", "momentum", "axis")),
    "BatchNorm1d-eval": (lambda: bn.BatchNorm1d(3).eval(), ("eps", "axis")),
    "InstanceNorm1d": (lambda: bn.InstanceNorm1d(3, affine=True, track_running_stats=True),
                       ("eps", "momentum", "axis")),
    "GroupNorm": (lambda: bn.GroupNorm(1, 3), ("eps", "axis", "num_groups")),
    "LayerNorm": (lambda: bn.LayerNorm(5), ("eps",)),
}


@pytest.mark.parametrize("kind", list(_MODULES_WITH_SCALARS))
@pytest.mark.parametrize("value", ["0.1", 1.0, True], ids=["str", "float", "bool"])
def test_a_scalar_attribute_of_the_wrong_type_is_named(rng, kind, value):
    """eps, momentum, axis and num_groups are plain attributes: set to a value of the wrong
    type, the next call raises a TypeError naming the attribute (not the core's list of
    signatures) and changes no state."""
    make, names = _MODULES_WITH_SCALARS[kind]
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    for name in names:
        kind_of = "float" if name in ("eps", "momentum") else "int"
        if kind_of == "float" and type(value) is float:
            continue  # a float eps or momentum is right
        m = make()
        setattr(m, name, value)
        before = {k: np.array(v, copy=True) for k, v in m.state_dict().items()}
        with pytest.raises(TypeError, match=f"^{name} must be an? {kind_of}, got {type(value).__name__}$"):
            m(x)
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)
