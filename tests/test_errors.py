"""Bad-input battery (DESIGN.md "Errors").

Every case asserts
  * the exception class (TypeError for types/dtypes, ValueError for shapes, ranks, channel
    counts, values, out; RuntimeError where PyTorch raises it: load_state_dict and
    backward-before-forward),
  * that the message names the argument (and, where DESIGN.md asks for it, what was
    expected and what came), via pytest.raises(match=...),
  * that every output, running statistic, parameter, gradient and counter involved is
    bit-for-bit unchanged by the failed call (helpers.snapshot / assert_unchanged).
"""

import re

import numpy as np
import pytest

import batchnorm as bn
from helpers import assert_unchanged, snapshot

X = r"(\bx\b|\binput\b)"          # the data argument: `x` (module/_core) or `input` (torch name)
CH = r"(\bx\b|\binput\b|num_features|channel)"


def all_of(*patterns):
    """A regex that matches when every pattern occurs somewhere in the message."""
    return "(?s)^" + "".join(f"(?=.*?{p})" for p in patterns)


def f32(*shape, seed=0, value=None):
    rng = np.random.default_rng(seed)
    if value is not None:
        return np.full(shape, value, np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def trained(cls=None, c=3, dtype=np.float32, shape=(4, 3, 5, 5), **kw):
    """A module with non-trivial state (weights, running stats, counter, saved forward)."""
    cls = cls or bn.BatchNorm2d
    m = cls(c, dtype=dtype, **kw)
    rng = np.random.default_rng(1)
    if m.weight is not None:
        m.weight[:] = rng.uniform(0.5, 1.5, c)
        m.bias[:] = rng.uniform(-1, 1, c)
    x = (rng.standard_normal(shape) + 3).astype(dtype)
    m(x)
    m(x * 2)
    m.backward(np.ones(shape, dtype))  # weight_grad / bias_grad set too
    return m


def fstate(c=3, dtype=np.float32):
    rng = np.random.default_rng(2)
    return dict(rm=rng.standard_normal(c).astype(dtype), rv=rng.uniform(0.5, 2, c).astype(dtype),
                w=rng.standard_normal(c).astype(dtype), b=rng.standard_normal(c).astype(dtype))


CASES = {}


def case(name, exc, *patterns):
    def deco(builder):
        assert name not in CASES
        CASES[name] = (exc, all_of(*patterns), builder)
        return builder
    return deco


# ----------------------------------------------------------------- dtypes (TypeError)

@case("f64_into_f32_module", TypeError, X, "float32", "float64")
def _():
    m = trained()
    x = f32(2, 3, 4, 4).astype(np.float64)
    return (lambda: m(x)), [m, x]


@case("f32_into_f64_module", TypeError, X, "float32", "float64")
def _():
    m = trained(dtype=np.float64)
    x = f32(2, 3, 4, 4)
    return (lambda: m(x)), [m, x]


@case("f64_into_f32_module_eval", TypeError, X, "float32", "float64")
def _():
    m = trained().eval()
    x = f32(2, 3, 4, 4).astype(np.float64)
    return (lambda: m(x)), [m, x]


@pytest.mark.parametrize("make", [lambda dt: bn.LayerNorm(5, dtype=dt), lambda dt: bn.RMSNorm(5, dtype=dt),
                                  lambda dt: bn.GroupNorm(1, 3, dtype=dt),
                                  lambda dt: bn.InstanceNorm1d(3, track_running_stats=True, dtype=dt)],
                         ids=["LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm1d"])
@pytest.mark.parametrize("module_dtype,x_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                                  (np.float64, np.float16)], ids=["f64-x", "f32-x", "f16-x"])
def test_sibling_module_of_another_dtype_names_x(make, module_dtype, x_dtype):
    """The caller passed only x: the message names it and the module's dtype (the core named
    the first of the module's arrays it checked), and the call changes nothing."""
    m = make(module_dtype)
    x = f32(4, 3, 5).astype(x_dtype)
    before = snapshot(m, x)
    with pytest.raises(TypeError, match=all_of(r"^x has dtype " + np.dtype(x_dtype).name,
                                               f"is {np.dtype(module_dtype).name}", r"dtype=np\.float")):
        m(x)
    assert_unchanged(before, m, x)


@case("int32_x_module", TypeError, X, "int32")
def _():
    m = trained()
    x = np.ones((2, 3, 4, 4), np.int32)
    return (lambda: m(x)), [m, x]


@case("int64_x_functional", TypeError, X)
def _():
    s = fstate()
    x = np.ones((4, 3), np.int64)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True)), [x, *s.values()]


@case("int16_x_stats", TypeError, X, "int16")
def _():
    x = np.ones((4, 3), np.int16)
    return (lambda: bn.batch_norm_stats(x)), [x]


@case("weight_other_dtype", TypeError, "weight", "float32", "float64")
def _():
    s = fstate()
    x = f32(4, 3)
    w = s["w"].astype(np.float64)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], w, s["b"], training=True)), [x, w, *s.values()]


@case("bias_other_dtype", TypeError, "bias")
def _():
    s = fstate()
    x = f32(4, 3)
    b = s["b"].astype(np.float64)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], s["w"], b, training=True)), [x, b, *s.values()]


@case("running_mean_other_dtype", TypeError, "running_mean")
def _():
    s = fstate()
    x = f32(4, 3)
    rm = s["rm"].astype(np.float64)
    return (lambda: bn.batch_norm(x, rm, s["rv"], training=True)), [x, rm, *s.values()]


