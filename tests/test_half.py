"""Half-precision storage (float16, bfloat16): inputs, outputs, residuals and gradients in a half
type, weight, bias and statistics in float32, math in float32 lanes.

Outputs must be within 1 ulp (of the half type) of the float64 result computed on the same
upcast input (tests/reference.py), plus what float32 math costs where the terms of a result
cancel (a few float32 roundings of the terms' magnitude: that is below a half ulp unless the
result is far smaller than its terms); statistics as accurate as for float32 input. Run under every
ISA (BATCHNORM_ISA=scalar|avx2|avx512|avx512_bf16) and, through the ``threads`` fixture, 1 and 2 threads.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import TAILS, assert_unchanged, page_end_layouts, snapshot

ml_dtypes = pytest.importorskip("ml_dtypes")

HALF = [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
HALF_IDS = ["float16", "bfloat16"]
# (mantissa bits with the implicit one, smallest normal exponent, largest mean the tests use)
FORMAT = {"float16": (11, -14, 1e4), "bfloat16": (8, -126, 1e6)}

# Shapes for NCHW (channels-first kernels), small planes (rows), NC and channels-last; the big
# ones move more than 2 MiB, so two threads really split them. Channels-last rows of 3, 4 and 6
# channels are read several rows to a vector (kernel_bodies.inl: fold_rows), with rows left
# over per call and per thread.
SHAPES = [(4, 3, 17, 33), (2, 5, 3, 3), (37, 19), (8, 16, 64, 65), (64, 40, 33), (3, 6, 7, 9), (15, 4, 63, 65)]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def ulp(values, dtype):
    """Spacing of ``dtype`` at each |value| (the subnormal spacing below the normal range)."""
    bits, emin, _ = FORMAT[np.dtype(dtype).name]
    v = np.abs(np.asarray(values, np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(v > 0, v, 1.0)))
    return np.exp2(np.maximum(e, emin) - (bits - 1))


F32_U = 2.0**-24


def assert_within_ulp(actual, expected, dtype, terms=None, n=1.0):
    """|actual - expected| <= n ulp of dtype at expected, plus 8 float32 roundings of ``terms``
    (the magnitude of the terms that sum to expected; default |expected|)."""
    got = np.asarray(actual).astype(np.float64)
    want = np.asarray(expected, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want)
    mag = np.abs(want) if terms is None else np.asarray(terms, np.float64)
    bound = n * ulp(want, dtype) + 8 * F32_U * mag
    worst = np.argmax(err - bound) if err.size else 0
    assert np.all(err <= bound), (
        f"{np.count_nonzero(err > bound)} of {err.size} values off by more than {n} ulp; worst: "
        f"got {got.flat[worst]!r}, float64 {want.flat[worst]!r}")


def saved_stats(x, axis):
    """The float32 mean and invstd a training forward saves for x (float64, then rounded)."""
    mean, var = ref.stats(x.astype(np.float64), axis)
    return mean.astype(np.float32), (1 / np.sqrt(var + 1e-5)).astype(np.float32)


def assert_grad_x_within_ulp(gx, gy, x, mean, invstd, w, axis, dtype):
    """grad_x within 1 ulp of the float64 backward, plus float32 roundings of its terms
    (k * (gy - mean(gy) - xmu * m)); returns the float64 grad_weight and grad_bias."""
    gy64, x64 = gy.astype(np.float64), x.astype(np.float64)
    gx64, gw64, gb64 = ref.backward_train(gy64, x64, mean, invstd, w, axis)
    n = x.size // x.shape[axis]
    k = ref.bshape(w.astype(np.float64) * invstd, x.ndim, axis)
    xmu = x64 - ref.bshape(mean.astype(np.float64), x.ndim, axis)
    m = ref.bshape(invstd.astype(np.float64) ** 2 * gw64 / invstd / n, x.ndim, axis)
    terms = np.abs(k) * (np.abs(gy64) + np.abs(ref.bshape(gb64 / n, x.ndim, axis)) + np.abs(xmu * m))
    assert_within_ulp(gx, gx64, dtype, terms)
    return gw64, gb64


def half_input(rng, shape, dtype, offset=0.0, std=1.0, axis=1):
    x = (rng.standard_normal(shape) * std + offset).astype(dtype)
    if axis == -1:  # channels-last memory: C contiguous
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    return x


def params(rng, c):
    w = (rng.standard_normal(c) * 0.5 + 1).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm = rng.standard_normal(c).astype(np.float32)
    rv = (rng.random(c) + 0.5).astype(np.float32)
    return w, b, rm, rv


@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_forward_train(dtype, shape, axis, rng, threads):
    x = half_input(rng, shape, dtype, offset=3.0, std=2.0, axis=axis)
    c = x.shape[axis]
    w, b, rm, rv = params(rng, c)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    y64, mean, invstd, new_rm, new_rv = ref.forward_train(x.astype(np.float64), w, b, rm0, rv0, 0.1, 1e-5, axis)
    bb = ref.bshape(b.astype(np.float64), x.ndim, axis)
    assert_within_ulp(y, y64, dtype, np.abs(y64 - bb) + np.abs(bb))
    assert rm.dtype == rv.dtype == np.float32
    np.testing.assert_allclose(rm, new_rm, rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(rv, new_rv, rtol=2e-7, atol=1e-7)
    m, v = bn.batch_norm_stats(x, axis=axis)
    assert m.dtype == v.dtype == np.float32
    np.testing.assert_allclose(m, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1 / np.sqrt(v + 1e-5), invstd, rtol=1e-6)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
def test_statistics_at_large_mean(dtype, axis, rng, threads):
    """float32's targets (variance relative error 1e-6, mean to float32 precision) at a mean of
    1e4 for float16 and 1e6 for bfloat16, with a spread each format can hold."""
    _, _, offset = FORMAT[dtype.name]
    x = half_input(rng, (16, 8, 64, 64), dtype, offset=offset, std=offset / 50, axis=axis)
    mean, var = ref.stats(x.astype(np.float64), axis)
    m, v = bn.batch_norm_stats(x, axis=axis)
    np.testing.assert_allclose(v, var, rtol=1e-6)
    np.testing.assert_allclose(m, mean, rtol=1e-7)
    y = bn.batch_norm(x, None, None, training=True, axis=axis)
    assert_within_ulp(y, ref.forward_train(x.astype(np.float64), axis=axis)[0], dtype)  # no bias: no cancelling


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_eval_residual_relu(dtype, shape, axis, activation, rng, threads):
    x = half_input(rng, shape, dtype, offset=1.0, axis=axis)
    r = half_input(rng, shape, dtype, axis=axis)
    w, b, rm, rv = params(rng, x.shape[axis])
    y = bn.batch_norm(x, rm, rv, w, b, residual=r, activation=activation, axis=axis)
    assert y.dtype == dtype
    x64, r64 = x.astype(np.float64), r.astype(np.float64)
    bb = ref.bshape(b.astype(np.float64), x.ndim, axis)
    normalized = ref.forward_eval(x64, rm, rv, w, b, 1e-5, axis)
    terms = np.abs(normalized - bb) + np.abs(bb)
    assert_within_ulp(y, ref.fused_eval(x64, rm, rv, w, b, 1e-5, axis, r64, activation), dtype, terms + np.abs(r64))
    out = np.empty_like(x)
    assert bn.batch_norm(x, rm, rv, w, b, axis=axis, out=out) is out
    assert_within_ulp(out, normalized, dtype, terms)


@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_backward(dtype, shape, axis, rng, threads):
    x = half_input(rng, shape, dtype, offset=2.0, axis=axis)
    gy = half_input(rng, shape, dtype, axis=axis)
    c = x.shape[axis]
    w = params(rng, c)[0]
    mean, invstd = saved_stats(x, axis)
    gx, gw, gb = bn.batch_norm_backward(gy, x, mean, invstd, w, axis=axis)
    assert gx.dtype == dtype and gw.dtype == gb.dtype == np.float32
    gw64, gb64 = assert_grad_x_within_ulp(gx, gy, x, mean, invstd, w, axis, dtype)
    n = x.size // c
    np.testing.assert_allclose(gb, gb64, rtol=1e-6, atol=1e-6 * np.sqrt(n))
    np.testing.assert_allclose(gw, gw64, rtol=1e-6, atol=1e-6 * np.sqrt(n))


@pytest.mark.parametrize("size", TAILS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_tails_at_a_page_end(dtype, size, page_end, rng, threads):
    """Half arrays ending where an unreadable page begins (test_page_end.py): the tail's loads and
    stores (16-bit lanes, narrowed in registers) touch no byte past the array."""
    for shape, axis in page_end_layouts(size):
        x = half_input(rng, shape, dtype, offset=2.0)
        c = shape[axis]
        w, b, _, _ = params(rng, c)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        y = page_end.place(np.zeros(shape, dtype))
        bn.batch_norm(page_end.place(x), rm, rv, w, b, training=True, axis=axis, out=y)
        x64 = x.astype(np.float64)
        y64 = ref.forward_train(x64, w, b, np.zeros(c), np.ones(c), 0.1, 1e-5, axis)[0]
        bb = ref.bshape(b.astype(np.float64), x.ndim, axis)
        assert_within_ulp(y, y64, dtype, np.abs(y64 - bb) + np.abs(bb))
        bn.batch_norm(page_end.place(x), rm, rv, w, b, axis=axis, out=y)
        eval64 = ref.forward_eval(x64, rm, rv, w, b, 1e-5, axis)
        assert_within_ulp(y, eval64, dtype, np.abs(eval64 - bb) + np.abs(bb))
        gy = page_end.place(half_input(rng, shape, dtype))
        mean, invstd = saved_stats(x, axis)
        gx = bn.batch_norm_backward(gy, page_end.place(x), mean, invstd, w, axis=axis)[0]
        assert gx.dtype == dtype
        assert_grad_x_within_ulp(gx, gy, x, mean, invstd, w, axis, dtype)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_module_float32_parameters_half_input(dtype, rng):
    """As in torch: a float32 module takes half input and returns the input's dtype; its
    parameters and running statistics stay float32."""
    m = bn.BatchNorm2d(5)
    x = half_input(rng, (4, 5, 9, 9), dtype, offset=1.0)
    y = m(x)
    assert y.dtype == dtype and m.running_mean.dtype == np.float32
    y64, _, _, rm, rv = ref.forward_train(x.astype(np.float64), None, None, np.zeros(5), np.ones(5))  # no bias
    assert_within_ulp(y, y64, dtype)
    np.testing.assert_allclose(m.running_mean, rm, rtol=1e-6, atol=1e-7)
    gy = half_input(rng, x.shape, dtype)
    gx = m.backward(gy)
    assert gx.dtype == dtype and m.weight_grad.dtype == np.float32
    m.eval()
    assert_within_ulp(m(x), ref.forward_eval(x.astype(np.float64), m.running_mean, m.running_var), dtype)


# ---------------------------------------------------------------- torch

@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_tensors(torch, tdtype, channels_last, rng):
    """torch half tensors through DLPack, against torch's own batch norm and float64."""
    dt = getattr(torch, tdtype)
    x = torch.from_numpy(rng.standard_normal((4, 6, 11, 13)).astype(np.float32) * 2 + 1).to(dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = (torch.from_numpy(a) for a in params(rng, 6))
    rm_t, rv_t = rm.clone(), rv.clone()
    y = bn.batch_norm(x, rm, rv, w, b, training=True)
    assert isinstance(y, torch.Tensor) and y.dtype == dt
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    expected = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, training=True)
    x64 = x.double().numpy()
    y64 = ref.forward_train(x64, w.numpy(), b.numpy())[0]
    half = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    bb = b.double().numpy()[None, :, None, None]
    terms = np.abs(y64 - bb) + np.abs(bb)
    assert_within_ulp(y.float().numpy(), y64, half, terms)
    # torch computes in float32 too: at most one rounding apart from ours
    assert_within_ulp(y.float().numpy(), expected.double().numpy(), half, terms)
    torch.testing.assert_close(rm, rm_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_t, rtol=1e-6, atol=1e-6)
    out = torch.empty_like(x)
    assert bn.batch_norm(x, rm, rv, w, b, out=out) is out


