"""Group normalization, the counterpart of ``torch.nn.GroupNorm`` and
``torch.nn.functional.group_norm``: each sample's channels are split into ``num_groups``
groups, normalized over (channels of the group, spatial) with per-channel ``weight`` and
``bias``. ``axis`` names the channel axis (-1 for channels-last data)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence, Tuple, overload

import numpy as np
import numpy.typing as npt

from . import _core  # type: ignore[attr-defined, unused-ignore]
from ._norm_base import (
    _NO_BACKWARD_ACTIVATION,
    _check_channels,
    _cpu_device,
    _eps,
    _Module,
    _positive_int,
    _shape_of,
)
from .functional import (ArrayIn, FloatArray, Triple, _integer, _name_the_scalar, _ones_like_params, _relu_flag, _returned,
                         _returned_grads)

__all__ = ["GroupNorm", "group_norm", "group_norm_backward"]

_group_norm: Callable[..., Triple] = _core.group_norm
_group_norm_backward: Callable[..., Triple] = _core.group_norm_backward


def _check_values_per_group(shape: Sequence[int], num_groups: object, axis: object) -> None:
    """torch's check, in its words: F.group_norm refuses an input whose
    ``[N*C // num_groups, num_groups, *spatial]`` holds one value per "channel" (its
    _verify_batch_size: the first and the spatial sizes multiply to 1). That count is
    torch's, lopsided as it is ((2, 4) in 4 groups passes). Arguments that are wrong in other
    ways are left to the kernels' own errors."""
    if (len(shape) < 2 or isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)
            or isinstance(axis, bool) or not isinstance(axis, numbers.Integral)):
        return
    groups, rank = int(num_groups), len(shape)
    if groups <= 0 or not -rank <= int(axis) < rank:
        return
    channel = int(axis) % rank
    # The sizes as given, no int(): torch.export's symbolic sizes would be fixed by it.
    spatial = [d for i, d in enumerate(shape) if i not in (0, channel)]
    first = shape[0] * shape[channel] // groups
    if channel != 0 and first * math.prod(spatial) == 1:
        size = [int(first), groups, *map(int, spatial)]
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


@overload
def group_norm(
    input: npt.NDArray[Any],
    num_groups: int,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
    activation: Optional[str] = ...,
) -> FloatArray: ...
@overload
def group_norm(
    input: ArrayIn,
    num_groups: int,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
    activation: Optional[str] = ...,
) -> Any: ...
def group_norm(
    input: ArrayIn,
    num_groups: int,
    weight: Optional[ArrayIn] = None,
    bias: Optional[ArrayIn] = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
    activation: Optional[str] = None,
) -> Any:
    """Group normalization; equivalent to ``torch.nn.functional.group_norm`` (same
    arguments, same order), plus ``axis``, ``out`` and a fused ``activation``.

    Parameters
    ----------
    input : array (N, C, *) with C on ``axis``, float32, float64, float16 or bfloat16
        (docs/dtypes.md); NumPy or a CPU DLPack producer. C must be divisible by ``num_groups``.
    num_groups : int, groups of C/num_groups consecutive channels sharing statistics.
    weight, bias : (C,) arrays or None (None means 1 and 0).
    eps : float > 0, added to the variance.
    axis : int, the channel axis; -1 for channels-last data.
    out : array, optional; destination with the shape and dtype of ``input`` (may be it).
    activation : None or "relu", applied to the normalized output in the same pass.

    Returns
    -------
    array
        ``out`` itself when given; else a new array of the kind of ``input``.
    """
    relu = activation is not None and _relu_flag(activation)
    _check_values_per_group(_shape_of(input, "input"), num_groups, axis)
    try:
        y = _group_norm(input, num_groups, weight, bias, eps, axis, out, relu)[0]
    except TypeError:
        _name_the_scalar(num_groups=num_groups, eps=eps, axis=axis)
        raise
    return _returned(input, out, y)