@case("running_var_int", TypeError, "running_var")
def _():
    s = fstate()
    x = f32(4, 3)
    rv = np.ones(3, np.int32)
    return (lambda: bn.batch_norm(x, s["rm"], rv, training=False)), [x, rv, *s.values()]


@case("running_mean_f32_into_f64_eval", TypeError, "running_mean")
def _():
    s = fstate(dtype=np.float64)
    x = f32(4, 3).astype(np.float64)
    rm = s["rm"].astype(np.float32)
    return (lambda: bn.batch_norm(x, rm, s["rv"], training=False)), [x, rm, *s.values()]


@case("grad_y_other_dtype_module", TypeError, "grad_y")
def _():
    m = trained()
    g = np.ones((4, 3, 5, 5), np.float64)
    return (lambda: m.backward(g)), [m, g]


@case("backward_mean_other_dtype", TypeError, r"\bmean\b")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd = np.zeros(3, np.float64), np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd)), [x, g, mean, invstd]


@case("backward_invstd_other_dtype", TypeError, "invstd")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float64)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd)), [x, g, mean, invstd]


@case("backward_weight_other_dtype", TypeError, "weight")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd, w = np.zeros(3, np.float32), np.ones(3, np.float32), np.ones(3, np.float64)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd, w)), [x, g, mean, invstd, w]


@case("backward_grad_y_other_dtype", TypeError, "grad_y")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1).astype(np.float64)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd)), [x, g, mean, invstd]


# ----------------------------------------------------------------- ranks (torch messages)

@case("2d_gets_3d", ValueError, re.escape("expected 4D input (got 3D input)"))
def _():
    m = trained()
    x = f32(2, 3, 4)
    return (lambda: m(x)), [m, x]


@case("2d_gets_5d", ValueError, re.escape("expected 4D input (got 5D input)"))
def _():
    m = trained()
    x = f32(2, 3, 4, 4, 4)
    return (lambda: m(x)), [m, x]


@case("1d_gets_4d", ValueError, re.escape("expected 2D or 3D input (got 4D input)"))
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3))
    x = f32(2, 3, 4, 4)
    return (lambda: m(x)), [m, x]


@case("1d_gets_1d", ValueError, re.escape("expected 2D or 3D input (got 1D input)"))
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3, 2))
    x = f32(3)
    return (lambda: m(x)), [m, x]


@case("3d_gets_4d", ValueError, re.escape("expected 5D input (got 4D input)"))
def _():
    m = trained(bn.BatchNorm3d, shape=(2, 3, 2, 2, 2))
    x = f32(2, 3, 4, 4)
    return (lambda: m(x)), [m, x]


@case("3d_eval_gets_4d", ValueError, re.escape("expected 5D input (got 4D input)"))
def _():
    m = trained(bn.BatchNorm3d, shape=(2, 3, 2, 2, 2)).eval()
    x = f32(2, 3, 4, 4)
    return (lambda: m(x)), [m, x]


@case("functional_rank1", ValueError, X)
def _():
    s = fstate()
    x = f32(3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True)), [x, *s.values()]


# ----------------------------------------------------------------- channels / shapes

@case("channel_mismatch_module", ValueError, CH, r"\b3\b", r"\b4\b")
def _():
    m = trained()
    x = f32(2, 4, 5, 5)
    return (lambda: m(x)), [m, x]


@case("channel_mismatch_axis_last", ValueError, CH, r"\b3\b", r"\b5\b")
def _():
    m = trained(axis=-1, shape=(2, 4, 4, 3))
    x = f32(2, 3, 4, 5)        # NCHW data given to an axis=-1 module: W=5 channels
    return (lambda: m(x)), [m, x]


@case("channel_mismatch_eval", ValueError, CH, r"\b3\b", r"\b4\b")
def _():
    m = trained().eval()
    x = f32(2, 4, 5, 5)
    return (lambda: m(x)), [m, x]


@case("weight_wrong_length", ValueError, "weight", r"\b3\b", r"\b4\b")
def _():
    s = fstate()
    x = f32(4, 3)
    w = np.ones(4, np.float32)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], w, s["b"], training=True)), [x, w, *s.values()]


@case("running_var_2d", ValueError, "running_var")
def _():
    s = fstate()
    x = f32(4, 3)
    rv = np.ones((3, 1), np.float32)
    return (lambda: bn.batch_norm(x, s["rm"], rv, training=True)), [x, rv, *s.values()]


@case("running_mean_wrong_length_eval", ValueError, "running_mean")
def _():
    s = fstate()
    x = f32(4, 3, 2)
    rm = np.zeros(2, np.float32)
    return (lambda: bn.batch_norm(x, rm, s["rv"], training=False)), [x, rm, *s.values()]


@case("only_running_mean_given", ValueError, "running_var")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], None, training=True)), [x, *s.values()]


@case("one_value_per_channel_2d", ValueError, "Expected more than 1 value per channel when training")
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3))
    x = f32(1, 3)
    return (lambda: m(x)), [m, x]


@case("one_value_per_channel_4d", ValueError, "Expected more than 1 value per channel when training")
def _():
    m = trained()
    x = f32(1, 3, 1, 1)
    return (lambda: m(x)), [m, x]


@case("one_value_per_channel_functional", ValueError, "Expected more than 1 value per channel when training")
def _():
    s = fstate()
    x = f32(1, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True)), [x, *s.values()]


@case("one_value_per_channel_eval_without_running_stats", ValueError,
      "Expected more than 1 value per channel when training")