@pytest.mark.parametrize("offset_bytes", [2, 4, 6, 1], ids=["2B", "4B", "6B", "odd"])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_tensors_at_any_offset(torch, tdtype, offset_bytes, rng):
    """Half tensors whose address is not a multiple of 8 (a slice such as ``base[1:]``) or
    not even of 2 (``torch.frombuffer`` at an odd offset), as input and as ``out``: read and
    written where they are, with the values of an aligned tensor. (They were read with
    8-byte strides: wrong values, writes past the end, crashes.)"""
    dt = getattr(torch, tdtype)
    half = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    shape = (5, 3, 7, 9)
    n = int(np.prod(shape))

    def at_offset(values, buffer=None):
        buffer = bytearray(2 * n + offset_bytes + 8) if buffer is None else buffer
        t = torch.frombuffer(buffer, dtype=dt, offset=offset_bytes, count=n).view(shape)
        t.copy_(values)
        return t

    x = at_offset(torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 2 + 1).to(dt))
    assert x.data_ptr() % 8 != 0
    w, b, rm, rv = (torch.from_numpy(a) for a in params(rng, 3))
    x64 = x.double().numpy()
    y64 = ref.forward_train(x64, w.numpy(), b.numpy())[0]
    bb = b.double().numpy()[None, :, None, None]
    terms = np.abs(y64 - bb) + np.abs(bb)
    y = bn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True)
    assert_within_ulp(y.float().numpy(), y64, half, terms)
    buffer = bytearray(b"\x5a" * (2 * n + offset_bytes + 8))  # nothing outside the view may change
    out = at_offset(torch.zeros(shape, dtype=dt), buffer)
    assert bn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=True, out=out) is out
    assert_within_ulp(out.float().numpy(), y64, half, terms)
    assert buffer[:offset_bytes] == b"\x5a" * offset_bytes and buffer[offset_bytes + 2 * n:] == b"\x5a" * 8
    ln = bn.layer_norm(x, shape[-1])
    x64n = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    assert_within_ulp(ln.float().numpy(), x64n, half, np.abs(x64n))


