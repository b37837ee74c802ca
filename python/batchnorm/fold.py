"""Fold an eval-mode batch norm into the preceding convolution or linear layer."""

from __future__ import annotations

from typing import Any, Optional, Tuple, overload

import numpy as np
import numpy.typing as npt

from .functional import _like, _name_the_scalar
from ._norm_base import _array_like
from .modules import _BatchNorm, _to_numpy

__all__ = ["fold"]


def _check_floating(a: npt.NDArray[Any], name: str) -> None:
    # ml_dtypes' bfloat16 is a floating type NumPy does not class as np.floating
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")


@overload
def fold(
    m: _BatchNorm,
    weight: npt.NDArray[Any],
    bias: Optional[Any] = ...,
    *,
    axis: int = ...,
) -> Tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
@overload
def fold(
    m: _BatchNorm,
    weight: Any,
    bias: Optional[Any] = ...,
    *,
    axis: int = ...,
) -> Tuple[Any, Any]: ...
def fold(
    m: _BatchNorm,
    weight: Any,
    bias: Optional[Any] = None,
    *,
    axis: int = 0,
) -> Tuple[Any, Any]:
    """Fold eval-mode batch norm ``m`` into the layer that feeds it.

    With ``alpha = m.weight / sqrt(m.running_var + m.eps)``, returns
    ``W' = W * alpha`` (broadcast along ``axis``) and
    ``b' = (b - m.running_mean) * alpha + m.bias``, so that
    ``bn(layer(x)) == layer'(x)`` in eval mode. This is what
    ``torch.nn.utils.fusion.fuse_conv_bn_weights`` computes.

    Parameters
    ----------
    m : BatchNorm1d/2d/3d in eval mode, with running statistics: batchnorm's NumPy
        modules, or torch's ``torch.nn.BatchNorm1d/2d/3d`` (also ``batchnorm.torch``'s).
    weight : array
        The layer's weight, output channels on ``axis`` (0 for Conv/Linear,
        1 for ConvTranspose): a NumPy array, a torch tensor (also a ``Parameter``) or
        another DLPack producer.
    bias : (C,) array or None
        The layer's bias; None means 0.
    axis : int
        Output-channel axis of ``weight``.

    Returns
    -------
    (weight, bias) : new arrays of ``weight``'s dtype and kind (torch tensors for a
        torch weight), computed in float64.
    """
    if not all(hasattr(m, name) for name in ("running_mean", "running_var", "num_features", "training")):
        raise TypeError(f"m must be a batch norm module (batchnorm's or torch's BatchNorm1d/2d/3d), "
                        f"got {type(m).__name__}")
    # No running statistics first: eval() would not help such a module.
    if m.running_mean is None or m.running_var is None:
        raise ValueError("m: fold needs running statistics, and this batch norm has no running "
                         "statistics (it was made with track_running_stats=False)")
    if m.training:
        raise ValueError("m: fold needs an eval-mode batch norm (call m.eval() first)")
    if not _array_like(weight):
        raise TypeError(f"weight: expected an array, got {type(weight).__name__}")
    w = _to_numpy(weight, "weight")
    _check_floating(w, "weight")
    channels = m.num_features
    _name_the_scalar(axis=axis)
    if w.ndim == 0 or not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis: {axis} is out of range for weight of shape {w.shape}")
    if w.shape[axis] != channels:
        raise ValueError(
            f"weight: expected {channels} output channels on axis {axis}, got shape {w.shape}"
        )
    if bias is not None and not _array_like(bias):
        raise TypeError(f"bias: expected an array or None, got {type(bias).__name__}")
    b = np.zeros(channels) if bias is None else _to_numpy(bias, "bias")
    if bias is not None:
        _check_floating(b, "bias")
    if b.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {b.shape}")

    # a NumPy module's arrays, or a torch module's tensors (plain or batchnorm.torch)
    mean = _to_numpy(m.running_mean, "m").astype(np.float64)
    alpha = 1.0 / np.sqrt(_to_numpy(m.running_var, "m").astype(np.float64) + m.eps)
    if m.weight is not None:
        alpha *= _to_numpy(m.weight, "m")
    shift = 0.0 if m.bias is None else _to_numpy(m.bias, "m").astype(np.float64)
    broadcast = [1] * w.ndim
    broadcast[axis] = channels
    folded_weight = w.astype(np.float64) * alpha.reshape(broadcast)
    folded_bias = (b.astype(np.float64) - mean) * alpha + shift
    new_weight, new_bias = folded_weight.astype(w.dtype), folded_bias.astype(w.dtype)
    if type(weight) is np.ndarray:
        return new_weight, new_bias
    return _like(weight, new_weight), _like(weight, new_bias)
