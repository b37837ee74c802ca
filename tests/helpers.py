"""Shared test helpers: tolerances, input layouts, state snapshots.

Tolerances (justified by the floating-point format, never tuned to make a test pass):

* float32 element-wise outputs of magnitude O(1): ``rtol = atol = 1e-5``.  float32 has
  eps = 1.19e-7; a correctly implemented normalization has a few ulps of rounding
  (~5e-7 at |y| ~ 4), so 1e-5 leaves a factor ~20 of headroom and still catches any
  real mistake (wrong channel, wrong variance, wrong eps, ...).
* float64: ``rtol = atol = 1e-12`` (eps = 2.2e-16, so ~4500 ulps of headroom).
* per-channel reductions (sums over n elements, e.g. grad_weight, grad_bias, sums inside
  the statistics): the error bound of a sum is proportional to the sum of absolute
  values of its terms, so the tolerance is ``rtol * sum(|terms|)`` with the same rtol.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
ATOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def tol(dtype):
    d = np.dtype(dtype)
    return dict(rtol=RTOL[d], atol=ATOL[d])


def assert_close(actual, expected, dtype, scale=1.0, err_msg=""):
    """Element-wise check with the dtype's tolerances; ``scale`` multiplies atol (use the
    magnitude of the quantity when it is not O(1))."""
    d = np.dtype(dtype)
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=RTOL[d],
                               atol=ATOL[d] * max(1.0, float(scale)), err_msg=err_msg)


def assert_close_sum(actual, expected, abs_sum, dtype, err_msg=""):
    """Check a per-channel reduction: |actual - expected| <= rtol * (sum|terms| + 1)."""
    d = np.dtype(dtype)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape, err_msg)
    bound = RTOL[d] * (np.asarray(abs_sum, dtype=np.float64) + 1.0)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{err_msg}: reduction mismatch at {np.flatnonzero(bad)[:10]}: "
        f"actual {actual[bad][:5]}, expected {expected[bad][:5]}, bound {bound[bad][:5]}")


# --------------------------------------------------------------------------- inputs

LAYOUTS = ["contiguous", "channels_last", "cl_view", "axis2", "axis0", "strided",
           "reversed", "fortran"]


def logical_data(rng, shape, offset=0.0, std=1.0):
    """float64 data of logical shape (N, C, *S) with distinct per-channel mean/scale."""
    c = shape[1]
    shift = rng.uniform(-2.0, 2.0, size=c)
    scale = rng.uniform(0.5, 2.0, size=c)
    bs = [1] * len(shape)
    bs[1] = c
    return (offset + std * (rng.standard_normal(shape) * scale.reshape(bs)
                            + shift.reshape(bs)))


def arrange(logical, dtype, layout):
    """Place logical (N, C, *S) float64 data into ``layout``; return (x, axis).

    The values the reference sees are exactly those of ``x`` along ``axis``.
    """
    nd = logical.ndim
    if layout == "contiguous":
        return np.ascontiguousarray(logical.astype(dtype)), 1
    if layout == "channels_last":          # NLC / NHWC / NDHWC memory, axis=-1
        return np.ascontiguousarray(np.moveaxis(logical, 1, -1).astype(dtype)), -1
    if layout == "cl_view":                # logical NCHW view of NHWC memory (zero-copy)
        base = np.ascontiguousarray(np.moveaxis(logical, 1, -1).astype(dtype))
        return np.moveaxis(base, -1, 1), 1
    if layout == "axis2":                  # channel axis 2 (rank >= 3)
        assert nd >= 3
        return np.ascontiguousarray(np.moveaxis(logical, 1, 2).astype(dtype)), 2
    if layout == "axis0":                  # channel axis 0
        return np.ascontiguousarray(np.moveaxis(logical, 1, 0).astype(dtype)), 0
    if layout == "strided":                # every other element along every axis
        big = np.full(tuple(2 * s for s in logical.shape), 12345.0, dtype=dtype)
        view = big[(slice(None, None, 2),) * nd]
        view[...] = logical
        return view, 1
    if layout == "reversed":               # negative strides on the first and last axis
        idx = [slice(None)] * nd
        idx[0] = slice(None, None, -1)
        idx[-1] = slice(None, None, -1)
        idx = tuple(idx)
        base = np.ascontiguousarray(logical[idx].astype(dtype))
        return base[idx], 1
    if layout == "fortran":                # all axes reversed in memory
        return np.asfortranarray(logical.astype(dtype)), 1
    raise ValueError(layout)


def layout_ok(layout, ndim):
    return not (layout == "axis2" and ndim < 3)


def make_input(rng, shape, dtype, layout="contiguous", offset=0.0, std=1.0):
    return arrange(logical_data(rng, shape, offset, std), dtype, layout)

# Shapes whose transposing copies leave partial tiles on both axes (python/src/arrays.hpp).
TRANSPOSE_SHAPES = [(3, 37, 5, 7), (2, 40, 17, 16), (70, 33)]


def in_other_memory_order(rng, shape, x, axis, dtype):
    """Random data of x's shape in the other memory order than x: Fortran order beside a
    C-ordered (N, C) x, NCHW memory beside x's channels-last memory (either view of it).
    ``shape`` is the logical (N, C, ...) shape x was made from."""
    if len(shape) == 2:
        other = np.asfortranarray(rng.standard_normal(shape).astype(dtype))
    else:
        other = np.ascontiguousarray(rng.standard_normal(shape).astype(dtype))  # NCHW memory
        if axis % x.ndim != 1:  # x is channels-last: the same logical shape, still NCHW memory
            other = np.moveaxis(other, 1, -1)
    assert other.shape == x.shape and other.strides != x.strides
    return other


def channels(x, axis):
    return x.shape[axis % x.ndim]


def rand_params(rng, c, dtype):
    w = rng.uniform(0.5, 1.5, size=c) * rng.choice([-1.0, 1.0], size=c)
    b = rng.uniform(-1.0, 1.0, size=c)
    return w.astype(dtype), b.astype(dtype)


# --------------------------------------------------------------------------- state

MODULE_ATTRS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                "weight_grad", "bias_grad")


def _freeze(v):
    if v is None:
        return None
    if isinstance(v, (bool, int, float, str)):
        return ("scalar", v)
    a = np.asarray(v)
    return ("array", a.dtype.str, a.shape, a.tobytes())


def snapshot(*objs):
    """Bit-exact snapshot of arrays and of every stateful attribute of modules."""
    snap = []
    for o in objs:
        if isinstance(o, np.ndarray):
            snap.append(("nd", _freeze(o)))
        elif hasattr(o, "running_mean") or hasattr(o, "weight"):
            state = {a: _freeze(getattr(o, a, None)) for a in MODULE_ATTRS}
            state["training"] = getattr(o, "training", None)
            snap.append(("mod", state))
        else:
            snap.append(("other", _freeze(o)))
    return snap


def assert_unchanged(snap, *objs):
    now = snapshot(*objs)
    assert len(now) == len(snap)
    for i, (a, b) in enumerate(zip(snap, now)):
        if a[0] == "mod":
            for k in a[1]:
                assert a[1][k] == b[1][k], f"object #{i}: attribute {k!r} changed by a failed call"
        else:
            assert a == b, f"object #{i} changed by a failed call"


# --------------------------------------------------------------------------- shapes

# C and spatial sizes 1, 3, 17, 33 (none a multiple of a vector width), N=1 with spatial > 1
SHAPES = [
    (5, 1), (4, 3), (7, 17), (2, 33),
    (3, 17, 33), (1, 3, 17), (2, 33, 1), (4, 1, 33),
    (2, 3, 17, 33), (1, 17, 3, 3), (3, 33, 1, 1), (2, 1, 17, 17), (4, 3, 33, 17),
    (2, 3, 3, 17, 1), (1, 17, 3, 3, 3), (2, 33, 1, 3, 17), (2, 1, 3, 3, 33),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def module_cls(ndim):
    """The batchnorm module class for an input rank (1d takes (N,C) and (N,C,L))."""
    import batchnorm as bn
    return {2: bn.BatchNorm1d, 3: bn.BatchNorm1d, 4: bn.BatchNorm2d, 5: bn.BatchNorm3d}[ndim]


def torch_cls(torch, ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[ndim]


def same_random_params(rng, m, tm, dtype):
    """Give a batchnorm module and a torch module the same random weight and bias."""
    import torch

    w, b = rand_params(rng, m.num_features, dtype)
    m.weight[:] = w
    m.bias[:] = b
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(w))
        tm.bias.copy_(torch.from_numpy(b))


def last_two_swapped(t):
    """A torch tensor's values in memory with its last two dimensions swapped: a dense order
    that is neither contiguous nor channels_last (a transposed (N, L, C) sequence for a 3-D
    tensor), whose output torch's norms make contiguous."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def torch_dtype(torch, dtype):
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