def test_torch_tensor_with_negative_bit_is_refused_naming_it(torch):
    """A lazily negated view hands its memory to DLPack without the sign: refused, not misread."""
    v = torch.randn(6, 3, dtype=torch.complex64).conj().imag
    assert v.is_neg()
    with pytest.raises(TypeError, match="^x is a tensor with its negative bit set"):
        bn.batch_norm_stats(v)
    mean, _ = bn.batch_norm_stats(v.resolve_neg())
    np.testing.assert_allclose(mean.numpy(), v.resolve_neg().double().mean(0).numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad input

def _state(rng, c=3):
    w, b, rm, rv = params(rng, c)
    return {"w": w, "b": b, "rm": rm, "rv": rv}


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_mixed_half_residual(dtype, rng):
    other = HALF[1] if dtype == HALF[0] else HALF[0]
    s = _state(rng)
    x, r = half_input(rng, (4, 3, 5), dtype), half_input(rng, (4, 3, 5), other)
    out = np.zeros_like(x)
    snap = snapshot(x, r, out, *s.values())
    with pytest.raises(TypeError, match=f"residual has dtype {other.name} but the input has dtype {dtype.name}"):
        bn.batch_norm(x, s["rm"], s["rv"], s["w"], s["b"], residual=r, out=out)
    assert_unchanged(snap, x, r, out, *s.values())


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
@pytest.mark.parametrize("name", ["w", "b", "rm", "rv"])
def test_half_parameters_refused(dtype, name, rng):
    """Per-channel arrays stay float32 for half inputs (what the modules keep)."""
    s = _state(rng)
    s[name] = s[name].astype(dtype)
    x = half_input(rng, (4, 3, 5), dtype)
    snap = snapshot(x, *s.values())
    arg = {"w": "weight", "b": "bias", "rm": "running_mean", "rv": "running_var"}[name]
    with pytest.raises(TypeError, match=f"{arg} has dtype {dtype.name} but must be float32"):
        bn.batch_norm(x, s["rm"], s["rv"], s["w"], s["b"], training=True)
    assert_unchanged(snap, x, *s.values())


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_out_for_float32_input(dtype, rng):
    s = _state(rng)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = np.zeros(x.shape, dtype)
    snap = snapshot(x, out, *s.values())
    with pytest.raises(TypeError, match=f"out has dtype {dtype.name} but the input has dtype float32"):
        bn.batch_norm(x, s["rm"], s["rv"], s["w"], s["b"], training=True, out=out)
    assert_unchanged(snap, x, out, *s.values())


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_backward_mixed_half(dtype, rng):
    other = HALF[1] if dtype == HALF[0] else HALF[0]
    x, gy = half_input(rng, (4, 3, 5), dtype), half_input(rng, (4, 3, 5), other)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="grad_y has dtype"):
        bn.batch_norm_backward(gy, x, mean, invstd)


