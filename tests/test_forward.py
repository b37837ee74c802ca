"""Forward passes of the modules and of the functional API, every rank/layout/dtype,
against the float64 reference (and PyTorch for the layouts PyTorch can express).

Tolerances: helpers.assert_close (float32 rtol=atol=1e-5, float64 1e-12; see helpers.py).
"""

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import (same_random_params, torch_cls, DTYPE_IDS, DTYPES, LAYOUTS, SHAPE_IDS, SHAPES, assert_close, channels,
                     layout_ok, logical_data, make_input, module_cls, rand_params)

def cases():
    for s, sid in zip(SHAPES, SHAPE_IDS):
        for lay in LAYOUTS:
            if layout_ok(lay, len(s)):
                yield pytest.param(s, lay, id=f"{sid}-{lay}")


def set_params(m, rm, w, b):
    m.weight[:] = w
    m.bias[:] = b
    rm.weight = np.asarray(m.weight, np.float64).copy()
    rm.bias = np.asarray(m.bias, np.float64).copy()


@pytest.mark.parametrize("shape,layout", list(cases()))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_module_train_then_eval(shape, layout, dtype, threads, rng):
    c = shape[1]
    x, axis = make_input(rng, shape, dtype, layout)
    m = module_cls(len(shape))(c, dtype=dtype, axis=axis)
    r = ref.RefBatchNorm(c, axis=axis)
    set_params(m, r, *rand_params(rng, c, dtype))
    assert m.training
    for step in range(3):
        if step:
            x, _ = make_input(rng, shape, dtype, layout, offset=step)
        x_before = x.copy()
        y = m(x)
        y_ref = r(x)
        assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
        assert_close(y, y_ref, dtype, err_msg=f"train y step {step}")
        np.testing.assert_array_equal(x, x_before)  # input untouched
        assert m.running_mean.dtype == dtype and m.running_var.dtype == dtype
        assert_close(m.running_mean, r.running_mean, dtype, err_msg="running_mean")
        assert_close(m.running_var, r.running_var, dtype, err_msg="running_var")
        assert int(m.num_batches_tracked) == step + 1
    assert m.eval() is m and not m.training
    x, _ = make_input(rng, shape, dtype, layout)
    rm_before, rv_before = m.running_mean.copy(), m.running_var.copy()
    r.training = False
    assert_close(m(x), r(x), dtype, err_msg="eval y")
    np.testing.assert_array_equal(m.running_mean, rm_before)
    np.testing.assert_array_equal(m.running_var, rv_before)
    assert int(m.num_batches_tracked) == 3


