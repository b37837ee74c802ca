"""Every norm of the family (tests/norm_specs.py) through the same checks: module forward and
backward against the float64 reference in every layout and thread count, against torch
autograd in float32 and float64, state_dict round trips with torch modules, repr, copies.

Tolerances as in helpers.py: elements with rtol = atol = 1e-5 (float32) / 1e-12 (float64),
atol scaled by the magnitude of the terms (max|w|*max(invstd)*max|grad_y| for grad_x);
per-parameter sums against rtol * sum(|terms|).
"""

import copy
import pickle

import numpy as np
import pytest

from helpers import DTYPE_IDS, DTYPES, assert_close, assert_close_sum, logical_data
from norm_specs import SPECS, layouts, param_sum, random_params

LAYOUT_CASES = [pytest.param(spec, lay, id=f"{spec}-{'cl' if lay[0] == -1 else 'cf'}")
                for spec in SPECS for lay in layouts(spec)]


def check_against_reference(spec, m, x_logical, gy_logical, params, dtype, y, gx, to_logical):
    x64 = x_logical.astype(np.float64)
    gy64 = gy_logical.astype(np.float64)
    ey, invstd, backward = spec.reference(x64, params)
    assert_close(to_logical(y), ey, dtype, err_msg="y")
    egx, egw, egb = backward(gy64)
    w = params["weight"]
    scale = (1.0 if w is None else np.max(np.abs(w))) * np.max(invstd) * np.max(np.abs(gy64))
    assert_close(to_logical(gx), egx, dtype, scale=scale, err_msg="grad_x")
    xhat = spec.reference(x64, {"weight": None, "bias": None})[0]
    if w is not None:
        assert_close_sum(m.weight_grad, egw, param_sum(m, np.abs(gy64 * xhat)), dtype, "grad_weight")
    if params["bias"] is not None:
        assert_close_sum(m.bias_grad, egb, param_sum(m, np.abs(gy64)), dtype, "grad_bias")


@pytest.mark.parametrize("spec,layout", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_backward_match_reference(spec, layout, dtype, threads, rng):
    axis, to_data, to_logical = layout
    m = spec.make(dtype, axis)
    params = random_params(rng, m)
    x = logical_data(rng, spec.shape).astype(dtype)
    gy = rng.standard_normal(spec.shape).astype(dtype)
    y = m(to_data(x))
    assert isinstance(y, np.ndarray) and y.dtype == dtype
    gx = m.backward(to_data(gy))
    assert gx.dtype == dtype and gx.shape == y.shape
    check_against_reference(spec, m, x, gy, params, dtype, y, gx, to_logical)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_backward_match_torch_autograd(torch, spec, dtype, rng):
    m = spec.make(dtype, 1)
    tm = spec.make_torch(torch, dtype)
    params = random_params(rng, m)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    x = logical_data(rng, spec.shape).astype(dtype)
    gy = rng.standard_normal(spec.shape).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = tm(xt)
    yt.backward(torch.from_numpy(gy))
    y = m(x)
    gx = m.backward(gy)
    assert_close(y, yt.detach().numpy(), dtype, err_msg="y")
    w = params["weight"]
    _, invstd, _ = spec.reference(x.astype(np.float64), params)
    scale = (1.0 if w is None else np.max(np.abs(w))) * np.max(invstd) * np.max(np.abs(gy))
    assert_close(gx, xt.grad.numpy(), dtype, scale=scale, err_msg="grad_x")
    xhat = spec.reference(x.astype(np.float64), {"weight": None, "bias": None})[0]
    gy64 = gy.astype(np.float64)
    if w is not None:
        assert_close_sum(m.weight_grad, tm.weight.grad.numpy(), param_sum(m, np.abs(gy64 * xhat)), dtype)
    if params["bias"] is not None:
        assert_close_sum(m.bias_grad, tm.bias.grad.numpy(), param_sum(m, np.abs(gy64)), dtype)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_torch_tensors_in_torch_tensors_out(torch, spec, rng):
    m = spec.make(np.float32, 1)
    random_params(rng, m)
    x = logical_data(rng, spec.shape).astype(np.float32)
    y = m(torch.from_numpy(x))
    assert isinstance(y, torch.Tensor)
    gx = m.backward(torch.ones(spec.shape))
    assert isinstance(gx, torch.Tensor)
    np.testing.assert_array_equal(y.numpy(), m(x))
    np.testing.assert_array_equal(gx.numpy(), m.backward(np.ones(spec.shape, np.float32)))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_state_dict_round_trips_with_torch(torch, spec, dtype, rng):
    m = spec.make(dtype, 1)
    random_params(rng, m)
    tm = spec.make_torch(torch, dtype)
    assert list(m.state_dict()) == list(tm.state_dict())
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    back = spec.make(dtype, 1)
    result = back.load_state_dict(tm.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)
        assert back.state_dict()[key].dtype == np.dtype(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_repr_like_torch(torch, spec):
    assert repr(spec.make(np.float32, 1)) == repr(spec.make_torch(torch, np.float32))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_copies_are_independent_and_need_a_forward(spec, rng):
    m = spec.make(np.float64, 1)
    random_params(rng, m)
    m(logical_data(rng, spec.shape))
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert repr(other) == repr(m)
        for key, value in m.state_dict().items():
            np.testing.assert_array_equal(other.state_dict()[key], value)
        if other.weight is not None:
            other.weight[...] += 1
            assert not np.array_equal(other.weight, m.weight)
        with pytest.raises(RuntimeError, match="backward needs a forward first"):
            other.backward(np.ones(spec.shape))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_reset_parameters(spec, rng):
    m = spec.make(np.float32, 1)
    weight = m.weight
    random_params(rng, m)
    m.reset_parameters()
    assert m.weight is weight  # in place
    np.testing.assert_array_equal(m.weight, np.ones_like(m.weight))
    if m.bias is not None:
        np.testing.assert_array_equal(m.bias, np.zeros_like(m.bias))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_in_place_forward_then_backward_raises(spec, rng):
    m = spec.make(np.float32, 1)
    x = logical_data(rng, spec.shape).astype(np.float32)
    assert m(x, out=x) is x
    with pytest.raises(RuntimeError, match="in-place forward"):
        m.backward(np.ones_like(x))
