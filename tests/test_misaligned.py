"""Arrays at addresses that are not a multiple of their element size (a slice of a byte
buffer, ``np.frombuffer(..., offset=1)``, ``torch.frombuffer``) are accepted as inputs and as
outputs, with the results of aligned arrays. The suite runs under every BATCHNORM_ISA."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm.functional as F
from batchnorm import _core
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, logical_data, rand_params


def misaligned(a, channels_last=False):
    """A writable copy of ``a`` one byte past an aligned address (channels-last on request)."""
    dense = np.moveaxis(a, 1, -1) if channels_last else a
    buf = np.zeros(dense.nbytes + 1, np.uint8)
    m = buf[1:].view(a.dtype).reshape(dense.shape)
    m[...] = dense
    assert not m.flags.aligned
    return np.moveaxis(m, -1, 1) if channels_last else m


def byte_strided(v):
    """A 1-D copy of ``v`` whose stride is not a whole number of elements."""
    item = v.dtype.itemsize
    buf = np.zeros(v.size * (item + 1), np.uint8)
    s = np.lib.stride_tricks.as_strided(buf[:item].view(v.dtype),
                                        shape=v.shape, strides=(item + 1,), writeable=True)
    s[...] = v
    assert not s.flags.aligned
    return s


cases = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)


@dtypes
@cases
def test_stats(rng, dtype, channels_last):
    x = logical_data(rng, (4, 5, 3, 7)).astype(dtype)
    mean, var = F.batch_norm_stats(misaligned(x, channels_last))
    ref_mean, ref_var = ref.stats(x)
    assert_close(mean, ref_mean, dtype)
    assert_close(var, ref_var, dtype)


@dtypes
@cases
def test_forward_train_updates_misaligned_running_stats_and_out(rng, dtype, channels_last):
    x = logical_data(rng, (4, 5, 3, 7)).astype(dtype)
    w, b = rand_params(rng, 5, dtype)
    rm, rv = rng.standard_normal(5).astype(dtype), rng.uniform(0.5, 2, 5).astype(dtype)
    mrm, mrv = misaligned(rm[None])[0], byte_strided(rv)
    out = misaligned(np.zeros_like(x), channels_last)
    y = F.batch_norm(misaligned(x, channels_last), mrm, mrv, byte_strided(w), misaligned(b[None])[0],
                     training=True, momentum=0.3, out=out)
    ref_y, _, _, ref_rm, ref_rv = ref.forward_train(x, w, b, rm, rv, momentum=0.3)
    assert y is out
    assert_close(out, ref_y, dtype)
    assert_close(mrm, ref_rm, dtype)
    assert_close(mrv, ref_rv, dtype)


@dtypes
@cases
def test_forward_eval_fused(rng, dtype, channels_last):
    x = logical_data(rng, (3, 4, 6)).astype(dtype)
    r = rng.standard_normal(x.shape).astype(dtype)
    mean, var = rng.standard_normal(4).astype(dtype), rng.uniform(0.5, 2, 4).astype(dtype)
    w, b = rand_params(rng, 4, dtype)
    y = F.batch_norm(misaligned(x, channels_last), byte_strided(mean), misaligned(var[None])[0], w, b,
                     residual=misaligned(r, channels_last), activation="relu")
    assert_close(y, ref.fused_eval(x, mean, var, w, b, residual=r, activation="relu"), dtype)


@dtypes
def test_in_place_on_misaligned_input(rng, dtype):
    x = logical_data(rng, (6, 3, 5)).astype(dtype)
    mx = misaligned(x)
    mean, var = rng.standard_normal(3).astype(dtype), rng.uniform(0.5, 2, 3).astype(dtype)
    assert F.batch_norm(mx, mean, var, out=mx) is mx
    assert_close(mx, ref.forward_eval(x, mean, var), dtype)


@dtypes
@cases
def test_backward(rng, dtype, channels_last):
    x = logical_data(rng, (4, 3, 5, 2)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    w, _ = rand_params(rng, 3, dtype)
    mean, var = ref.stats(x)
    invstd = (1 / np.sqrt(var + 1e-5)).astype(dtype)
    mean = mean.astype(dtype)
    out = misaligned(np.zeros_like(x), channels_last)
    args = (misaligned(gy, channels_last), misaligned(x, channels_last), byte_strided(mean),
            misaligned(invstd[None])[0], byte_strided(w))
    ref_gx, ref_gw, ref_gb = ref.backward_train(gy, x, mean, invstd, w)
    for gx, gw, gb in (F.batch_norm_backward(*args), _core.backward(*args, 1, True, out)):
        assert_close(gx, ref_gx, dtype)
        assert_close(gw, ref_gw, dtype, scale=x.size)
        assert_close(gb, ref_gb, dtype, scale=x.size)
    assert gx is out  # the modules' backward writes into an `out` (the core's argument)


def test_read_only_frombuffer_input(rng):
    x = logical_data(rng, (4, 3)).astype(np.float32)
    data = np.frombuffer(b"\0" + x.tobytes(), np.float32, offset=1).reshape(x.shape)
    assert not data.flags.aligned and not data.flags.writeable
    assert_close(F.batch_norm(data, None, None, training=True), ref.forward_train(x)[0], np.float32)


def test_read_only_misaligned_out_is_refused_naming_out(rng):
    x = logical_data(rng, (4, 3)).astype(np.float32)
    out = np.frombuffer(b"\0" + x.tobytes(), np.float32, offset=1).reshape(x.shape)
    with pytest.raises(ValueError, match="out is read-only"):
        F.batch_norm(x, None, None, training=True, out=out)


def test_misaligned_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    buf = bytearray(b"\0" + x.tobytes())
    t = torch.frombuffer(buf, dtype=torch.float32, offset=1).reshape(x.shape)
    assert t.data_ptr() % 4 != 0
    y = F.batch_norm(t, None, None, training=True)
    assert isinstance(y, torch.Tensor)
    assert_close(y.numpy(), ref.forward_train(x)[0], np.float32)
    F.batch_norm(t, None, None, training=True, out=t)  # written through to the buffer
    assert_close(np.frombuffer(bytes(buf[1:]), np.float32).reshape(x.shape), ref.forward_train(x)[0], np.float32)


def _overlapping_at(offset, *sizes):
    """Float32 arrays of ``sizes`` elements cut from one byte buffer, each 4 bytes past the
    previous one's start (so each overlaps the next), the first ``offset`` bytes in."""
    buf = np.zeros(offset + 4 * len(sizes) + 4 * max(sizes), np.uint8)
    return [buf[offset + 4 * i:offset + 4 * i + 4 * n].view(np.float32) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_overlapping_running_stats_are_refused_at_any_offset(rng, offset):
    """The overlap checks look at the caller's memory, not at the aligned copy a misaligned
    array is read through (whose write-back would clobber the other array)."""
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    rm, rv = _overlapping_at(offset, 3, 3)
    rm[:], rv[-1] = 0.0, 1.0
    before = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="^running_mean overlaps running_var; pass separate arrays$"):
        F.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("name", ["weight", "running_mean"])