def _():
    """Eval without running stats uses batch statistics, so torch's check applies."""
    m = trained(bn.BatchNorm1d, shape=(4, 3), track_running_stats=False).eval()
    x = f32(1, 3)
    return (lambda: m(x)), [m, x]


# ----------------------------------------------------------------- eps / momentum / num_features

@pytest.mark.parametrize("kwargs,arg", [
    ({"eps": 0.0}, "eps"), ({"eps": -1e-5}, "eps"), ({"eps": float("nan")}, "eps"),
    ({"eps": float("inf")}, "eps"),
    ({"momentum": -0.1}, "momentum"), ({"momentum": 1.5}, "momentum"),
    ({"momentum": float("nan")}, "momentum"),
    ({"num_features": 0}, "num_features"), ({"num_features": -2}, "num_features"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
@pytest.mark.parametrize("cls", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_constructor_rejects(cls, kwargs, arg):
    kw = dict(num_features=3)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        getattr(bn, cls)(**kw)


@case("functional_eps_zero", ValueError, "eps")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True, eps=0.0)), [x, *s.values()]


@case("functional_eps_nan_eval", ValueError, "eps")
def _():
    s = fstate()
    x = f32(4, 3)
    out = f32(4, 3, value=7.0)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], eps=float("nan"), out=out)), [x, out, *s.values()]


@case("functional_momentum_2", ValueError, "momentum")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True, momentum=2.0)), [x, *s.values()]


@case("functional_eval_momentum_2", ValueError, "momentum must be in \\[0, 1\\], got 2.0")
def _():
    s = fstate()
    x = f32(4, 3, 5)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=False, momentum=2.0)), [x, *s.values()]


@case("functional_momentum_negative", ValueError, "momentum")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True, momentum=-0.5)), [x, *s.values()]


# ----------------------------------------------------------------- running statistics sharing memory
# Training writes a channel's running statistics while it still reads the later channels' input,
# weight and bias (which then read the new values): none of those may share memory with them.

@case("running_mean_overlaps_input", ValueError, "^running_mean overlaps input; pass separate arrays$")
def _():
    memory = (np.random.default_rng(15).standard_normal(60) + 5).astype(np.float32)
    x, rm, rv = memory[:48].reshape(4, 3, 2, 2), memory[46:49], np.ones(3, np.float32)
    return (lambda: bn.batch_norm(x, rm, rv, training=True)), [memory, rv]


@case("running_var_overlaps_input_channels_last", ValueError, "^running_var overlaps input; pass separate arrays$")
def _():
    memory = (np.random.default_rng(16).standard_normal(60) + 5).astype(np.float32)
    x, rm, rv = memory[:48].reshape(4, 2, 2, 3), np.zeros(3, np.float32), memory[10:13]
    return (lambda: bn.batch_norm(x, rm, rv, training=True, axis=-1)), [memory, rm]


@case("running_mean_is_weight", ValueError, "^running_mean overlaps weight; pass separate arrays$")
def _():
    x, shared, rv = f32(4, 3, 2, 2), np.array([1.5, 2.0, 0.5], np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm(x, shared, rv, shared, training=True)), [x, shared, rv]


@case("running_var_overlaps_bias", ValueError, "^running_var overlaps bias; pass separate arrays$")
def _():
    x, rm, memory = f32(4, 3, 5), np.zeros(3, np.float32), np.ones(5, np.float32)
    return (lambda: bn.batch_norm(x, rm, memory[:3], None, memory[2:], training=True)), [x, rm, memory]


# ----------------------------------------------------------------- out

@case("out_read_only", ValueError, r"\bout\b")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    out = f32(2, 3, 4, 4, value=7.0)
    out.flags.writeable = False
    return (lambda: m(x, out=out)), [m, x, out]


@case("out_read_only_is_x", ValueError, r"\bout\b")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    x.flags.writeable = False
    return (lambda: m(x, out=x)), [m, x]


@case("out_broadcast_view", ValueError, r"\bout\b")
def _():
    s = fstate()
    x = f32(4, 3)
    out = np.broadcast_to(np.float32(7.0), (4, 3))
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], out=out)), [x, out, *s.values()]


def _zero_stride(shape, value=7.0):
    """A writable array of `shape` whose first dimension has stride 0: every row is one row
    in memory (as np.lib.stride_tricks.as_strided makes), so writes to it would overwrite each
    other."""
    base = np.full((1, *shape[1:]), value, np.float32)
    return np.lib.stride_tricks.as_strided(base, shape=shape, strides=(0, *base.strides[1:]))


@case("out_zero_stride", ValueError, r"\bout\b", "memory location")
def _():
    s = fstate()
    x = f32(4, 3)
    out = _zero_stride((4, 3))
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], out=out)), [x, out, *s.values()]


@case("running_mean_zero_stride", ValueError, r"\brunning_mean\b", "memory location")
def _():
    s = fstate()
    x = f32(4, 3)
    rm = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(3,), strides=(0,))
    return (lambda: bn.batch_norm(x, rm, s["rv"], training=True)), [x, rm, s["rv"]]


@case("backward_out_zero_stride", ValueError, r"\bout\b", "memory location")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = _zero_stride((4, 3))
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd, out=out)), [x, g, mean, invstd, out]


@case("out_mis_shaped", ValueError, r"\bout\b")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    out = f32(2, 3, 4, 5, value=7.0)
    return (lambda: m(x, out=out)), [m, x, out]


@case("out_mis_shaped_same_size", ValueError, r"\bout\b")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    out = f32(2, 3, 2, 8, value=7.0)   # same size, different shape
    return (lambda: m(x, out=out)), [m, x, out]


