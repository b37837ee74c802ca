"""InstanceNorm specifics: running statistics (torch's rule, over several steps, then eval),
unbatched input, torch's channel warning, the functional form in every layout, bad input
and accuracy at mean 1e6 (family-wide checks: test_norm_family.py)."""

import warnings

import numpy as np
import pytest

import batchnorm as bn
import reference as ref
from helpers import DTYPE_IDS, DTYPES, assert_close, assert_unchanged, logical_data, snapshot
from test_numerics import VAR_RTOL, data, out_atol

CLASSES = [("InstanceNorm1d", (3, 4, 17)), ("InstanceNorm2d", (2, 3, 5, 7)), ("InstanceNorm3d", (2, 3, 3, 4, 5))]


@pytest.mark.parametrize("name,shape", CLASSES, ids=[c[0] for c in CLASSES])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_running_stats_follow_torch(torch, name, shape, momentum, dtype, rng):
    c = shape[1]
    m = getattr(bn, name)(c, momentum=momentum, affine=True, track_running_stats=True, dtype=dtype)
    tm = getattr(torch.nn, name)(c, momentum=momentum, affine=True, track_running_stats=True,
                                 dtype={np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)])
    for step in range(3):
        x = logical_data(rng, shape, offset=step).astype(dtype)
        y = m(x)
        assert_close(y, tm(torch.from_numpy(x)).detach().numpy(), dtype)
    assert_close(m.running_mean, tm.running_mean.numpy(), dtype)
    assert_close(m.running_var, tm.running_var.numpy(), dtype)
    assert int(m.num_batches_tracked) == int(tm.num_batches_tracked) == 0  # torch never counts
    m.eval()
    tm.eval()
    x = logical_data(rng, shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = tm(xt)
    gy = rng.standard_normal(shape).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    assert_close(m(x), yt.detach().numpy(), dtype)
    invstd = 1 / np.sqrt(m.running_var.astype(np.float64) + 1e-5)
    assert_close(m.backward(gy), xt.grad.numpy(), dtype, scale=np.max(invstd) * np.max(np.abs(gy)) * 1.5)


@pytest.mark.parametrize("name,shape", CLASSES, ids=[c[0] for c in CLASSES])
@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
def test_unbatched_input_is_one_sample(name, shape, axis, rng):
    c = shape[1]
    m = getattr(bn, name)(c, affine=True, track_running_stats=True, dtype=np.float64, axis=axis)
    one = np.moveaxis(logical_data(rng, shape)[:1], 1, axis)
    y_batched = m(np.ascontiguousarray(one))
    rm = m.running_mean.copy()
    m.reset_running_stats()
    y = m(np.ascontiguousarray(one[0]))
    assert y.shape == one.shape[1:]
    np.testing.assert_array_equal(y, y_batched[0])
    np.testing.assert_array_equal(m.running_mean, rm)
    gx = m.backward(np.ones(one.shape[1:]))
    assert gx.shape == one.shape[1:]


def test_unbatched_matches_torch(torch, rng):
    x = logical_data(rng, (1, 3, 9))[0].astype(np.float32)
    m, tm = bn.InstanceNorm1d(3), torch.nn.InstanceNorm1d(3)
    assert_close(m(x), tm(torch.from_numpy(x)).numpy(), np.float32)


def test_unbatched_arguments_get_the_batched_checks(torch, rng):
    """An unbatched call runs as a batch of one sample: its out and grad_y are checked as the
    batched call's are, and written in place (a list was converted and its copy written)."""
    x = logical_data(rng, (3, 5))
    m = bn.InstanceNorm1d(3, affine=True, dtype=np.float64)
    as_list = np.zeros((3, 5)).tolist()
    for bad in (as_list, np.zeros((3, 5), np.float32)):
        with pytest.raises(TypeError, match=r"\bout\b"):
            m(x, out=bad)
    assert as_list == np.zeros((3, 5)).tolist()
    with pytest.raises(TypeError, match="requires grad"):
        m(torch.tensor(x, requires_grad=True))
    with pytest.raises(TypeError, match="requires grad"):
        m(x, out=torch.zeros(3, 5, dtype=torch.float64, requires_grad=True))
    out = np.empty((3, 5))
    assert m(x, out=out) is out
    assert_close(out, ref.instance_norm(x[None])[0][0], np.float64)
    with pytest.raises(TypeError, match=r"\bgrad_y\b"):
        m.backward(np.ones((3, 5)).tolist())
    grad_x = torch.empty(3, 5, dtype=torch.float64)
    assert m.backward(np.ones((3, 5)), out=grad_x) is grad_x
    assert_close(grad_x.numpy(), m.backward(np.ones((3, 5))), np.float64)


@pytest.mark.parametrize("axis", [1, -1], ids=["cf", "cl"])
def test_zero_channels_give_empty_results(axis):
    """N x 0 instances: empty outputs, statistics and gradients, as torch gives (the kernel
    wrote N statistics into the N x 0 of them, past the end of the allocation)."""
    shape = (64, 0, 3) if axis == 1 else (64, 3, 0)
    x = np.zeros(shape, np.float32)
    for _ in range(3):
        assert bn.instance_norm(x, axis=axis).shape == shape
    stats = np.zeros((64, 0), np.float32)
    grad_x, grad_weight, grad_bias = bn.instance_norm_backward(x, x, stats, stats, axis=axis)
    assert grad_x.shape == shape and grad_weight.shape == grad_bias.shape == (0,)
    assert grad_weight.dtype == np.float32
    with pytest.raises(ValueError, match="grad_y"):
        bn.instance_norm_backward(x[:1], x, stats, stats, axis=axis)


def test_zero_channels_in_torch(torch):
    bnt = pytest.importorskip("batchnorm.torch")
    x = torch.zeros(64, 0, 3)
    for _ in range(3):
        outputs = torch.ops.batchnorm.instance_norm_train(x, None, None, None, None, 0.1, 1e-5)
        assert [tuple(t.shape) for t in outputs] == [(64, 0, 3), (64, 0), (64, 0), (0,), (0,)]
    assert bnt.instance_norm(x).shape == bnt.InstanceNorm1d(0)(x).shape == x.shape


def test_channel_mismatch_warns_without_affine_and_raises_with(rng):
    x = logical_data(rng, (2, 5, 8))
    with pytest.warns(UserWarning, match="does not match num_features"):
        y = bn.InstanceNorm1d(3, dtype=np.float64)(x)
    assert_close(y, ref.instance_norm(x)[0], np.float64)
    m = bn.InstanceNorm1d(3, affine=True, dtype=np.float64)
    before = snapshot(m, x)
    with pytest.raises(ValueError, match=r"expected input's size at dim=1 to match num_features \(3\), but got: 5"):
        m(x)
    assert_unchanged(before, m, x)


@pytest.mark.parametrize("rank_shape", [(5,), (2, 3, 4, 5)], ids=str)
def test_wrong_rank_raises_torchs_message(rank_shape):
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got \d+D input\)"):
        bn.InstanceNorm1d(3)(np.ones(rank_shape, np.float32))