def _stride_order(a):
    dims = [d for d in range(a.ndim) if a.shape[d] > 1]
    return sorted(dims, key=lambda d: -abs(a.strides[d]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cl_view", "axis2", "axis0", "fortran"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_has_memory_layout_of_input(layout, training, rng):
    """_core contract: outputs are new arrays with the memory layout of x (zero-copy layouts)."""
    x, axis = make_input(rng, (2, 3, 4, 5), np.float32, layout)
    m = bn.BatchNorm2d(3, axis=axis).train(training)
    y = m(x)
    assert not np.shares_memory(y, x)
    assert _stride_order(y) == _stride_order(x), (y.strides, x.strides)
    assert y.flags.c_contiguous or y.flags.f_contiguous or np.moveaxis(y, 1, -1).flags.c_contiguous or \
        np.moveaxis(y, axis, -1).flags.c_contiguous


@pytest.mark.parametrize("shape", [(4, 3), (2, 17, 5), (2, 3, 4, 5), (2, 3, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_affine_and_track_flags(shape, dtype, affine, track, rng):
    c = shape[1]
    m = module_cls(len(shape))(c, affine=affine, track_running_stats=track, dtype=dtype)
    r = ref.RefBatchNorm(c, affine=affine, track_running_stats=track)
    if affine:
        assert m.weight.shape == (c,) and m.weight.dtype == dtype
        np.testing.assert_array_equal(m.weight, np.ones(c))
        np.testing.assert_array_equal(m.bias, np.zeros(c))
        set_params(m, r, *rand_params(rng, c, dtype))
    else:
        assert m.weight is None and m.bias is None
    if track:
        np.testing.assert_array_equal(m.running_mean, np.zeros(c))
        np.testing.assert_array_equal(m.running_var, np.ones(c))
        assert np.asarray(m.num_batches_tracked).dtype == np.int64
        assert np.asarray(m.num_batches_tracked).shape == ()
        assert int(m.num_batches_tracked) == 0
    else:
        assert m.running_mean is None and m.running_var is None
    for _ in range(2):
        x = logical_data(rng, shape).astype(dtype)
        assert_close(m(x), r(x), dtype)
    if track:
        assert_close(m.running_mean, r.running_mean, dtype)
        assert_close(m.running_var, r.running_var, dtype)
    m.eval()
    r.training = False
    x = logical_data(rng, shape).astype(dtype)
    # eval without running stats uses the batch statistics
    assert_close(m(x), r(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_momentum_none_is_cumulative_average(dtype, layout, threads, rng):
    shape = (3, 17, 5, 4)
    m = bn.BatchNorm2d(17, momentum=None, dtype=dtype, axis=1 if layout == "contiguous" else -1)
    means, uvars = [], []
    for step in range(5):
        x, axis = make_input(rng, shape, dtype, layout, offset=3.0 * step)
        m(x)
        mu, var = ref.stats(x, axis)
        n = x.size // 17
        means.append(mu)
        uvars.append(var * n / (n - 1))
        # independent of the reference's recursion: the plain average of the batch stats
        assert_close(m.running_mean, np.mean(means, axis=0), dtype, scale=12)
        assert_close(m.running_var, np.mean(uvars, axis=0), dtype, scale=4)
        assert int(m.num_batches_tracked) == step + 1


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.3])
def test_momentum_extremes(momentum, rng):
    x = logical_data(rng, (6, 3, 5))
    m = bn.BatchNorm1d(3, momentum=momentum, dtype=np.float64)
    m(x)
    r = ref.RefBatchNorm(3, momentum=momentum)
    r(x)
    assert_close(m.running_mean, r.running_mean, np.float64)
    assert_close(m.running_var, r.running_var, np.float64)
    if momentum == 0.0:
        np.testing.assert_array_equal(m.running_mean, np.zeros(3))
        np.testing.assert_array_equal(m.running_var, np.ones(3))


def test_num_batches_tracked_counts_only_training(rng):
    m = bn.BatchNorm2d(3)
    x = logical_data(rng, (2, 3, 4, 4)).astype(np.float32)
    m(x)
    m(x)
    m.eval()
    rm, rv = m.running_mean.copy(), m.running_var.copy()
    for _ in range(3):
        m(x)
    assert int(m.num_batches_tracked) == 2
    np.testing.assert_array_equal(m.running_mean, rm)
    np.testing.assert_array_equal(m.running_var, rv)
    m.train()
    m(x)
    assert int(m.num_batches_tracked) == 3


def test_num_batches_tracked_advances_in_place(rng):
    """The counter is the module's one array, advanced in place: a reference taken before
    training (or a user array assigned to the attribute) sees every count, as torch's buffer
    does."""
    m = bn.BatchNorm1d(3)
    held = m.num_batches_tracked
    x = logical_data(rng, (4, 3)).astype(np.float32)
    m(x)
    m(x)
    assert m.num_batches_tracked is held and int(held) == 2
    mine = np.array(7, dtype=np.int64)
    m.num_batches_tracked = mine
    m(x)
    assert int(mine) == 8 and m.num_batches_tracked is mine


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0, 2)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zero_size_batch_leaves_state_alone(shape, training, momentum, dtype, rng):
    from helpers import assert_unchanged, snapshot
    c = 3
    m = module_cls(len(shape))(c, momentum=momentum, dtype=dtype)
    m.weight[:] = rng.standard_normal(c)
    m(logical_data(rng, (2, c) + (2,) * (len(shape) - 2)).astype(dtype))  # non-trivial state first
    m.train(training)
    snap = snapshot(m)
    x = np.zeros(shape, dtype)
    y = m(x)
    assert isinstance(y, np.ndarray) and y.shape == shape and y.dtype == dtype
    assert_unchanged(snap, m)
    if training and momentum is None:
        # the next non-empty batch is averaged as the 2nd batch, not the 3rd (empty batches are not counted)
        x2 = logical_data(rng, (2, c) + (2,) * (len(shape) - 2)).astype(dtype)
        rm0 = m.running_mean.astype(np.float64)
        m(x2)
        mu, _ = ref.stats(x2)
        assert_close(m.running_mean, (rm0 + mu) / 2, dtype)


def test_zero_size_functional(rng):
    x = np.zeros((0, 4, 3), np.float32)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = bn.batch_norm(x, rm, rv, training=True)
    assert y.shape == x.shape
    np.testing.assert_array_equal(rm, np.zeros(4))
    np.testing.assert_array_equal(rv, np.ones(4))
    assert bn.batch_norm(x, rm, rv, training=False).shape == x.shape


def test_zero_size_outputs_are_writable():
    """An empty out= or sum_out= (NumPy 2 gives np.zeros((0, 3, 4)) all-zero strides, no two
    elements at one address since it has none) is accepted, in place too, as torch's is."""
    x = np.zeros((0, 3, 4), np.float32)
    assert x.strides == (0, 0, 0) or np.lib.NumpyVersion(np.__version__) < "2.0.0"
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for training in (True, False):
        assert bn.batch_norm(x, rm, rv, training=training, out=x) is x
        out = np.empty_like(x)
        assert bn.batch_norm(x, rm, rv, training=training, out=out) is out
    np.testing.assert_array_equal(rm, np.zeros(3))
    np.testing.assert_array_equal(rv, np.ones(3))
    m = bn.BatchNorm1d(3)
    assert m(x, out=x) is x and m.num_batches_tracked == 0
    gx = np.empty_like(x)
    assert bn.batch_norm_backward(x, x, rm, rv, out=gx)[0] is gx
    assert bn.layer_norm(x, (4,), out=out) is out
    total = np.empty_like(x)
    assert bn.layer_norm(x, (4,), residual=x, sum_out=total).shape == x.shape
    assert bn.group_norm(x, 3, out=x) is x


@pytest.mark.parametrize("shape,layout", [
    pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
    for s in [(4, 3), (2, 17, 5), (2, 3, 4, 5), (1, 33, 3, 3), (2, 3, 2, 3, 4)]
    for lay in LAYOUTS if layout_ok(lay, len(s))])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_running", [True, False], ids=["rs", "nors"])
def test_functional_batch_norm(shape, layout, dtype, training, with_running, rng):
    if not training and not with_running:
        # torch.nn.functional.batch_norm: "running_mean must be defined in evaluation mode"
        # (RuntimeError in torch; DESIGN.md does not fix the class, so either is accepted)
        x, axis = make_input(rng, shape, dtype, layout)
        x0 = x.copy()
        with pytest.raises((RuntimeError, ValueError), match="running_mean"):
            bn.batch_norm(x, None, None, training=False, axis=axis)
        np.testing.assert_array_equal(x, x0)
        return
    x, axis = make_input(rng, shape, dtype, layout)
    c = channels(x, axis)
    w, b = rand_params(rng, c, dtype)
    rm = rng.standard_normal(c).astype(dtype) if with_running else None
    rv = rng.uniform(0.5, 2.0, c).astype(dtype) if with_running else None
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    y = bn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.25, eps=1e-3, axis=axis)
    assert y.shape == x.shape and y.dtype == dtype
    if training:
        y_ref, _, _, nrm, nrv = ref.forward_train(x, w, b, rm0, rv0, 0.25, 1e-3, axis)
        if with_running:
            assert_close(rm, nrm, dtype, err_msg="running_mean updated in place")
            assert_close(rv, nrv, dtype, err_msg="running_var updated in place")
    else:
        y_ref = ref.forward_eval(x, rm0, rv0, w, b, 1e-3, axis)
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)
    assert_close(y, y_ref, dtype)


@pytest.mark.parametrize("shape,layout", [
    pytest.param(s, lay, id=f"{'x'.join(map(str, s))}-{lay}")
    for s in SHAPES for lay in LAYOUTS if layout_ok(lay, len(s))])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_norm_stats(shape, layout, dtype, threads, rng):
    x, axis = make_input(rng, shape, dtype, layout, offset=10.0)
    mean, var = bn.batch_norm_stats(x, axis=axis)
    m_ref, v_ref = ref.stats(x, axis)
    assert mean.shape == var.shape == (channels(x, axis),)
    assert mean.dtype == dtype and var.dtype == dtype
    assert_close(mean, m_ref, dtype, scale=12)  # |mean| <= ~12: float32 rounding of the mean itself
    assert_close(var, v_ref, dtype, scale=4)


# ------------------------------------------------------------------ out= and in place

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_place_out_is_x(layout, dtype, training, threads, rng):
    shape = (3, 17, 5, 3)
    x, axis = make_input(rng, shape, dtype, layout)
    m = bn.BatchNorm2d(17, dtype=dtype, axis=axis)
    r = ref.RefBatchNorm(17, axis=axis)
    set_params(m, r, *rand_params(rng, 17, dtype))
    if not training:
        warm, _ = make_input(rng, shape, dtype, layout)
        m(warm)
        r(warm)
        m.eval()
        r.training = False
    y_ref = r(x.copy())
    y = m(x, out=x)
    assert np.shares_memory(y, x) and y.shape == x.shape
    assert_close(x, y_ref, dtype)
    assert_close(m.running_mean, r.running_mean, dtype)
    assert_close(m.running_var, r.running_var, dtype)


@pytest.mark.parametrize("out_layout", ["contiguous", "fortran", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_argument(out_layout, dtype, training, rng):
    shape = (2, 3, 5, 7)
    x, axis = make_input(rng, shape, dtype, "contiguous")
    m = bn.BatchNorm2d(3, dtype=dtype).train(training)
    r = ref.RefBatchNorm(3)
    r.training = training
    if out_layout == "strided":
        big = np.full((4, 6, 10, 14), -777.0, dtype)
        out = big[::2, ::2, ::2, ::2]
    elif out_layout == "fortran":
        out = np.asfortranarray(np.full(shape, -777.0, dtype))
    else:
        out = np.full(shape, -777.0, dtype)
    y = m(x, out=out)
    assert y is out or (np.shares_memory(y, out) and y.shape == out.shape)
    assert_close(out, r(x), dtype)
    if out_layout == "strided":
        mask = np.ones(big.shape, bool)
        mask[::2, ::2, ::2, ::2] = False
        assert (big[mask] == -777.0).all(), "out= wrote outside the view"


def test_functional_out_and_in_place(rng):
    x = logical_data(rng, (4, 3, 6)).astype(np.float32)
    rm, rv = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    out = np.empty_like(x)
    y = bn.batch_norm(x, rm, rv, out=out)
    assert np.shares_memory(y, out)
    assert_close(out, ref.forward_eval(x, rm, rv), np.float32)
    expect = ref.forward_train(x)[0]
    y = bn.batch_norm(x, None, None, training=True, out=x)
    assert np.shares_memory(y, x)
    assert_close(x, expect, np.float32)


# ------------------------------------------------------------------ PyTorch parity

@pytest.mark.parametrize("shape", [(5, 3), (4, 17, 33), (1, 3, 17, 3), (2, 33, 3, 1), (2, 3, 3, 1, 17)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_torch(torch, shape, dtype, momentum, rng):
    tdt = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    c = shape[1]
    tcls = torch_cls(torch, len(shape))
    tm = tcls(c, momentum=momentum, dtype=tdt)
    m = module_cls(len(shape))(c, momentum=momentum, dtype=dtype)
    same_random_params(rng, m, tm, dtype)
    for step in range(3):
        x = logical_data(rng, shape, offset=step).astype(dtype)
        assert_close(m(x), tm(torch.from_numpy(x)).detach().numpy(), dtype)
        assert_close(m.running_mean, tm.running_mean.numpy(), dtype)
        assert_close(m.running_var, tm.running_var.numpy(), dtype)
        assert int(m.num_batches_tracked) == int(tm.num_batches_tracked)
    m.eval()
    tm.eval()
    x = logical_data(rng, shape).astype(dtype)
    assert_close(m(x), tm(torch.from_numpy(x)).detach().numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_running", [True, False], ids=["rs", "nors"])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_matches_torch(torch, dtype, training, with_running, affine, rng):
    F = torch.nn.functional
    if not training and not with_running:
        x = logical_data(rng, (4, 5, 3, 7)).astype(dtype)
        with pytest.raises(RuntimeError, match="running_mean"):
            F.batch_norm(torch.from_numpy(x), None, None, training=False)
        with pytest.raises((RuntimeError, ValueError), match="running_mean"):
            bn.batch_norm(x, None, None, training=False)
        return
    x = logical_data(rng, (4, 5, 3, 7)).astype(dtype)
    w, b = rand_params(rng, 5, dtype) if affine else (None, None)
    rm = rng.standard_normal(5).astype(dtype) if with_running else None
    rv = rng.uniform(0.5, 2.0, 5).astype(dtype) if with_running else None
    t = (lambda a: None if a is None else torch.from_numpy(a.copy()))
    trm, trv = t(rm), t(rv)
    yt = F.batch_norm(torch.from_numpy(x), trm, trv, t(w), t(b), training, 0.2, 1e-4)
    y = bn.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4)
    assert_close(y, yt.numpy(), dtype)
    if with_running:
        assert_close(rm, trm.numpy(), dtype)
        assert_close(rv, trv.numpy(), dtype)


def test_channels_last_matches_torch_channels_last(torch, rng):
    """axis=-1 on NHWC NumPy data == torch BatchNorm2d on a channels_last tensor."""
    x = logical_data(rng, (2, 33, 5, 7)).astype(np.float32)
    xt = torch.from_numpy(x).to(memory_format=torch.channels_last)
    tm = torch.nn.BatchNorm2d(33)
    m = bn.BatchNorm2d(33, axis=-1)
    y = m(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    yt = tm(xt).detach().numpy()
    assert_close(np.moveaxis(y, -1, 1), yt, np.float32)
    assert_close(m.running_var, tm.running_var.numpy(), np.float32)


# ------------------------------------------------------------------ vector-width edges

EDGE = [3, 4, 6, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65, 127, 129]


@pytest.mark.parametrize("size", EDGE)
@pytest.mark.parametrize("where", ["inner", "channels_last_C"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vector_width_edges(size, where, dtype, threads, rng):
    """Sizes around every SIMD width (4/8/16 lanes, unrolled x2/x4): tails by mask or epilogue;
    channels-last rows narrower than a vector read several to a vector, with rows left over."""
    if where == "inner":
        shape, layout = (3, 2, size), "contiguous"          # inner = size, channels-first kernel
    else:
        shape, layout = (7, size, 5), "channels_last"       # C = size across lanes, channels-last kernel
    x, axis = make_input(rng, shape, dtype, layout, offset=4.0)
    c = channels(x, axis)
    w, b = rand_params(rng, c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y = bn.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
    ey, em, einv, erm, erv = ref.forward_train(x, w, b, np.zeros(c), np.ones(c), 0.1, 1e-5, axis)
    assert_close(y, ey, dtype)
    assert_close(rm, erm, dtype)
    assert_close(rv, erv, dtype)
    assert_close(bn.batch_norm(x, rm, rv, w, b, axis=axis), ref.forward_eval(x, rm, rv, w, b, 1e-5, axis), dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gx, gw, gb = bn.batch_norm_backward(gy, x, em.astype(dtype), einv.astype(dtype), w, axis=axis)
    egx, egw, egb = ref.backward_train(gy, x, em.astype(dtype), einv.astype(dtype), w, axis)
    n = x.size // c
    assert_close(gx, egx, dtype, scale=4 * np.abs(gy).max())
    assert_close(gw, egw, dtype, scale=4 * n)
    assert_close(gb, egb, dtype, scale=4 * n)


# Channels-first planes of up to a page whose data pass the L2s (a few MiB): training may
# normalize in a second pass over the whole array in memory order rather than block by block
# (engine/plane_blocks.hpp: in_two_passes); with fewer images than threads the second pass
# splits channels. The statistics, running statistics and output must not depend on which.
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (1, 2048, 28, 28), (33, 61, 27, 29)],
                         ids=["32x64x28x28", "1x2048x28x28", "33x61x27x29"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_training_past_the_l2(shape, relu, threads, rng):
    x = make_input(rng, shape, np.float32, offset=3.0, std=2.0)[0]
    c = shape[1]
    w, b = rand_params(rng, c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    # the bindings' training forward: the functional API has no training ReLU (the torch ops do)
    y, mean, invstd = bn._core.forward_train(x, w, b, rm, rv, 0.1, 1e-5, 1, None, relu)
    ey, em, einv, erm, erv = ref.forward_train(x, w, b, np.zeros(c), np.ones(c), 0.1, 1e-5, 1)
    assert_close(y, np.maximum(ey, 0) if relu else ey, np.float32)
    assert_close(mean, em, np.float32)
    assert_close(invstd, einv, np.float32)
    assert_close(rm, erm, np.float32)
    assert_close(rv, erv, np.float32)


def test_eval_accepts_one_value_per_channel(rng):
    m = bn.BatchNorm1d(4).eval()
    m.running_mean[:] = [1, 2, 3, 4]
    x = rng.standard_normal((1, 4)).astype(np.float32)
    assert_close(m(x), ref.forward_eval(x, m.running_mean, m.running_var), np.float32)
    assert int(m.num_batches_tracked) == 0


def test_out_partially_overlapping_x(rng):
    """out overlapping x without being x: either refused (ValueError naming out, nothing
    written) or computed as if x had been read first -- never a half-overwritten mix."""
    buf = logical_data(rng, (5, 3)).astype(np.float32)
    x, out = buf[0:4], buf[1:5]
    x0, buf0 = x.copy(), buf.copy()
    m = bn.BatchNorm1d(3)
    try:
        m(x, out=out)
    except ValueError as e:
        assert "out" in str(e)
        np.testing.assert_array_equal(buf, buf0)
        assert int(m.num_batches_tracked) == 0
        return
    assert_close(out, ref.forward_train(x0)[0], np.float32)