@case("out_wrong_dtype", TypeError, r"\bout\b")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    out = np.full((2, 3, 4, 4), 7.0, np.float64)
    return (lambda: m(x, out=out)), [m, x, out]


@case("out_wrong_dtype_module_without_arrays", TypeError, r"^out has dtype float32", "float64")
def _():
    # float64 input is this module's to take (it holds no arrays): the fault is `out`'s
    m = bn.BatchNorm1d(3, affine=False, track_running_stats=False)
    x = f32(4, 3, 5).astype(np.float64)
    out = np.full((4, 3, 5), 7.0, np.float32)
    return (lambda: m(x, out=out)), [m, x, out]


@case("out_is_list", TypeError, r"\bout\b")
def _():
    s = fstate()
    x = f32(4, 3)
    out = [[0.0] * 3] * 4
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], out=out)), [x, *s.values()]


@case("out_overlaps_weight_functional", ValueError, r"\bout\b")
def _():
    s = fstate()
    x = f32(4, 3)
    out = f32(4, 3, value=7.0)
    w = out[1]            # the weight lives inside out
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], w, s["b"], training=True, out=out)), \
        [x, out, s["rm"], s["rv"], s["b"]]


@case("out_overlaps_running_mean_functional", ValueError, r"\bout\b")
def _():
    s = fstate()
    x = f32(4, 3)
    out = f32(4, 3, value=7.0)
    rm = out[0]
    return (lambda: bn.batch_norm(x, rm, s["rv"], s["w"], s["b"], training=True, out=out)), \
        [x, out, s["rv"], s["w"], s["b"]]


@case("out_overlaps_module_running_mean", ValueError, r"\bout\b")
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3)).eval()
    x = f32(1, 3)
    return (lambda: m(x, out=m.running_mean.reshape(1, 3))), [m, x]


@case("out_overlaps_module_weight", ValueError, r"\bout\b")
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3)).eval()
    x = f32(1, 3)
    return (lambda: m(x, out=m.weight.reshape(1, 3))), [m, x]


# ----------------------------------------------------------------- backward

@case("backward_before_forward", RuntimeError, "forward")
def _():
    m = bn.BatchNorm2d(3)
    m.weight[:] = 2.0
    g = f32(2, 3, 4, 4)
    return (lambda: m.backward(g)), [m, g]


@case("backward_wrong_shape", ValueError, "grad_y")
def _():
    m = trained()
    g = f32(4, 3, 5, 4)
    return (lambda: m.backward(g)), [m, g]


@case("backward_functional_wrong_shape", ValueError, "grad_y")
def _():
    x, g = f32(4, 3), f32(4, 2, seed=1)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd)), [x, g, mean, invstd]


@case("backward_functional_mean_wrong_length", ValueError, r"\bmean\b")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd = np.zeros(4, np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd)), [x, g, mean, invstd]


def _backward_into(out, mean=None):
    """A functional backward into ``out`` (the saved statistics may live inside it)."""
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean = np.zeros(3, np.float32) if mean is None else mean
    invstd = np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd, out=out)), [x, g, mean, invstd, out]


@case("backward_functional_out_mis_shaped", ValueError, r"\bout\b")
def _():
    return _backward_into(f32(3, 4, value=7.0))


@case("backward_functional_out_wrong_dtype", TypeError, r"\bout\b")
def _():
    return _backward_into(np.full((4, 3), 7.0, np.float64))


@case("backward_functional_out_read_only", ValueError, r"\bout\b")
def _():
    out = f32(4, 3, value=7.0)
    out.flags.writeable = False
    return _backward_into(out)


@case("backward_functional_out_overlaps_mean", ValueError, r"\bout\b", r"\bmean\b")
def _():
    out = f32(4, 3, value=7.0)
    return _backward_into(out, mean=out[0])


@case("layer_norm_backward_out_wrong_dtype", TypeError, r"\bout\b")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd, out = np.zeros(4, np.float32), np.ones(4, np.float32), np.full((4, 3), 7.0)
    return (lambda: bn.layer_norm_backward(g, x, 3, mean, invstd, out=out)), [x, g, mean, invstd, out]


@case("backward_grad_y_is_list", TypeError, "grad_y")
def _():
    m = trained(bn.BatchNorm1d, shape=(4, 3))
    return (lambda: m.backward([[1.0, 2.0, 3.0]] * 4)), [m]


# ----------------------------------------------------------------- load_state_dict (torch semantics)

def _sd(m):
    return {k: np.array(v, copy=True) for k, v in m.state_dict().items()}


@case("load_missing_strict", RuntimeError, "Missing", "running_var")
def _():
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    del sd["running_var"]
    return (lambda: m.load_state_dict(sd)), [m]


@case("load_unexpected_strict", RuntimeError, "Unexpected", "bogus")
def _():
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["bogus"] = np.zeros(3, np.float32)
    return (lambda: m.load_state_dict(sd)), [m]


@case("load_mis_shaped_strict", RuntimeError, "size mismatch", "weight")
def _():
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["weight"] = np.ones(4, np.float32)
    return (lambda: m.load_state_dict(sd)), [m]


@case("load_mis_shaped_non_strict", RuntimeError, "size mismatch", "running_mean")
def _():
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["running_mean"] = np.zeros((3, 1), np.float32)
    return (lambda: m.load_state_dict(sd, strict=False)), [m]


