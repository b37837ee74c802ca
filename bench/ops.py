"""The timed operations: what each one computes, its copy floor and its target ratio.

Every figure in the report is `time(op) / time(copy floor)`, both measured in the same
cell on the same arrays. The floor is `np.copyto` of the bytes a perfect kernel must move
(DESIGN.md, "Memory traffic is the budget"):

  eval, train, backward   floor = copy x -> out: 1 read + 1 write of x's bytes.
      An ideal eval or channels-first train moves exactly that (ratio 1.0); channels-last
      train and backward must read two tensors (2 reads + 1 write, ratio ~1.5).
  fused eval (residual + relu)   floor = copy x -> out, then copy residual -> out: both
      inputs' bytes read and written once (2 reads + 2 writes) over the op's own three
      arrays, so the floor has the op's cache footprint. The fused kernel moves 2 reads +
      1 write, so its ideal ratio is ~0.75: the write saved by fusing shows below 1.

np.copyto is single-threaded, so at 2 threads the floor stays one core's copy; a ratio
below 1 there means the kernel outran a single-core copy.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .cases import EPS, Arrays, Case

# Targets of the project (issue tracker / DESIGN.md), as multiples of the copy floor.
EVAL_TARGET = 1.1
TRAIN_CHANNELS_FIRST_TARGET = 1.3
TRAIN_CHANNELS_FIRST_BEYOND_L2_TARGET = 1.6
TRAIN_CHANNELS_LAST_TARGET = 2.0
BACKWARD_TARGET = 2.0
# Not a project target: eval's 10 % slack on the fused kernel's ideal 3/4 of its floor.
FUSED_TARGET = EVAL_TARGET * 0.75


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    title: str
    floor_text: str
    target_text: str
    make_floor: Callable[[Arrays], Callable[[], object]]
    target: Callable[[Case, int], float]  # (case, L2 bytes per core) -> ratio
    reference: Callable[[Case, Arrays], np.ndarray]  # float64 expected primary output


def _copy_x(a: Arrays):
    return lambda: np.copyto(a.out, a.x)


def _copy_x_and_residual(a: Arrays):
    def copy_both():
        np.copyto(a.out, a.x)
        np.copyto(a.out, a.residual)

    return copy_both


def _per_channel(case: Case, vector: np.ndarray) -> np.ndarray:
    return vector.astype(np.float64).reshape(case.channel_view_shape)


def _eval_reference(case: Case, a: Arrays) -> np.ndarray:
    alpha = _per_channel(case, a.weight) / np.sqrt(_per_channel(case, a.running_var) + EPS)
    x = a.x.astype(np.float64)
    return (x - _per_channel(case, a.running_mean)) * alpha + _per_channel(case, a.bias)


def _train_reference(case: Case, a: Arrays) -> np.ndarray:
    x = a.x.astype(np.float64)
    mean = x.mean(axis=case.reduce_axes, keepdims=True)
    var = x.var(axis=case.reduce_axes, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * _per_channel(case, a.weight) + _per_channel(
        case, a.bias
    )


def _backward_reference(case: Case, a: Arrays) -> np.ndarray:
    x = a.x.astype(np.float64)
    dy = a.grad_y.astype(np.float64)
    mean = _per_channel(case, a.save_mean)
    invstd = _per_channel(case, a.save_invstd)
    n = case.numel // case.channels
    sum_dy = dy.sum(axis=case.reduce_axes, keepdims=True)
    sum_dy_xmu = (dy * (x - mean)).sum(axis=case.reduce_axes, keepdims=True)
    scale = _per_channel(case, a.weight) * invstd
    return scale * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)


def _fused_reference(case: Case, a: Arrays) -> np.ndarray:
    return np.maximum(_eval_reference(case, a) + a.residual, 0.0)


def _train_target(case: Case, l2_bytes: int) -> float:
    if not case.channels_first_family:
        return TRAIN_CHANNELS_LAST_TARGET
    if case.channel_block_bytes > l2_bytes:
        return TRAIN_CHANNELS_FIRST_BEYOND_L2_TARGET
    return TRAIN_CHANNELS_FIRST_TARGET


OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "eval",
            "eval forward (running stats)",
            "copy x (1R+1W)",
            f"<= {EVAL_TARGET}",
            _copy_x,
            lambda case, l2: EVAL_TARGET,
            _eval_reference,
        ),
        Op(
            "train",
            "training forward (batch stats + running-stat update)",
            "copy x (1R+1W)",
            f"<= {TRAIN_CHANNELS_FIRST_TARGET} channels-first "
            f"(<= {TRAIN_CHANNELS_FIRST_BEYOND_L2_TARGET} if a channel exceeds L2), "
            f"<= {TRAIN_CHANNELS_LAST_TARGET} channels-last and (N,C)",
            _copy_x,
            _train_target,
            _train_reference,
        ),
        Op(
            "backward",
            "backward (grad_x, grad_weight, grad_bias from saved stats)",
            "copy x (1R+1W)",
            f"<= {BACKWARD_TARGET}",
            _copy_x,
            lambda case, l2: BACKWARD_TARGET,
            _backward_reference,
        ),
        Op(
            "fused",
            "fused eval relu(bn(x) + residual)",
            "copy x + copy residual (2R+2W)",
            f"ideal 0.75; <= {FUSED_TARGET:.3g} (derived, not a project target)",
            _copy_x_and_residual,
            lambda case, l2: FUSED_TARGET,
            _fused_reference,
        ),
    )
}


# ---------------------------------------------------------------- the other norms (--family norms)

NORM_FORWARD_TARGET = 1.3  # a row fits in L2 (two reads of it cost one from memory)
NORM_FORWARD_BEYOND_L2_TARGET = 1.6
NORM_BACKWARD_TARGET = 2.0


def _norm_rows(case, a) -> tuple[np.ndarray, np.ndarray]:
    """(xhat, weight broadcast) in float64, xhat as (rows, cols)."""
    rows = a.x.astype(np.float64).reshape(case.rows, -1)
    if case.norm == "rms":
        xhat = rows / np.sqrt((rows**2).mean(axis=1, keepdims=True) + EPS)
    else:
        xhat = (rows - rows.mean(axis=1, keepdims=True)) / np.sqrt(rows.var(axis=1, keepdims=True) + EPS)
    return xhat, a.weight.astype(np.float64).reshape(case.param_shape)


def _norm_forward_reference(case, a) -> np.ndarray:
    xhat, w = _norm_rows(case, a)
    y = xhat.reshape(case.shape) * w
    return y if case.norm == "rms" else y + a.bias.astype(np.float64).reshape(case.param_shape)


def _norm_backward_reference(case, a) -> np.ndarray:
    """grad_x from the saved statistics of x (as the kernels take them)."""
    rows = a.x.astype(np.float64).reshape(case.rows, -1)
    invstd = a.save_invstd.astype(np.float64)[:, None]
    mean = 0.0 if case.norm == "rms" else a.save_mean.astype(np.float64)[:, None]
    xhat = (rows - mean) * invstd
    g = (a.grad_y.astype(np.float64) * a.weight.astype(np.float64).reshape(case.param_shape))
    g = g.reshape(case.rows, -1)
    centred = g if case.norm == "rms" else g - g.mean(axis=1, keepdims=True)
    return (invstd * (centred - xhat * (g * xhat).mean(axis=1, keepdims=True))).reshape(case.shape)


def _norm_forward_target(case, l2_bytes: int) -> float:
    return NORM_FORWARD_TARGET if case.group_bytes <= l2_bytes else NORM_FORWARD_BEYOND_L2_TARGET


NORM_OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op("norm_forward", "LayerNorm / RMSNorm / GroupNorm / InstanceNorm forward (batch statistics)",
           "copy x (1R+1W)",
           f"<= {NORM_FORWARD_TARGET} where a row fits in L2, <= {NORM_FORWARD_BEYOND_L2_TARGET} otherwise",
           _copy_x, _norm_forward_target, _norm_forward_reference),
        Op("norm_backward", "LayerNorm / RMSNorm / GroupNorm / InstanceNorm backward (grad_x, grad_weight, "
           "grad_bias from saved statistics)", "copy x (1R+1W)", f"<= {NORM_BACKWARD_TARGET}",
           _copy_x, lambda case, l2: NORM_BACKWARD_TARGET, _norm_backward_reference),
    )
}