@pytest.mark.parametrize("axis", [1, -1, 2], ids=lambda a: f"axis{a}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_functional_every_layout(axis, dtype, threads, rng):
    x = np.ascontiguousarray(np.moveaxis(logical_data(rng, (3, 5, 6, 7)), 1, axis)).astype(dtype)
    w = rng.uniform(0.5, 1.5, 5).astype(dtype)
    b = rng.uniform(-1, 1, 5).astype(dtype)
    rm, rv = np.zeros(5, dtype), np.ones(5, dtype)
    ey, mean, invstd, erm, erv = ref.instance_norm(x, rm, rv, w, b, 0.2, 1e-5, axis)
    y = bn.instance_norm(x, rm, rv, w, b, True, 0.2, axis=axis)
    assert_close(y, ey, dtype)
    assert_close(rm, erm, dtype)
    assert_close(rv, erv, dtype)
    assert_close(bn.instance_norm(x, None, None, w, b, axis=axis, activation="relu"), np.maximum(ey, 0), dtype)
    # use_input_stats=False: the running statistics normalize
    eval_y = bn.instance_norm(x, rm, rv, w, b, use_input_stats=False, axis=axis)
    assert_close(eval_y, ref.forward_eval(x, rm, rv, w, b, 1e-5, axis), dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gx, gw, gb = bn.instance_norm_backward(gy, x, mean.astype(dtype), invstd.astype(dtype), w, axis=axis)
    egx, egw, egb = ref.instance_norm_backward(gy, x, mean, invstd, w, axis)
    assert_close(gx, egx, dtype, scale=np.max(np.abs(w)) * np.max(invstd) * np.max(np.abs(gy)))
    assert_close(gw, egw, dtype, scale=3 * x.size // 5)
    assert_close(gb, egb, dtype, scale=3 * x.size // 5)


@pytest.mark.parametrize("shape", [(32, 256, 14, 14), (1, 2048, 28, 28)], ids=["32x256x14x14", "1x2048x28x28"])
def test_short_planes_past_the_l2(shape, threads, rng):
    """Planes of up to a page whose arrays pass the L2s: the sizes at which batch norm's training
    goes in two passes (engine/plane_blocks.hpp: in_two_passes). Instance norm's segments take
    their own schedule (norms/group_norm.hpp: normalize_groups), checked here at those sizes."""
    x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
    c = shape[1]
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.uniform(-1, 1, c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    ey, _, _, erm, erv = ref.instance_norm(x, rm, rv, w, b, 0.1, 1e-5)
    assert_close(bn.instance_norm(x, rm, rv, w, b, True, 0.1), ey, np.float32)
    assert_close(rm, erm, np.float32)
    assert_close(rv, erv, np.float32)
    assert_close(bn.instance_norm(x, None, None, w, b, activation="relu"), np.maximum(ey, 0), np.float32)


def test_functional_bad_input_changes_nothing(rng):
    x = logical_data(rng, (2, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = snapshot(x, rm, rv)
    with pytest.raises(ValueError, match="running_mean and running_var"):
        bn.instance_norm(x, None, None, use_input_stats=False)
    with pytest.raises(ValueError, match="running_mean"):
        bn.instance_norm(x, np.zeros(4, np.float32), rv)
    with pytest.raises(ValueError, match="spatial"):
        bn.instance_norm(x[:, :, :1], rm, rv)
    with pytest.raises(TypeError):
        bn.instance_norm(x, rm.astype(np.float64), rv)
    assert_unchanged(before, x, rm, rv)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((4, 16, 32, 32), 1), ((4, 32, 32, 16), -1)], ids=["NCHW", "NHWC"])
def test_accuracy_at_mean_1e6(dtype, shape, axis, threads):
    x = data(shape, dtype, 1e6, 1.0, 5)
    y, mean, invstd = bn._core.instance_norm(x, None, None, None, None, 0.1, 1e-5, axis)
    ey, _, inv_ref, _, _ = ref.instance_norm(x, axis=axis)
    var = 1.0 / invstd.astype(np.float64) ** 2 - 1e-5
    v_ref = 1.0 / inv_ref**2 - 1e-5
    assert np.max(np.abs(var - v_ref) / v_ref) <= VAR_RTOL[np.dtype(dtype)]
    assert np.max(np.abs(y - ey)) <= out_atol(dtype, 1e6, 1.0)


def test_no_warning_when_channels_match(rng):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.InstanceNorm2d(3)(logical_data(rng, (2, 3, 4, 4)))