@case("load_none_value", RuntimeError, "expected an array", "weight")
def _():
    """torch's words for a value that is not an array (np.asarray(None) was a 0-d object array,
    reported as a size mismatch); the valid entries before it are not copied."""
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["running_mean"][:] = 42.0
    sd["weight"] = None
    return (lambda: m.load_state_dict(sd)), [m]


@case("load_list_value", RuntimeError, "expected an array", "bias", "list")
def _():
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["bias"] = [0.0, 1.0, 2.0]
    return (lambda: m.load_state_dict(sd)), [m]


@case("load_mis_shaped_after_valid_keys", RuntimeError, "size mismatch", "running_var")
def _():
    """torch copies the valid entries before raising; DESIGN.md: no write at all."""
    m = trained()
    sd = _sd(trained(shape=(2, 3, 2, 2)))
    sd["weight"][:] = 42.0
    sd["running_var"] = np.ones(5, np.float32)
    return (lambda: m.load_state_dict(sd)), [m]


# ----------------------------------------------------------------- axis

@case("functional_axis_out_of_range", ValueError, "axis")
def _():
    s = fstate()
    x = f32(4, 3, 2)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True, axis=3)), [x, *s.values()]


@case("stats_axis_negative_out_of_range", ValueError, "axis")
def _():
    x = f32(4, 3, 2)
    return (lambda: bn.batch_norm_stats(x, axis=-4)), [x]


@case("module_axis_out_of_range_for_2d_input", ValueError, "axis")
def _():
    m = trained(bn.BatchNorm1d, axis=2, shape=(4, 5, 3))
    x = f32(4, 3)     # valid rank for BatchNorm1d, but axis 2 does not exist
    return (lambda: m(x)), [m, x]


@case("module_axis_out_of_range", ValueError, "axis")
def _():
    return (lambda: bn.BatchNorm2d(3, axis=4)(f32(2, 3, 4, 4))), []


@case("backward_axis_out_of_range", ValueError, "axis")
def _():
    x, g = f32(4, 3), f32(4, 3, seed=1)
    mean, invstd = np.zeros(3, np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm_backward(g, x, mean, invstd, axis=2)), [x, g, mean, invstd]


# ----------------------------------------------------------------- not arrays

@pytest.mark.parametrize("obj", [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], None, "abc", 3.0],
                         ids=["list", "None", "str", "float"])
def test_not_an_array_module(obj):
    m = trained(bn.BatchNorm1d, shape=(4, 3))
    snap = snapshot(m)
    with pytest.raises(TypeError, match=X):
        m(obj)
    assert_unchanged(snap, m)


@case("stats_of_list", TypeError, X)
def _():
    return (lambda: bn.batch_norm_stats([[1.0, 2.0], [3.0, 4.0]])), []


@case("functional_x_none", TypeError, X)
def _():
    s = fstate()
    return (lambda: bn.batch_norm(None, s["rm"], s["rv"], training=True)), [*s.values()]


@case("functional_weight_list", TypeError, "weight")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], [1.0, 1.0, 1.0], training=True)), [x, *s.values()]


@case("functional_running_mean_string", TypeError, "running_mean")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, "abc", s["rv"], training=False)), [x, *s.values()]


# ----------------------------------------------------------------- zero-size inputs are still checked

@case("zero_size_wrong_dtype", TypeError, X, "float64")
def _():
    m = trained()
    x = np.zeros((0, 3, 4, 4), np.float64)
    return (lambda: m(x)), [m, x]


@case("zero_size_channel_mismatch", ValueError, CH, r"\b3\b", r"\b0\b")
def _():
    m = trained()
    x = np.zeros((2, 0, 4, 4), np.float32)
    return (lambda: m(x)), [m, x]


@case("zero_size_bad_out", ValueError, r"\bout\b")
def _():
    m = trained()
    x = np.zeros((0, 3, 4, 4), np.float32)
    out = np.zeros((0, 3, 4, 5), np.float32)
    return (lambda: m(x, out=out)), [m, x, out]


@case("zero_size_wrong_rank", ValueError, re.escape("expected 4D input (got 3D input)"))
def _():
    m = trained()
    x = np.zeros((0, 3, 4), np.float32)
    return (lambda: m(x)), [m, x]


# ----------------------------------------------------------------- fusion

@case("residual_in_training", ValueError, "residual")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    r = f32(2, 3, 4, 4, seed=3)
    return (lambda: m(x, residual=r)), [m, x, r]


@case("activation_in_training", ValueError, "activation")
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    return (lambda: m(x, activation="relu")), [m, x]


@case("functional_residual_in_training", ValueError, "residual")
def _():
    s = fstate()
    x = f32(4, 3)
    r = f32(4, 3, seed=3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], training=True, residual=r)), [x, r, *s.values()]


@case("unknown_activation", ValueError, "activation", "gelu")
def _():
    m = trained().eval()
    x = f32(2, 3, 4, 4)
    out = f32(2, 3, 4, 4, value=7.0)
    return (lambda: m(x, activation="gelu", out=out)), [m, x, out]


@case("unknown_activation_in_training", ValueError, "activation", "gelu", '"relu"')
def _():
    m = trained()
    x = f32(2, 3, 4, 4)
    return (lambda: m(x, activation="gelu")), [m, x]


@case("unknown_activation_functional", ValueError, "activation", "sigmoid")
def _():
    s = fstate()
    x = f32(4, 3)
    return (lambda: bn.batch_norm(x, s["rm"], s["rv"], activation="sigmoid")), [x, *s.values()]


