"""Where new outputs live: arrays of 1 KiB or more start on a 64-byte cache line (as torch's
allocator places every tensor) inside memory NumPy allocated, from 256 KiB at their input's
offset within a page (rounded down to a line), smaller ones are NumPy's own, and either is freed
with its last reference. The suite runs under every BATCHNORM_ISA."""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest

from batchnorm import _core
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, logical_data, rand_params

CACHE_LINE = 64
PAGE = 4096
ALIGNED_FROM = 1024  # bytes


def outputs_of(x, w, b):
    """Every array the entry points make for input x: (name, array)."""
    c = x.shape[1]
    rm, rv = np.zeros(c, w.dtype), np.ones(c, w.dtype)
    y, mean, invstd = _core.forward_train(x, w, b, rm, rv, 0.1, 1e-5, 1, None)
    grads = _core.backward(np.ones_like(x), x, mean, invstd, w, 1, True, None)
    return ([("forward_train y", y), ("mean", mean), ("invstd", invstd),
             ("forward_eval y", _core.forward_eval(x, rm, rv, w, b, 1e-5, 1, None, None, False)),
             ("grad_x", grads[0]), ("grad_weight", grads[1]), ("grad_bias", grads[2])],
            y)


@pytest.mark.parametrize("dtype", DTYPES + [np.float16], ids=DTYPE_IDS + ["f16"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 64, 7, 7), (2, 300, 9)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_new_outputs_of_a_kilobyte_start_on_a_cache_line(rng, dtype, shape, channels_last):
    x64 = logical_data(rng, shape)
    x = x64.astype(dtype)
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    w, b = rand_params(rng, shape[1], np.float32 if dtype == np.float16 else dtype)
    arrays, y = outputs_of(x, w, b)
    for name, a in arrays:
        if a.nbytes >= ALIGNED_FROM:
            assert a.ctypes.data % CACHE_LINE == 0, (name, a.ctypes.data % CACHE_LINE)
        assert a.flags.writeable, name
        memory = a if a.base is None else a.base  # NumPy's allocation: its huge pages, its accounting
        assert isinstance(memory, np.ndarray) and memory.flags.owndata, name
    assert y.strides == x.strides  # the input's memory layout, on the new memory
    expected = ref.forward_train(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))[0]
    if dtype == np.float16:  # float32 math, one rounding to float16 at the store
        np.testing.assert_allclose(y.astype(np.float64), expected, rtol=2 ** -10, atol=2 ** -14)
    else:
        assert_close(y, expected, dtype)


def at_page_offset(shape, offset):
    """A float32 array of `shape` starting `offset` bytes past a page, filled with 0.5."""
    count = int(np.prod(shape))
    memory = np.empty(count * 4 + 2 * PAGE, np.uint8)
    start = (-memory.ctypes.data) % PAGE + offset
    a = memory[start:start + count * 4].view(np.float32).reshape(shape)
    a[...] = 0.5
    return a


@pytest.mark.parametrize("offset", [0, 16, 64, 200, 4080])
def test_large_outputs_start_at_their_inputs_offset_in_a_page(offset):
    """From 256 KiB, a new output starts at its input's offset within a page rounded down to a
    line (a few lines ahead in the low address bits, the loads waited on the stores); below
    that, on the next line."""
    x = at_page_offset((2, 64, 32, 32), offset)  # 512 KiB
    rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
    y = _core.forward_eval(x, rm, rv, None, None, 1e-5, 1, None, None, False)
    gy = at_page_offset(x.shape, offset)
    grad_x = _core.backward(gy, x, rm, rv, None, 1, True, None)[0]
    for out in (y, grad_x, _core.forward_train(x, None, None, None, None, 0.1, 1e-5, 1, None)[0]):
        assert out.ctypes.data % PAGE == offset // CACHE_LINE * CACHE_LINE
    np.testing.assert_array_equal(y, np.float32(0.5 / np.sqrt(1 + 1e-5)))
    small = _core.forward_eval(x[:1, :8], rm[:8], rv[:8], None, None, 1e-5, 1, None, None, False)  # 32 KiB
    assert small.ctypes.data % CACHE_LINE == 0


def test_the_torch_drop_in_hands_the_aligned_memory_over():
    torch = pytest.importorskip("torch")
    import batchnorm.torch as bnt

    x = torch.randn(4, 64, 7, 7, requires_grad=True)
    layer = bnt.BatchNorm2d(64)
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert y.data_ptr() % CACHE_LINE == 0 and x.grad.data_ptr() % CACHE_LINE == 0
    expected = torch.nn.functional.batch_norm(x.detach(), None, None, layer.weight.detach(), layer.bias.detach(),
                                              training=True)
    assert torch.allclose(y.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_outputs_are_freed_with_their_last_reference():
    """400 outputs of 8 MiB, each dropped before the next: a leak would hold 3 GiB."""
    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    x = np.ones((16, 128, 32, 32), np.float32)  # 8 MiB
    rm, rv = np.zeros(128, np.float32), np.ones(128, np.float32)
    _core.forward_eval(x, rm, rv, None, None, 1e-5, 1, None, None, False)
    gc.collect()
    before = resident_bytes()
    for _ in range(400):
        y = _core.forward_eval(x, rm, rv, None, None, 1e-5, 1, None, None, False)
        assert y[0, 0, 0, 0] == np.float32(1 / np.sqrt(1 + 1e-5))
        del y
    assert resident_bytes() - before < 256 << 20