# ---------------------------------------------------------------- fold

@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_fold_into_half_conv_weight(dtype, rng):
    """fold keeps a half conv weight half, each value the float64 fold rounded once."""
    m = bn.BatchNorm2d(4).eval()
    m.weight[:], m.bias[:], m.running_mean[:], m.running_var[:] = params(rng, 4)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    fw, fb = bn.fold(m, w, b)
    assert fw.dtype == fb.dtype == dtype
    ew, eb = ref.fold(w.astype(np.float64), b.astype(np.float64), m.running_mean, m.running_var, m.weight, m.bias,
                      m.eps)
    assert_within_ulp(fw, ew, dtype, n=0.5)
    assert_within_ulp(fb, eb, dtype, n=0.5)


@pytest.mark.parametrize("module_dtype", ["float32", "same"])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_fold_torch_half_tensors(torch, tdtype, module_dtype, rng):
    """fold on torch half tensors (a ``model.bfloat16()`` conv weight; the batch norm float32
    or in the same dtype): half tensors back, each value the float64 fold rounded once."""
    import batchnorm.torch as bnt
    dt = getattr(torch, tdtype)
    half = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    for cls in (torch.nn.BatchNorm2d, bnt.BatchNorm2d):
        m = cls(4).eval()
        with torch.no_grad():
            for t, a in zip((m.weight, m.bias, m.running_mean, m.running_var), params(rng, 4)):
                t.copy_(torch.from_numpy(a))
        if module_dtype == "same":
            m = m.to(dt)
        w = torch.from_numpy(rng.standard_normal((4, 3, 3, 3)).astype(np.float32)).to(dt)
        b = torch.from_numpy(rng.standard_normal(4).astype(np.float32)).to(dt)
        fw, fb = bn.fold(m, w, b)
        assert fw.dtype == fb.dtype == dt and isinstance(fw, torch.Tensor)
        stats = [t.detach().double().numpy() for t in (m.running_mean, m.running_var, m.weight, m.bias)]
        ew, eb = ref.fold(w.double().numpy(), b.double().numpy(), *stats, m.eps)
        assert_within_ulp(fw.float().numpy(), ew, half, n=0.5)
        assert_within_ulp(fb.float().numpy(), eb, half, n=0.5)