def test_out_overlapping_a_channel_array_is_refused_at_any_offset(rng, offset, name):
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    flat, channel = _overlapping_at(offset, x.size, 3)
    out = flat.reshape(x.shape)
    channel[:] = 0.5
    kept = channel.copy()
    args = {"weight": (np.zeros(3, np.float32), np.ones(3, np.float32), channel),
            "running_mean": (channel, np.ones(3, np.float32), None)}[name]
    with pytest.raises(ValueError, match=f"^out overlaps {name}; pass a separate array$"):
        F.batch_norm(x, *args, training=True, out=out)
    np.testing.assert_array_equal(channel, kept)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_interleaved_running_stats_are_separate_arrays(rng, offset):
    """x[0::2] and x[1::2] share no element (np.shares_memory is False; torch takes them):
    each is updated as if it were on its own, at aligned and misaligned addresses."""
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    buf = np.zeros(offset + 4 * 6, np.uint8)
    both = buf[offset:].view(np.float32)
    rm, rv = both[0::2], both[1::2]
    rm[:], rv[:] = 0.25, 2.0
    assert not np.shares_memory(rm, rv)
    y = F.batch_norm(x, rm, rv, training=True, momentum=0.3)
    ref_y, _, _, ref_rm, ref_rv = ref.forward_train(x, None, None, np.full(3, 0.25), np.full(3, 2.0), momentum=0.3)
    assert_close(y, ref_y, np.float32)
    assert_close(rm, ref_rm, np.float32)
    assert_close(rv, ref_rv, np.float32)


def test_interleaved_out_and_input_are_separate_arrays(rng):
    """out= the odd elements of a buffer whose even elements are x: no shared element, so the
    result is x's normalization and x is left as it was."""
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    both = np.zeros(x.shape + (2,), np.float32)
    both[..., 0] = x
    mean, var = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    y = F.batch_norm(both[..., 0], mean, var, out=both[..., 1])
    assert y.base is both
    assert_close(both[..., 1], ref.forward_eval(x, mean, var), np.float32)
    np.testing.assert_array_equal(both[..., 0], x)


def test_overlap_of_arrays_whose_elements_meet_between_strides(rng):
    """Interleaved arrays whose elements are wider than the gap between them do overlap:
    float32 elements 2 bytes apart in a 4-byte-strided buffer (the gcd test must not pass them)."""
    x = logical_data(rng, (4, 3, 5)).astype(np.float32)
    buf = np.zeros(64, np.uint8)
    rm = np.lib.stride_tricks.as_strided(buf[0:4].view(np.float32), shape=(3,), strides=(8,), writeable=True)
    rv = np.lib.stride_tricks.as_strided(buf[2:6].view(np.float32), shape=(3,), strides=(8,), writeable=True)
    assert np.shares_memory(rm, rv)
    with pytest.raises(ValueError, match="running_mean overlaps running_var"):
        F.batch_norm(x, rm, rv, training=True)