# Page ends (test_page_end.py, test_half.py): sizes with every tail length of 4, 8 and 16 lanes,
# some after whole vectors, and (shape, axis) pairs putting the tail in a plane (channels-first)
# and across the channels (channels-last).
TAILS = [1, 3, 5, 7, 9, 13, 15, 17, 23, 31]


def page_end_layouts(size):
    """Shapes whose arrays end at a page end with a tail of `size` values: channels-first runs,
    channels, and channels-last rows (33 of them: with 3 channels the first 32 are read several
    to a vector, kernels/kernel_bodies.inl: fold_rows, and the last alone)."""
    return [((2, 3, size), 1), ((3, size, 1), 1), ((2, 5, size), -1), ((3, 11, size), -1)]


class PageEnd:
    """Owns mmaps whose arrays end at the first byte of a PROT_NONE page."""

    def __init__(self):
        self.maps = []
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def place(self, a):
        """A copy of ``a`` (C order) whose last byte is the last byte before a guard page."""
        page = mmap.PAGESIZE
        pages = -(-a.nbytes // page) + 1
        buf = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        guard = base + (pages - 1) * page
        if self.libc.mprotect(guard, page, 0) != 0:  # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect(PROT_NONE) failed")
        self.maps.append((buf, guard, page))
        placed = np.frombuffer(buf, a.dtype, count=a.size, offset=(pages - 1) * page - a.nbytes)
        placed = placed.reshape(a.shape)
        placed[...] = a
        assert placed.ctypes.data + placed.nbytes == guard
        return placed

    def close(self):
        for buf, guard, page in self.maps:
            self.libc.mprotect(guard, page, mmap.PROT_READ | mmap.PROT_WRITE)
        self.maps.clear()  # the buffers go with their last array


def error_of(call):
    """The type name and message of the exception ``call`` raises (RuntimeError or TypeError,
    as torch raises), or None: for comparing a drop-in's error with torch's."""
    try:
        call()
    except (RuntimeError, TypeError) as error:
        return type(error).__name__, str(error)
    return None