@case("residual_wrong_shape", ValueError, "residual")
def _():
    m = trained().eval()
    x = f32(2, 3, 4, 4)
    r = f32(2, 3, 4, 1, seed=3)     # broadcastable, but DESIGN: residual has the shape of x
    return (lambda: m(x, residual=r)), [m, x, r]


@case("residual_wrong_dtype", TypeError, "residual")
def _():
    m = trained().eval()
    x = f32(2, 3, 4, 4)
    r = f32(2, 3, 4, 4, seed=3).astype(np.float64)
    return (lambda: m(x, residual=r)), [m, x, r]


# ----------------------------------------------------------------- attribute assignment

@case("assign_weight_wrong_shape", ValueError, "weight")
def _():
    m = trained()

    def f():
        m.weight = np.ones(4, np.float32)
    return f, [m]


@case("assign_weight_wrong_dtype", TypeError, "weight")
def _():
    m = trained()

    def f():
        m.weight = np.ones(3, np.float64)
    return f, [m]


@case("assign_running_var_wrong_shape", ValueError, "running_var")
def _():
    m = trained()

    def f():
        m.running_var = np.ones((1, 3), np.float32)
    return f, [m]


# ----------------------------------------------------------------- misc

@case("functional_momentum_none", TypeError, "momentum")
def _():
    x = f32(4, 3, seed=5)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    return (lambda: bn.batch_norm(x, rm, rv, training=True, momentum=None)), [x, rm, rv]


@case("set_num_threads_zero", ValueError, r"(thread|\bn\b)")
def _():
    return (lambda: bn.set_num_threads(0)), []


@case("set_num_threads_bool", TypeError, r"^n must be an int, got bool$")
def _():
    return (lambda: bn.set_num_threads(True)), []


@case("set_num_threads_beyond_an_int", ValueError, r"\bn must be at most 2147483647")
def _():
    return (lambda: bn.set_num_threads(2**40)), []


@case("fold_not_a_batch_norm", TypeError, r"^m must be a batch norm module", "got LayerNorm")
def _():
    m, W = bn.LayerNorm(4), np.ones((4, 2), np.float32)
    return (lambda: bn.fold(m, W)), [m, W]


@case("fold_none", TypeError, r"^m must be a batch norm module", "got NoneType")
def _():
    W = np.ones((4, 2), np.float32)
    return (lambda: bn.fold(None, W)), [W]


@case("fold_complex_bias", TypeError, r"^bias: expected a floating-point array", "complex64")
def _():
    """bias is checked as weight is (a complex bias was cast with a ComplexWarning)"""
    m, W, b = bn.BatchNorm1d(4).eval(), np.ones((4, 2), np.float32), np.ones(4, np.complex64)
    return (lambda: bn.fold(m, W, b)), [m, W, b]


@case("fold_list_weight", TypeError, r"^weight: expected an array", "list")
def _():
    m = bn.BatchNorm1d(4).eval()
    return (lambda: bn.fold(m, [[1.0, 2.0]] * 4)), [m]


@case("fold_list_bias", TypeError, r"^bias: expected an array or None", "list")
def _():
    m, W = bn.BatchNorm1d(4).eval(), np.ones((4, 2), np.float32)
    return (lambda: bn.fold(m, W, [0.0, 1.0, 2.0, 3.0])), [m, W]


X_CALLS = {  # functions whose input parameter is x, each given a bad x
    "batch_norm_stats": lambda v: bn.batch_norm_stats(v),
    "layer_norm_backward": lambda v: bn.layer_norm_backward(f32(2, 6), v, 6, f32(2), f32(2, value=1.0)),
    "rms_norm_backward": lambda v: bn.rms_norm_backward(f32(2, 6), v, 6, f32(2, value=1.0)),
    "group_norm_backward": lambda v: bn.group_norm_backward(f32(2, 6), v, 2, f32(2, 2), f32(2, 2, value=1.0)),
    "instance_norm_backward": lambda v: bn.instance_norm_backward(f32(2, 6), v, f32(2, 6), f32(2, 6, value=1.0)),
}


@pytest.mark.parametrize("call", list(X_CALLS))
def test_functions_of_x_name_x(call):
    """Messages name the parameter as the signature does: x, not the core's input."""
    with pytest.raises(TypeError, match=r"^x must have dtype float32, float64, float16 or bfloat16, got int32$"):
        X_CALLS[call](np.ones((2, 6), np.int32))
    with pytest.raises(TypeError, match=r"^x must be a NumPy array or a CPU tensor supporting DLPack, got list$"):
        X_CALLS[call]([[1.0] * 6] * 2)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_sum_out_overlapping_a_parameter_is_named_sum_out(rms):
    x, r, w = f32(1, 4), f32(1, 4, value=0.0), f32(4, value=1.0)
    call = bn.rms_norm if rms else bn.layer_norm
    before = w.copy()
    with pytest.raises(ValueError, match=r"^sum_out overlaps weight; pass a separate array$"):
        call(x, 4, w, residual=r, sum_out=w.reshape(1, 4))
    assert np.array_equal(w, before)


@pytest.mark.parametrize("call", ["layer_norm", "rms_norm", "group_norm"])
def test_not_an_array_is_named_input_in_the_functional_norms(call):
    fn = {"layer_norm": lambda v: bn.layer_norm(v, 2), "rms_norm": lambda v: bn.rms_norm(v, 2),
          "group_norm": lambda v: bn.group_norm(v, 1)}[call]
    with pytest.raises(TypeError, match=r"^input must be a NumPy array or a CPU tensor supporting DLPack, got list$"):
        fn([[1.0, 2.0]])