@overload
def group_norm_backward(
    grad_y: npt.NDArray[Any],
    x: ArrayIn,
    num_groups: int,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
) -> Triple: ...
@overload
def group_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    num_groups: int,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
) -> Tuple[Any, Any, Any]: ...
def group_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    num_groups: int,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
) -> Tuple[Any, Any, Any]:
    """Gradients of ``group_norm``: ``torch.ops.aten.native_group_norm_backward``.

    ``mean`` and ``invstd = 1/sqrt(var + eps)`` are the forward's (N, num_groups)
    statistics. ``weight`` None means 1.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_x`` like ``x`` (``out`` when given, written in place), the others (C,); new
        arrays are of the kind of ``grad_y``.
    """
    if weight is None:
        _name_the_scalar(axis=axis)  # before it indexes the shape (any integer type; no bool)
        shape = _shape_of(x)
        if len(shape) >= 2 and -len(shape) <= axis < len(shape):  # else the core's error
            weight = _ones_like_params(x, (shape[axis],))
    try:
        grads = _group_norm_backward(grad_y, x, mean, invstd, weight, num_groups, axis, out)
    except TypeError:
        _name_the_scalar(num_groups=num_groups, axis=axis)
        raise
    return _returned_grads(grad_y, out, grads)


class GroupNorm(_Module):
    """Group normalization over (N, C, *) input; equivalent to ``torch.nn.GroupNorm``.

    Statistics come from the input in training and evaluation alike.

    Parameters
    ----------
    num_groups : int
        Groups the channels are split into; must divide ``num_channels``.
    num_channels : int
        C, the channels of the input.
    eps : float
        Added to the variance. Default 1e-5.
    affine : bool
        Learnable per-channel ``weight`` (ones) and ``bias`` (zeros); None when False.
    bias : bool
        With ``affine``, whether there is a ``bias`` (torch's newer argument).
    dtype : float32 or float64 (None: float32, as in torch)
        Dtype of the parameters; the input must have it where there are
        any (a module without them takes either, as torch's does).
    axis : int
        Channel axis of the input; -1 for channels-last data.
    device : None, "cpu" or ``torch.device("cpu")``
        Accepted for torch users; any other device is a ValueError.

    Attributes
    ----------
    weight, bias : (C,) arrays or None
    weight_grad, bias_grad : set by ``backward``
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        bias: bool = True,
        dtype: npt.DTypeLike = np.float32,
        axis: int = 1,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self.num_groups = _positive_int("num_groups", num_groups)
        self.num_channels = _positive_int("num_channels", num_channels)
        if self.num_channels % self.num_groups != 0:
            raise ValueError(
                f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})"
            )
        self.eps = _eps(eps)
        self._init_module(dtype, (self.num_channels,))
        self.axis = _integer("axis", axis)  # any rank >= 2: checked against the input
        self.affine = bool(affine)
        self._init_affine(self.affine, bool(bias))

    def _check_input(self, x: Any) -> None:
        shape = _shape_of(x)
        if len(shape) < 2:
            raise ValueError(
                f"Expected at least 2 dimensions for input tensor but received {len(shape)}"
            )
        _check_channels(shape, self.axis, self.num_channels, "num_channels")
        _check_values_per_group(shape, self.num_groups, self.axis)

    @overload
    def __call__(
        self, x: npt.NDArray[Any], out: Optional[npt.NDArray[Any]] = ..., *, activation: Optional[str] = ...
    ) -> FloatArray: ...
    @overload
    def __call__(
        self, x: ArrayIn, out: Optional[ArrayIn] = ..., *, activation: Optional[str] = ...
    ) -> Any: ...
    def __call__(
        self, x: ArrayIn, out: Optional[ArrayIn] = None, *, activation: Optional[str] = None
    ) -> Any:
        """Normalize ``x`` as the torch module does; ``activation="relu"`` fuses a ReLU
        (no ``backward`` after it). ``out`` may be ``x`` itself (then ``backward`` is
        impossible); ``x`` is kept by reference for ``backward``. Returns ``out`` when
        given, else a new array of the kind of ``x``."""
        self._check_input(x)
        relu = activation is not None and _relu_flag(activation)
        weight, bias = self.__dict__["_weight"], self.__dict__["_bias"]
        groups, axis = self.num_groups, self.axis
        try:
            y, mean, invstd = _group_norm(x, groups, weight, bias, self.eps, axis, out, relu)
        except TypeError:
            self._blame_dtype(x, weight=weight, bias=bias)
            raise
        if relu:
            self._save(x, out, weight, None, _NO_BACKWARD_ACTIVATION)
        else:
            self._save(x, out, weight,
                       lambda gy, o: _group_norm_backward(gy, x, mean, invstd, weight, groups, axis, o))
        return _returned(x, out, y)

    forward = __call__

    def _torch_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )

