"""PyTorch CPU tensors as inputs (DLPack), including channels_last memory.

DESIGN.md: "Inputs are NumPy arrays or any DLPack producer (PyTorch CPU tensors, including
channels_last memory); a strided input that is not a zero-copy layout is copied once,
never mis-read."  If `_core` does not accept tensors yet, the whole module is skipped
with that reason (it is a later issue); NumPy inputs are covered everywhere else.
Tolerances as in helpers.py.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm as bn  # noqa: E402
import reference as ref  # noqa: E402
from helpers import DTYPE_IDS, DTYPES, assert_close, logical_data, torch_dtype  # noqa: E402


def _probe():
    try:
        bn.batch_norm_stats(torch.ones(4, 3))
    except TypeError as e:
        return str(e)
    return None


_REJECTED = _probe()
pytestmark = pytest.mark.skipif(
    _REJECTED is not None,
    reason=f"batchnorm._core does not accept torch tensors (DLPack input) yet: {_REJECTED}")


def T(a, fmt=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if fmt is None else t.to(memory_format=fmt)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_module_on_tensor_2d(dtype, fmt, threads, rng):
    x = logical_data(rng, (3, 17, 5, 7)).astype(dtype)
    xt = T(x, torch.channels_last if fmt == "channels_last" else None)
    m = bn.BatchNorm2d(17, dtype=dtype)
    tm = torch.nn.BatchNorm2d(17, dtype=torch_dtype(torch, dtype))
    y = m(xt)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == dtype
    assert_close(y, ref.forward_train(x)[0], dtype)
    assert_close(y, tm(xt).detach().numpy(), dtype)
    assert_close(m.running_var, tm.running_var.numpy(), dtype)
    if fmt == "channels_last":
        # output has the memory layout of x: NHWC memory
        assert np.moveaxis(y, 1, -1).flags.c_contiguous
    m.eval()
    tm.eval()
    assert_close(m(xt), tm(xt).detach().numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_on_channels_last_3d(dtype, rng):
    x = logical_data(rng, (2, 5, 3, 4, 6)).astype(dtype)
    xt = T(x, torch.channels_last_3d)
    m = bn.BatchNorm3d(5, dtype=dtype)
    assert_close(m(xt), ref.forward_train(x)[0], dtype)
    gy = logical_data(rng, x.shape).astype(dtype)
    gx = m.backward(T(gy, torch.channels_last_3d))
    mean, var = ref.stats(x)
    egx = ref.backward_train(gy, x, mean, 1 / np.sqrt(var + 1e-5))[0]
    assert_close(gx, egx, dtype, scale=8)


def test_non_contiguous_tensor_is_copied_not_misread(rng):
    base = logical_data(rng, (4, 6, 8, 10)).astype(np.float32)
    xt = T(base)[:, ::2, 1::3, :]          # strided: not a zero-copy layout
    x = xt.numpy()
    m = bn.BatchNorm2d(3)
    assert_close(m(xt), ref.forward_train(x)[0], np.float32)
    xt2 = T(base).transpose(2, 3)          # a non-contiguous permutation
    assert_close(bn.BatchNorm2d(6)(xt2), ref.forward_train(xt2.numpy())[0], np.float32)


def test_functional_updates_torch_running_stats_in_place(rng):
    x = logical_data(rng, (8, 3, 5)).astype(np.float32)
    rm, rv = torch.zeros(3), torch.ones(3)
    w, b = torch.full((3,), 2.0), torch.full((3,), 0.5)
    trm, trv = rm.clone(), rv.clone()
    y = bn.batch_norm(T(x), rm, rv, w, b, training=True, momentum=0.2)
    yt = torch.nn.functional.batch_norm(T(x), trm, trv, w, b, True, 0.2, 1e-5)
    assert_close(y, yt.numpy(), np.float32)
    assert_close(rm.numpy(), trm.numpy(), np.float32)
    assert_close(rv.numpy(), trv.numpy(), np.float32)


def test_float64_tensor_into_float32_module_is_type_error(rng):
    m = bn.BatchNorm1d(3)
    with pytest.raises(TypeError, match=r"(\bx\b|\binput\b)"):
        m(torch.randn(4, 3, dtype=torch.float64))
    assert int(m.num_batches_tracked) == 0


def test_integer_tensor_is_type_error():
    with pytest.raises(TypeError):
        bn.batch_norm_stats(torch.ones(4, 3, dtype=torch.int32))


def test_stats_on_tensor_matches_torch_var_mean(rng):
    x = logical_data(rng, (6, 4, 9), offset=3).astype(np.float64)
    mean, var = bn.batch_norm_stats(T(x))
    tv, tm = torch.var_mean(T(x), dim=(0, 2), unbiased=False)
    assert_close(mean, tm.numpy(), np.float64, scale=6)
    assert_close(var, tv.numpy(), np.float64)