@case("instance_norm_backward_axis_out_of_range", ValueError, r"^axis 5 is out of range for x of rank 3$")
def _():
    x, stats = f32(4, 6, 3), np.ones((4, 6), np.float32)
    return (lambda: bn.instance_norm_backward(x, x, stats, stats, axis=5)), [x, stats]


@case("instance_norm_backward_1d", ValueError, r"^x must have at least 2 dimensions")
def _():
    x, stats = f32(4, 6, 3), np.ones((4, 6), np.float32)
    return (lambda: bn.instance_norm_backward(x[0, 0], x[0, 0], stats, stats)), [x, stats]


@case("fold_weight_channel_mismatch", ValueError, "weight")
def _():
    m = trained().eval()
    W = np.ones((4, 2, 1, 1), np.float32)
    return (lambda: bn.fold(m, W)), [m, W]


@case("f64_into_f32_module_says_how_to_make_f64", TypeError, X, r"float32 \(its weight",
      r"BatchNorm2d\(3, dtype=np\.float64\)")
def _():
    m = trained()
    x = f32(2, 3, 4, 4).astype(np.float64)
    return (lambda: m(x)), [m, x]


@case("f32_into_f64_module_eval_says_how_to_make_f32", TypeError, X, r"float64 \(its weight",
      r"BatchNorm1d\(3, dtype=np\.float32\)")
def _():
    m = trained(bn.BatchNorm1d, dtype=np.float64, shape=(4, 3)).eval()
    x = f32(2, 3)
    return (lambda: m(x)), [m, x]


@case("fold_training_module_without_running_stats", ValueError, r"\bm\b", "has no running statistics",
      "track_running_stats=False")
def _():
    m = bn.BatchNorm2d(3, track_running_stats=False)
    W = np.ones((3, 2, 1, 1), np.float32)
    return (lambda: bn.fold(m, W)), [m, W]


# Scalar arguments of the wrong type: the functional API names them (not the extension's
# signature dump). (function, its scalar argument, a value of the wrong type, what the message says)
def _x():
    return f32(4, 6, 3)


def _gn_stats():
    return np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32)


SCALAR_CALLS = {
    "batch_norm_train_eps": (lambda v, x: bn.batch_norm(x, None, None, training=True, eps=v), None, "eps", "a float"),
    "batch_norm_train_momentum": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                             training=True, momentum=v), "0.1", "momentum", "a float"),
    "batch_norm_train_axis": (lambda v, x: bn.batch_norm(x, None, None, training=True, axis=v), 1.0, "axis", "an int"),
    "batch_norm_eval_eps": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32), eps=v),
                            "1e-5", "eps", "a float"),
    "batch_norm_eval_axis": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32), axis=v),
                             None, "axis", "an int"),
    "batch_norm_stats_axis": (lambda v, x: bn.batch_norm_stats(x, axis=v), None, "axis", "an int"),
    "batch_norm_backward_axis": (lambda v, x: bn.batch_norm_backward(x, x, np.zeros(6, np.float32),
                                                                     np.ones(6, np.float32), axis=v), "1", "axis", "an int"),
    "layer_norm_eps": (lambda v, x: bn.layer_norm(x, 3, eps=v), None, "eps", "a float"),
    "rms_norm_eps": (lambda v, x: bn.rms_norm(x, 3, eps=v), "a", "eps", "a float"),
    "group_norm_num_groups": (lambda v, x: bn.group_norm(x, v), 2.0, "num_groups", "an int"),
    "group_norm_eps": (lambda v, x: bn.group_norm(x, 2, eps=v), None, "eps", "a float"),
    "group_norm_axis": (lambda v, x: bn.group_norm(x, 2, axis=v), 1.5, "axis", "an int"),
    "group_norm_backward_num_groups": (lambda v, x: bn.group_norm_backward(x, x, v, *_gn_stats()), 2.0,
                                       "num_groups", "an int"),
    "instance_norm_eps": (lambda v, x: bn.instance_norm(x, eps=v), None, "eps", "a float"),
    "instance_norm_momentum": (lambda v, x: bn.instance_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                             momentum=v), None, "momentum", "a float"),
    "instance_norm_backward_axis": (lambda v, x: bn.instance_norm_backward(x, x, np.zeros((4, 6), np.float32),
                                                                           np.ones((4, 6), np.float32), axis=v),
                                    1.0, "axis", "an int"),
    # bool is an int (and a float) to Python, and a flag passed in a number's place to torch
    "batch_norm_train_axis_bool": (lambda v, x: bn.batch_norm(x, None, None, training=True, axis=v), True,
                                   "axis", "an int"),
    "batch_norm_train_momentum_bool": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                                  training=True, momentum=v), True, "momentum", "a float"),
    "batch_norm_eval_eps_bool": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32), eps=v),
                                 False, "eps", "a float"),
    "batch_norm_stats_axis_bool": (lambda v, x: bn.batch_norm_stats(x, axis=v), True, "axis", "an int"),
    "batch_norm_backward_axis_bool": (lambda v, x: bn.batch_norm_backward(x, x, np.zeros(6, np.float32),
                                                                          np.ones(6, np.float32), axis=v), True,
                                      "axis", "an int"),
    "group_norm_num_groups_bool": (lambda v, x: bn.group_norm(x, v), True, "num_groups", "an int"),
    "group_norm_axis_bool": (lambda v, x: bn.group_norm(x, 2, axis=v), True, "axis", "an int"),
    "instance_norm_axis_bool": (lambda v, x: bn.instance_norm(x, axis=v), True, "axis", "an int"),
    "layer_norm_eps_bool": (lambda v, x: bn.layer_norm(x, 3, eps=v), True, "eps", "a float"),
    "fold_axis": (lambda v, x: bn.fold(trained().eval(), np.ones((3, 2, 1, 1), np.float32), axis=v), 0.0,
                  "axis", "an int"),
    # NumPy's bool too (nanobind's float conversion took it as 1.0)
    "batch_norm_train_momentum_numpy_bool": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32),
                                                                        np.ones(6, np.float32), training=True,
                                                                        momentum=v), np.True_, "momentum", "a float"),
    "batch_norm_eval_eps_numpy_bool": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                                  eps=v), np.True_, "eps", "a float"),
    "layer_norm_eps_numpy_bool": (lambda v, x: bn.layer_norm(x, 3, eps=v), np.True_, "eps", "a float"),
    "group_norm_axis_numpy_bool": (lambda v, x: bn.group_norm(x, 2, axis=v), np.True_, "axis", "an int"),
    # the flags are bools, as torch's functions take them (1 or None ran a call of one mode or the other)
    "batch_norm_training_none": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                            training=v), None, "training", "a bool"),
    "batch_norm_training_int": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                           training=v), 1, "training", "a bool"),
    "batch_norm_training_str": (lambda v, x: bn.batch_norm(x, None, None, training=v), "yes", "training", "a bool"),
    "instance_norm_use_input_stats_int": (lambda v, x: bn.instance_norm(x, use_input_stats=v), 1, "use_input_stats",
                                          "a bool"),
    # momentum is unused in eval, but checked as in training
    "batch_norm_eval_momentum": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                            momentum=v), "a", "momentum", "a float"),
    "batch_norm_eval_momentum_none": (lambda v, x: bn.batch_norm(x, np.zeros(6, np.float32),
                                                                 np.ones(6, np.float32), momentum=v), None,
                                      "momentum", "a float"),
    "instance_norm_eval_momentum": (lambda v, x: bn.instance_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                                  use_input_stats=False, momentum=v), "a",
                                    "momentum", "a float"),
}