# ---------------------------------------------------------------- torch drop-in

def _no_fallback(monkeypatch):
    """The drop-in's fallback to torch's op raises: what passes ran on the kernels."""
    import batchnorm.torch as bt

    def fallback(*args, **kwargs):
        raise AssertionError("torch's batch_norm ran instead of the kernels")
    monkeypatch.setattr(bt, "_torch_batch_norm", fallback)
    return bt


def _bn_reference(torch, x, bn_module, grad_y):
    """torch's BatchNorm in float64 on the upcast input and float32-valued parameters:
    (y, grad_x, grad_weight, grad_bias, running_mean, running_var)."""
    m = torch.nn.BatchNorm2d(bn_module.num_features).double()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(m, name).copy_(getattr(bn_module, name).double())
    m.train(bn_module.training)
    x64 = x.detach().double().requires_grad_()
    y = m(x64)
    y.backward(grad_y.double())
    return y.detach(), x64.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_model_in_half(torch, tdtype, channels_last, monkeypatch, rng):
    """``model.bfloat16()`` / ``model.half()`` on a converted model: the kernels run (the fallback
    raises), with float32 copies of the half parameters; the output and gradients are within 1 ulp
    of float64 on the same upcast values, the parameters' gradients and running statistics come
    back in their half dtype, rounded once from torch's values."""
    bt = _no_fallback(monkeypatch)
    dt = getattr(torch, tdtype)
    half = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    model = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(6))).to(dt)
    layer = model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(params(rng, 6)[0]))
        layer.bias.copy_(torch.from_numpy(params(rng, 6)[1]))
    x = torch.from_numpy(rng.standard_normal((4, 6, 9, 11)).astype(np.float32) * 2 + 3).to(dt)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)).to(dt)
    expected = _bn_reference(torch, x, layer, grad_y)
    x.requires_grad_()
    y = model(x)
    y.backward(grad_y)
    assert y.dtype == dt and x.grad.dtype == dt and layer.weight.grad.dtype == dt
    assert layer.running_mean.dtype == dt and layer.running_var.dtype == dt
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    y64, gx64, gw64, gb64, rm64, rv64 = (t.detach().numpy() for t in expected)
    b = layer.bias.detach().double().numpy()[None, :, None, None]
    assert_within_ulp(y.detach().float().numpy(), y64, half, np.abs(y64 - b) + np.abs(b))
    # grad_x = invstd*w*(dy - mean(dy) - xhat*mean(dy*xhat)): terms of |dy| and |xhat*mean(dy*xhat)|
    w = layer.weight.detach().double().numpy()[None, :, None, None]
    xhat = (y64 - b) / w
    terms = np.abs(gx64) + 4 * np.abs(w) * np.abs(grad_y.double().numpy()) * np.max(np.abs(xhat))
    assert_within_ulp(x.grad.float().numpy(), gx64, half, terms)
    for got, want in ((layer.weight.grad, gw64), (layer.bias.grad, gb64), (layer.running_mean, rm64),
                      (layer.running_var, rv64)):
        assert_within_ulp(got.float().numpy(), want, half, n=1.0, terms=np.abs(want) * 4)
    layer.eval()
    with torch.no_grad():
        y_eval = model(x)
    y_eval64 = _bn_reference(torch, x, layer, grad_y)[0].numpy()
    assert_within_ulp(y_eval.float().numpy(), y_eval64, half, np.abs(y_eval64 - b) + np.abs(b))


