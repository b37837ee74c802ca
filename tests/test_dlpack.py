"""DLPack in and out: PyTorch CPU tensors (including channels_last memory), NumPy subclasses,
bare DLPack producers and Array API objects.

DESIGN.md: "Inputs are NumPy arrays or any DLPack producer (PyTorch CPU tensors, including
channels_last memory); a strided input that is not a zero-copy layout is copied once,
never mis-read."  Every public entry point returns the kind of array it was given: a torch
tensor for a torch tensor (a zero-copy view of the NumPy array ``_core`` wrote, in the same
memory format), ``out`` itself when given, NumPy for NumPy (and for producers whose kind is
unknown). Zero copy is proven with data pointers. Tolerances as in helpers.py.
"""

import numpy as np
import pytest

import batchnorm as bn  # noqa: E402
import batchnorm.functional as F  # noqa: E402
import batchnorm.modules as M  # noqa: E402
import reference as ref  # noqa: E402
from helpers import DTYPE_IDS, DTYPES, assert_close, logical_data, torch_dtype  # noqa: E402

try:
    import torch
except ImportError:  # the torch tests skip; the NumPy / bare-DLPack ones still run
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def _probe():
    if torch is None:
        return None
    try:
        bn.batch_norm_stats(torch.ones(4, 3))
    except TypeError as e:
        return str(e)
    return None


_REJECTED = _probe()
pytestmark = pytest.mark.skipif(
    _REJECTED is not None,
    reason=f"batchnorm._core does not accept torch tensors (DLPack input) yet: {_REJECTED}")


def ptr(a):
    """Address of the first element: torch tensor or NumPy array."""
    if hasattr(a, "data_ptr"):
        return a.data_ptr()
    return a.__array_interface__["data"][0]