def test_momentum_is_taken_in_eval_as_in_training():
    """What the training call takes as momentum (a 0-d array, an integer, NumPy's floats), the
    eval call takes too, though it does not use it."""
    x = _x()
    for momentum in (np.array(0.25), 1, np.float32(0.5)):
        for training in (True, False):
            bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32), training=training, momentum=momentum)
            bn.instance_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32), use_input_stats=training,
                             momentum=momentum)


@pytest.mark.parametrize("name", sorted(SCALAR_CALLS))
def test_scalar_argument_of_the_wrong_type_is_named(name):
    call, bad, arg, kind = SCALAR_CALLS[name]
    x = _x()
    before = x.copy()
    with pytest.raises(TypeError, match=all_of(rf"^{arg} must be {kind}, got {type(bad).__name__}$")):
        call(bad, x)
    np.testing.assert_array_equal(x, before)


# Integers beyond the core's C types: a ValueError naming the argument, not the signature dump.
BIG_INTEGERS = {
    "batch_norm_train_axis": (lambda x: bn.batch_norm(x, None, None, training=True, axis=2 ** 31), "axis"),
    "batch_norm_eval_axis": (lambda x: bn.batch_norm(x, np.zeros(6, np.float32), np.ones(6, np.float32),
                                                     axis=-(2 ** 31) - 1), "axis"),
    "batch_norm_stats_axis": (lambda x: bn.batch_norm_stats(x, axis=2 ** 63), "axis"),
    "group_norm_num_groups": (lambda x: bn.group_norm(x, 2 ** 64), "num_groups"),
    "group_norm_backward_num_groups": (lambda x: bn.group_norm_backward(x, x, 2 ** 63, *_gn_stats()), "num_groups"),
    "instance_norm_axis": (lambda x: bn.instance_norm(x, axis=2 ** 40), "axis"),
}


@pytest.mark.parametrize("name", sorted(BIG_INTEGERS))
def test_integer_beyond_the_core_is_named(name):
    call, arg = BIG_INTEGERS[name]
    x = _x()
    before = x.copy()
    with pytest.raises(ValueError, match=rf"^{arg} -?\d+ is out of range"):
        call(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name):
    exc, pattern, builder = CASES[name]
    call, objs = builder()
    snap = snapshot(*objs)
    threads_before = bn.get_num_threads()
    with pytest.raises(exc, match=pattern):
        call()
    assert_unchanged(snap, *objs)
    assert bn.get_num_threads() == threads_before


def test_battery_size():
    assert len(CASES) >= 40


def test_failed_forward_keeps_saved_forward():
    """A failed forward must not replace what backward uses."""
    m = trained()
    x = f32(4, 3, 5, 5, seed=9)
    m(x)
    g = f32(4, 3, 5, 5, seed=10)
    gx = m.backward(g)
    with pytest.raises(TypeError):
        m(x.astype(np.float64))
    with pytest.raises(ValueError):
        m(f32(2, 4, 5, 5))
    np.testing.assert_array_equal(m.backward(g), gx)


def test_failed_calls_do_not_count_batches():
    m = bn.BatchNorm1d(3)
    m(f32(4, 3))
    for bad in (f32(1, 3), f32(4, 2), f32(4, 3).astype(np.float64)):
        with pytest.raises((TypeError, ValueError)):
            m(bad)
    assert int(m.num_batches_tracked) == 1