def _higher_order_grads(torch, module, x, training):
    """A gradient penalty's gradients (double backward; training, where the first gradient
    depends on x) and batched input gradients (``is_grads_batched``) of ``module`` at ``x``."""
    module.train(training)
    x = x.detach().requires_grad_()
    grads = []
    if training:
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(x.dtype)
        (g,) = torch.autograd.grad((module(x) * r).sum(), x, create_graph=True)
        g.float().pow(2).sum().backward()
        grads += [x.grad, module.weight.grad]
    y = module(x)
    cotangents = torch.randn((2, *y.shape), generator=torch.Generator().manual_seed(3)).to(x.dtype)
    grads += list(torch.autograd.grad(y, x, cotangents, is_grads_batched=True))
    return [g.double().numpy() for g in grads]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_half_parameters_double_backward_and_batched_grads(torch, tdtype, training, rng):
    """``model.bfloat16()`` / ``model.half()``: double backward and batched gradients (torch's
    differentiable formulas) take the half weight as the float32 the forward computed with.
    Against float64 torch on the same (upcast) values: within 2 half-type epsilons of the
    largest gradient (the chain rounds its intermediate gradient to the half type)."""
    dt = getattr(torch, tdtype)
    m = pytest.importorskip("batchnorm.torch").BatchNorm2d(3)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(params(rng, 3)[0]))
        m.bias.copy_(torch.from_numpy(params(rng, 3)[1]))
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    m.to(dt)
    reference = torch.nn.BatchNorm2d(3).double()  # the half values, upcast
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    x = torch.from_numpy(rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1).to(dt)
    got = _higher_order_grads(torch, m, x, training)
    expected = _higher_order_grads(torch, reference, x.double(), training)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=2 * float(torch.finfo(dt).eps) * np.abs(e).max())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_half_module_shortcut_matches_the_functional_route(torch, tdtype, momentum, monkeypatch, rng):
    """A half-parameter module call (``model.bfloat16()``) takes the module's shortcut, which
    widens the parameters with NumPy per call; ``batchnorm.torch.batch_norm`` widens them with
    torch. Same bits: outputs, gradients, running statistics over three training steps (the
    second after a write through ``.data``, which a cached copy would miss), then eval."""
    bt = _no_fallback(monkeypatch)
    dt = getattr(torch, tdtype)
    module = bt.BatchNorm2d(5, momentum=momentum).to(dt)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(params(rng, 5)[0]))
        module.bias.copy_(torch.from_numpy(params(rng, 5)[1]))
    state = {name: t.detach().clone() for name, t in module.state_dict().items()}
    weight = state["weight"].clone().requires_grad_()
    bias = state["bias"].clone().requires_grad_()
    rm, rv = state["running_mean"].clone(), state["running_var"].clone()
    for step in range(3):
        if step == 1:  # a write the module must see at the next call
            module.weight.data[2] = 0.5
            weight.data[2] = 0.5
        x = torch.from_numpy(rng.standard_normal((3, 5, 4, 6)).astype(np.float32) * 3 + 2).to(dt)
        grad_y = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32)).to(dt)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = module(x1)
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        y2 = bt.batch_norm(x2, rm, rv, weight, bias, True, factor, module.eps)
        y1.backward(grad_y)
        y2.backward(grad_y)
        assert y1.dtype == dt and module.weight.grad.dtype == dt
        for got, want in ((y1, y2), (x1.grad, x2.grad), (module.weight.grad, weight.grad),
                          (module.bias.grad, bias.grad), (module.running_mean, rm), (module.running_var, rv)):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert module.running_mean.dtype == dt and int(module.num_batches_tracked) == 3
    module.eval()
    x = torch.from_numpy(rng.standard_normal((2, 5, 3, 3)).astype(np.float32)).to(dt)
    with torch.no_grad():
        assert torch.equal(module(x), bt.batch_norm(x, rm, rv, weight, bias, False, 0.0, module.eps))
    assert module._views is not None and module._views.half  # the calls above took the shortcut


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_bfloat16_through_dlpack_matches_the_numpy_views(torch, channels_last, monkeypatch, rng):
    """bfloat16 tensors reach the kernels as ml_dtypes NumPy views, or, without ml_dtypes, as
    themselves through DLPack: the same bits either way (train step, gradients, eval)."""
    from batchnorm import _torch_ops
    bt = _no_fallback(monkeypatch)
    x0 = torch.from_numpy(rng.standard_normal((4, 6, 5, 7)).astype(np.float32) * 2 + 3).to(torch.bfloat16)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    grad_y = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32)).to(torch.bfloat16)
    results = []
    for transport in (None, False):  # looked up (ml_dtypes' views), then none (DLPack)
        monkeypatch.setattr(_torch_ops, "_BFLOAT16", transport)
        layer = bt.BatchNorm2d(6)
        x = x0.clone().requires_grad_()
        y = layer(x)
        y.backward(grad_y)
        layer.eval()
        with torch.no_grad():
            y_eval = layer(x0)
        results.append((y.detach(), x.grad, layer.weight.grad, layer.running_var, y_eval))
        assert isinstance(_torch_ops._BFLOAT16, np.dtype if transport is None else bool)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_autocast(torch, tdtype, monkeypatch, rng):
    """``torch.autocast("cpu", dtype=...)`` on a converted conv + batch norm model: the conv
    hands the batch norm a half tensor with float32 parameters, which the kernels take (the
    fallback raises); the result matches torch's under the same autocast within 1 ulp of the
    half type, in training (with the running statistics) and in eval."""
    bt = _no_fallback(monkeypatch)
    dt = getattr(torch, tdtype)
    half = ml_dtypes.bfloat16 if tdtype == "bfloat16" else np.float16
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    import copy
    model = bt.convert(copy.deepcopy(reference))
    x = torch.from_numpy(rng.standard_normal((4, 3, 12, 12)).astype(np.float32))
    for training in (True, False):
        reference.train(training)
        model.train(training)
        with monkeypatch.context() as patch, torch.autocast("cpu", dtype=dt):
            patch.setattr(bt, "_torch_batch_norm", torch.nn.functional.batch_norm)
            want = reference(x)
        with torch.autocast("cpu", dtype=dt):
            got = model(x)
        assert got.dtype == want.dtype == dt
        w = want.detach().double().numpy()
        assert_within_ulp(got.detach().float().numpy(), w, half, terms=np.abs(w) + 1.0)
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tdtype", ["bfloat16", "float16"])
def test_torch_ops_take_half(torch, tdtype, rng):
    """The registered ops (graph capture's route) on half tensors with float32 parameters:
    float32 statistics, the same values as the eager kernels, and fake results that agree."""
    from batchnorm import _torch_ops as ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    dt = getattr(torch, tdtype)
    x = torch.from_numpy(rng.standard_normal((4, 5, 6, 7)).astype(np.float32)).to(dt)
    w, b, rm, rv = (torch.from_numpy(a) for a in params(rng, 5))
    y, mean, invstd, new_mean, new_var = ops.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    assert y.dtype == dt and mean.dtype == invstd.dtype == new_mean.dtype == torch.float32
    rm_e, rv_e = rm.clone(), rv.clone()
    eager = bn.batch_norm(x, rm_e, rv_e, w, b, training=True)
    assert torch.equal(y, eager) and torch.equal(new_mean, rm_e) and torch.equal(new_var, rv_e)
    with FakeTensorMode() as mode:
        fake = ops.batch_norm_train(*(mode.from_tensor(t) for t in (x, w, b, rm, rv)), 0.1, 1e-5)
    assert [t.dtype for t in fake] == [t.dtype for t in (y, mean, invstd, new_mean, new_var)]
    gx, gw, gb = ops.batch_norm_backward(y, x, w, mean, invstd, True)
    assert gx.dtype == dt and gw.dtype == gb.dtype == torch.float32
    y_eval = ops.batch_norm_eval(x, w, b, rm, rv, 1e-5)
    assert torch.equal(y_eval, bn.batch_norm(x, rm, rv, w, b))