def T(a, fmt=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if fmt is None else t.to(memory_format=fmt)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@needs_torch
def test_module_on_tensor_2d(dtype, fmt, threads, rng):
    x = logical_data(rng, (3, 17, 5, 7)).astype(dtype)
    xt = T(x, torch.channels_last if fmt == "channels_last" else None)
    m = bn.BatchNorm2d(17, dtype=dtype)
    tm = torch.nn.BatchNorm2d(17, dtype=torch_dtype(torch, dtype))
    y = m(xt)
    assert type(y) is torch.Tensor and y.shape == xt.shape and y.dtype == xt.dtype
    assert_close(y, ref.forward_train(x)[0], dtype)
    assert_close(y, tm(xt).detach().numpy(), dtype)
    assert_close(m.running_var, tm.running_var.numpy(), dtype)
    if fmt == "channels_last":
        # output has the memory layout of x: NHWC memory
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert np.moveaxis(y.numpy(), 1, -1).flags.c_contiguous
    else:
        assert y.is_contiguous()
    m.eval()
    tm.eval()
    ye = m(xt)
    assert type(ye) is torch.Tensor and ye.stride() == tm(xt).stride()
    assert_close(ye, tm(xt).detach().numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@needs_torch
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


@needs_torch
def test_non_contiguous_tensor_is_copied_not_misread(rng):
    base = logical_data(rng, (4, 6, 8, 10)).astype(np.float32)
    xt = T(base)[:, ::2, 1::3, :]          # strided: not a zero-copy layout
    x = xt.numpy()
    m = bn.BatchNorm2d(3)
    assert_close(m(xt), ref.forward_train(x)[0], np.float32)
    xt2 = T(base).transpose(2, 3)          # a non-contiguous permutation
    assert_close(bn.BatchNorm2d(6)(xt2), ref.forward_train(xt2.numpy())[0], np.float32)


@needs_torch
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


@needs_torch
def test_float64_tensor_into_float32_module_is_type_error(rng):
    m = bn.BatchNorm1d(3)
    with pytest.raises(TypeError, match=r"(\bx\b|\binput\b)"):
        m(torch.randn(4, 3, dtype=torch.float64))
    assert int(m.num_batches_tracked) == 0


@needs_torch
def test_integer_tensor_is_type_error():
    with pytest.raises(TypeError):
        bn.batch_norm_stats(torch.ones(4, 3, dtype=torch.int32))


@needs_torch
def test_stats_on_tensor_matches_torch_var_mean(rng):
    x = logical_data(rng, (6, 4, 9), offset=3).astype(np.float64)
    mean, var = bn.batch_norm_stats(T(x))
    tv, tm = torch.var_mean(T(x), dim=(0, 2), unbiased=False)
    assert_close(mean, tm.numpy(), np.float64, scale=6)
    assert_close(var, tv.numpy(), np.float64)


# ---------------------------------------------------------------- results of the caller's kind


class Recorder:
    """Wraps a _core entry point and keeps what it returned (to compare data pointers)."""

    def __init__(self, fn):
        self.fn, self.results = fn, []

    def __call__(self, *args):
        result = self.fn(*args)
        self.results.append(result)
        return result


@pytest.fixture
def recorded(monkeypatch):
    """The NumPy arrays _core returns, per entry point, for the functional API and modules."""
    recs = {name: Recorder(getattr(F, name)) for name in
            ("_forward_train", "_forward_eval", "_stats", "_backward")}
    for name, rec in recs.items():
        monkeypatch.setattr(F, name, rec)
        if hasattr(M, name):
            monkeypatch.setattr(M, name, rec)
    return recs


def numpy_written(result):
    """The first array in what a _core call returned (y or grad_x, or mean for stats)."""
    return result[0] if isinstance(result, tuple) else result


@needs_torch
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional_returns_zero_copy_tensor(recorded, fmt, training, dtype, rng):
    x = logical_data(rng, (4, 6, 5, 3)).astype(dtype)
    xt = T(x, torch.channels_last if fmt == "channels_last" else None)
    rm, rv = torch.from_numpy(rng.normal(size=6).astype(dtype)), torch.from_numpy(
        rng.uniform(0.5, 2, 6).astype(dtype))
    w, b = (torch.from_numpy(p.astype(dtype)) for p in (rng.normal(size=6), rng.normal(size=6)))
    trm, trv = rm.clone(), rv.clone()
    y = bn.batch_norm(xt, rm, rv, w, b, training=training, momentum=0.3)
    expected = torch.nn.functional.batch_norm(xt, trm, trv, w, b, training, 0.3, 1e-5)
    assert type(y) is torch.Tensor and y.dtype == xt.dtype and y.shape == xt.shape
    assert y.stride() == expected.stride() == xt.stride()  # the memory format is kept
    assert_close(y, expected.numpy(), dtype)
    assert_close(rm, trm.numpy(), dtype)
    assert_close(rv, trv.numpy(), dtype)
    (written,) = recorded["_forward_train" if training else "_forward_eval"].results
    written = numpy_written(written)
    assert type(written) is np.ndarray
    assert ptr(y) == ptr(written)  # a view of the array _core wrote: no copy
    written.flat[0] = 123.0  # first element in memory is element (0, 0, 0, 0) in any format
    assert float(y[0, 0, 0, 0]) == 123.0


@needs_torch
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_module_returns_zero_copy_tensor_and_grad(recorded, fmt, rng):
    x = logical_data(rng, (3, 5, 4, 4)).astype(np.float32)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    xt = T(x, memory_format)
    m = bn.BatchNorm2d(5)
    y = m(xt)
    assert type(y) is torch.Tensor and y.is_contiguous(memory_format=memory_format)
    assert ptr(y) == ptr(numpy_written(recorded["_forward_train"].results[-1]))
    gy = T(rng.standard_normal(x.shape).astype(np.float32), memory_format)
    gx = m.backward(gy)
    assert type(gx) is torch.Tensor and gx.is_contiguous(memory_format=memory_format)
    assert ptr(gx) == ptr(numpy_written(recorded["_backward"].results[-1]))
    assert type(m.weight_grad) is np.ndarray and type(m.bias_grad) is np.ndarray

    tm = torch.nn.BatchNorm2d(5)
    xr = xt.clone().requires_grad_(True)
    yr = tm(xr)
    yr.backward(gy)
    assert_close(y, yr.detach().numpy(), np.float32)
    assert_close(gx, xr.grad.numpy(), np.float32, scale=4)
    assert_close(m.weight_grad, tm.weight.grad.numpy(), np.float32, scale=30)
    assert_close(m.bias_grad, tm.bias.grad.numpy(), np.float32, scale=30)
    m.eval()
    ye = m(xt)
    assert type(ye) is torch.Tensor and ptr(ye) == ptr(recorded["_forward_eval"].results[-1])


@needs_torch
def test_stats_and_backward_return_tensors(recorded, rng):
    x = T(logical_data(rng, (6, 4, 9)).astype(np.float64))
    mean, var = bn.batch_norm_stats(x)
    assert type(mean) is torch.Tensor and type(var) is torch.Tensor
    written = recorded["_stats"].results[-1]
    assert (ptr(mean), ptr(var)) == (ptr(written[0]), ptr(written[1]))
    invstd = 1 / torch.sqrt(var + 1e-5)
    gy = torch.randn(6, 4, 9, dtype=torch.float64)
    grads = bn.batch_norm_backward(gy, x, mean, invstd)
    assert all(type(g) is torch.Tensor for g in grads)
    assert [ptr(g) for g in grads] == [ptr(a) for a in recorded["_backward"].results[-1]]
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.batch_norm(xr, None, None, training=True).backward(gy)
    assert_close(grads[0], xr.grad.numpy(), np.float64)


@needs_torch
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_out_tensor_is_returned_and_written_in_place(fmt, rng):
    x = logical_data(rng, (2, 3, 4, 5)).astype(np.float32)
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    xt = T(x, memory_format)
    rm, rv = torch.zeros(3), torch.ones(3)
    out = torch.empty_like(xt)
    address = ptr(out)
    y = bn.batch_norm(xt, rm, rv, out=out)
    assert y is out and ptr(out) == address
    assert_close(out, torch.nn.functional.batch_norm(xt, rm, rv).numpy(), np.float32)
    # in place: out is the input tensor itself
    expected = torch.nn.functional.batch_norm(xt, None, None, training=True)
    m = bn.BatchNorm2d(3)
    address = ptr(xt)
    y = m(xt, out=xt)
    assert y is xt and ptr(xt) == address
    assert_close(xt, expected.numpy(), np.float32)
    assert xt.is_contiguous(memory_format=memory_format)
    # a NumPy out for a tensor input is also returned as given
    out_np = np.empty(x.shape, np.float32)
    assert bn.batch_norm(T(x), rm, rv, out=out_np) is out_np


@needs_torch
def test_in_place_module_on_tensor_keeps_its_memory(rng):
    xt = T(logical_data(rng, (4, 3, 6)).astype(np.float64))
    address, before = ptr(xt), xt.clone()
    m = bn.BatchNorm1d(3, dtype=np.float64).eval()
    m.running_mean[:] = [1.0, 2.0, 3.0]
    y = m(xt, out=xt)
    assert y is xt and ptr(xt) == address
    assert_close(xt, (before.numpy() - m.running_mean[:, None]) / np.sqrt(1 + 1e-5), np.float64)


@needs_torch
def test_fold_returns_tensors_for_tensors(rng):
    m = bn.BatchNorm2d(4).eval()
    m.running_var[:] = rng.uniform(0.5, 2, 4)
    conv = torch.nn.Conv2d(3, 4, 3)
    w, b = bn.fold(m, conv.weight, conv.bias)
    assert type(w) is torch.Tensor and type(b) is torch.Tensor
    assert w.shape == conv.weight.shape and w.dtype == conv.weight.dtype
    wn, bnp = bn.fold(m, conv.weight.detach().numpy(), conv.bias.detach().numpy())
    assert type(wn) is np.ndarray
    np.testing.assert_array_equal(w.numpy(), wn)
    np.testing.assert_array_equal(b.numpy(), bnp)


@needs_torch
def test_parameter_input_gives_plain_tensor():
    p = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
    mean, var = bn.batch_norm_stats(p)
    assert type(mean) is torch.Tensor
    torch.testing.assert_close(mean, p.mean(0))


def test_numpy_in_numpy_out(rng):
    x = logical_data(rng, (3, 4, 5)).astype(np.float32)
    m = bn.BatchNorm1d(4)
    assert type(m(x)) is np.ndarray and type(m.backward(x)) is np.ndarray
    assert all(type(a) is np.ndarray for a in bn.batch_norm_stats(x))
    assert type(bn.batch_norm(x, None, None, training=True)) is np.ndarray


class SubArray(np.ndarray):
    pass


def test_numpy_subclass_gives_numpy(rng):
    x = logical_data(rng, (3, 4)).astype(np.float32).view(SubArray)
    y = bn.batch_norm(x, None, None, training=True)
    assert type(y) is np.ndarray
    assert_close(y, ref.forward_train(np.asarray(x))[0], np.float32)


class Producer:
    """A bare DLPack producer (no NumPy protocols): only __dlpack__ and __dlpack_device__."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class Namespace:
    """A minimal Array API namespace: from_dlpack wraps the result in an ApiArray."""

    calls = 0

    @classmethod
    def from_dlpack(cls, x):
        cls.calls += 1
        return ApiArray(np.from_dlpack(x))


class ApiArray(Producer):
    def __array_namespace__(self, api_version=None):
        return Namespace


def test_bare_dlpack_producer_is_read_in_place_and_gives_numpy(rng):
    x = logical_data(rng, (5, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = bn.batch_norm(Producer(x), Producer(rm), Producer(rv), training=True)
    assert type(y) is np.ndarray  # unknown kind: the NumPy array itself
    assert_close(y, ref.forward_train(x)[0], np.float32)
    mean, var = ref.stats(x)
    assert_close(rm, 0.1 * mean, np.float32)  # running stats updated in the producer's memory
    # out= through a producer: written in place and returned as given
    target = np.empty_like(x)
    out = Producer(target)
    assert bn.batch_norm(Producer(x), rm, rv, out=out) is out
    assert_close(target, (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5), np.float32)


def test_array_api_producer_gets_its_own_kind_back(recorded, rng):
    x = logical_data(rng, (4, 3, 5)).astype(np.float64)
    before = Namespace.calls
    y = bn.BatchNorm1d(3, dtype=np.float64)(ApiArray(x))
    assert type(y) is ApiArray and Namespace.calls == before + 1
    written = numpy_written(recorded["_forward_train"].results[-1])
    assert ptr(y._array) == ptr(written)
    assert_close(y._array, ref.forward_train(x)[0], np.float64)


def test_jax_arrays_round_trip(rng):
    jnp = pytest.importorskip("jax.numpy")
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    y = bn.batch_norm(jnp.asarray(x), None, None, training=True)
    assert type(y).__module__.split(".")[0] in ("jax", "jaxlib")
    assert_close(np.asarray(y), ref.forward_train(x)[0], np.float32)
