"""The normalization family as test data: for each norm, how to build the batchnorm module,
the torch module and the float64 reference of a forward and a backward, so that the
generic tests (tests/test_norm_family.py) run every norm through the same checks.

``axis`` is the channel axis of the data a module gets (1: channels-first, -1:
channels-last); LayerNorm and RMSNorm normalize trailing dims and ignore it. Torch always
gets the channels-first (logical) data; ``to_logical`` maps a result back to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Tuple

import numpy as np

import batchnorm as bn
import reference as ref


@dataclass(frozen=True)
class Spec:
    name: str
    shape: Tuple[int, ...]  # logical (channels-first) input shape
    make: Callable[..., Any]  # (dtype, axis) -> batchnorm module (training mode)
    make_torch: Callable[..., Any]  # (torch, dtype) -> torch module
    # (x64 logical, params as a float64 dict) -> (y, invstd, backward(gy) -> (gx, gw, gb))
    reference: Callable[..., Any]
    channel_axis: bool = True  # whether channels-last layouts apply

    def __str__(self) -> str:
        return self.name


def _params(m):
    return {k: None if getattr(m, k, None) is None else np.asarray(getattr(m, k), np.float64)
            for k in ("weight", "bias")}


def _layer_ref(nd):
    def run(x, p):
        y, mean, invstd = ref.layer_norm(x, nd, p["weight"], p["bias"])
        return y, invstd, lambda gy: ref.layer_norm_backward(gy, x, nd, mean, invstd, p["weight"])
    return run


def _rms_ref(nd, eps):
    def run(x, p):
        y, invstd = ref.rms_norm(x, nd, p["weight"], eps)
        return y, invstd, lambda gy: ref.rms_norm_backward(gy, x, nd, invstd, p["weight"]) + (None,)
    return run


def _group_ref(groups):
    def run(x, p):
        y, mean, invstd = ref.group_norm(x, groups, p["weight"], p["bias"])
        return y, invstd, lambda gy: ref.group_norm_backward(gy, x, groups, mean, invstd, p["weight"])
    return run


def _instance_ref(x, p):
    y, mean, invstd, _, _ = ref.instance_norm(x, None, None, p["weight"], p["bias"])
    return y, invstd, lambda gy: ref.instance_norm_backward(gy, x, mean, invstd, p["weight"])


def _torch_kw(torch, dtype):
    return {"dtype": {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[np.dtype(dtype)]}


SPECS = [
    Spec("LayerNorm-1x768", (1, 768), lambda dt, ax: bn.LayerNorm(768, dtype=dt),
         lambda t, dt: t.nn.LayerNorm(768, **_torch_kw(t, dt)), _layer_ref(1), channel_axis=False),
    Spec("LayerNorm-3x5x(7x6)", (3, 5, 7, 6), lambda dt, ax: bn.LayerNorm((7, 6), dtype=dt),
         lambda t, dt: t.nn.LayerNorm((7, 6), **_torch_kw(t, dt)), _layer_ref(2), channel_axis=False),
    Spec("LayerNorm-nobias", (4, 33), lambda dt, ax: bn.LayerNorm(33, bias=False, dtype=dt),
         lambda t, dt: t.nn.LayerNorm(33, bias=False, **_torch_kw(t, dt)), _layer_ref(1),
         channel_axis=False),
    Spec("RMSNorm-2x4096", (2, 4096), lambda dt, ax: bn.RMSNorm(4096, eps=1e-6, dtype=dt),
         lambda t, dt: t.nn.RMSNorm(4096, eps=1e-6, **_torch_kw(t, dt)), _rms_ref(1, 1e-6),
         channel_axis=False),
    Spec("RMSNorm-3x(5x17)", (3, 5, 17), lambda dt, ax: bn.RMSNorm([5, 17], eps=1e-5, dtype=dt),
         lambda t, dt: t.nn.RMSNorm([5, 17], eps=1e-5, **_torch_kw(t, dt)), _rms_ref(2, 1e-5),
         channel_axis=False),
    Spec("GroupNorm-2x6x5x7-g3", (2, 6, 5, 7), lambda dt, ax: bn.GroupNorm(3, 6, dtype=dt, axis=ax),
         lambda t, dt: t.nn.GroupNorm(3, 6, **_torch_kw(t, dt)), _group_ref(3)),
    Spec("GroupNorm-3x32x17-g8", (3, 32, 17), lambda dt, ax: bn.GroupNorm(8, 32, dtype=dt, axis=ax),
         lambda t, dt: t.nn.GroupNorm(8, 32, **_torch_kw(t, dt)), _group_ref(8)),
    Spec("GroupNorm-4x5-g1", (4, 5), lambda dt, ax: bn.GroupNorm(1, 5, dtype=dt, axis=ax),
         lambda t, dt: t.nn.GroupNorm(1, 5, **_torch_kw(t, dt)), _group_ref(1)),
    Spec("InstanceNorm1d-3x5x17", (3, 5, 17),
         lambda dt, ax: bn.InstanceNorm1d(5, affine=True, dtype=dt, axis=ax),
         lambda t, dt: t.nn.InstanceNorm1d(5, affine=True, **_torch_kw(t, dt)), _instance_ref),
    Spec("InstanceNorm2d-2x3x9x11", (2, 3, 9, 11),
         lambda dt, ax: bn.InstanceNorm2d(3, affine=True, dtype=dt, axis=ax),
         lambda t, dt: t.nn.InstanceNorm2d(3, affine=True, **_torch_kw(t, dt)), _instance_ref),
    Spec("InstanceNorm3d-2x4x3x5x6", (2, 4, 3, 5, 6),
         lambda dt, ax: bn.InstanceNorm3d(4, affine=True, dtype=dt, axis=ax),
         lambda t, dt: t.nn.InstanceNorm3d(4, affine=True, **_torch_kw(t, dt)), _instance_ref),
]


def layouts(spec):
    """(axis, to_data, to_logical) for each layout the norm takes."""
    same = (1, lambda a: np.ascontiguousarray(a), lambda a: np.asarray(a))
    if not spec.channel_axis:
        return [same]
    last = (-1, lambda a: np.ascontiguousarray(np.moveaxis(a, 1, -1)), lambda a: np.moveaxis(np.asarray(a), -1, 1))
    return [same, last]


def random_params(rng, module):
    """Random weight and bias in place (when present); returns their float64 values."""
    for name in ("weight", "bias"):
        array = getattr(module, name, None)
        if array is not None:
            array[...] = rng.uniform(0.5, 1.5, array.shape) * rng.choice([-1.0, 1.0], array.shape)
    return _params(module)


def param_sum(module, a):
    """Per-parameter sum of a logical (channels-first) float64 array: over the leading dims
    for a trailing-dims norm, over everything but channel 1 for a channel norm."""
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return np.asarray(a).reshape((-1,) + tuple(shape)).sum(axis=0)
    return ref.per_channel(a, 1).sum(axis=0)
