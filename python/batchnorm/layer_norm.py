"""Layer normalization and RMS normalization, the counterparts of ``torch.nn.LayerNorm`` /
``torch.nn.RMSNorm`` and ``torch.nn.functional.layer_norm`` / ``rms_norm``.

Both normalize every sample over its trailing ``normalized_shape`` dims; RMSNorm divides by
the root mean square without subtracting the mean. The functional forms add ``out=`` and an
inference fusion that normalizes ``x + residual`` in the same pass, optionally writing the
sum to ``sum_out`` (ONNX Runtime's SkipLayerNormalization, the transformer residual add).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

from . import _core  # type: ignore[attr-defined, unused-ignore]
from ._norm_base import _cpu_device, _dtype_name, _eps, _Module, _shape_of
from .functional import ArrayIn, FloatArray, Triple, _integer, _name_the_scalar, _ones_like_params, _returned, _returned_grads

__all__ = [
    "LayerNorm",
    "RMSNorm",
    "layer_norm",
    "rms_norm",
    "layer_norm_backward",
    "rms_norm_backward",
]

ShapeLike = Union[int, Sequence[int]]

_layer_norm: Callable[..., Triple] = _core.layer_norm
_layer_norm_backward: Callable[..., Triple] = _core.layer_norm_backward


def _normalized_shape(normalized_shape: object) -> Tuple[int, ...]:
    """torch's rule: an int is a 1-element shape; a sequence of ints otherwise, non-empty."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    elif not isinstance(normalized_shape, Sequence) or isinstance(normalized_shape, str):
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}"
        )
    shape = tuple(_integer("normalized_shape", d) for d in normalized_shape)
    if not shape:
        raise ValueError(
            "Expected normalized_shape to be at least 1-dimensional, i.e., containing at "
            "least one element, but got normalized_shape = []"
        )
    if any(d < 0 for d in shape):  # zero is torch's too: an empty input normalized to an empty output
        raise ValueError(f"normalized_shape must hold sizes >= 0, got {list(shape)}")
    return shape


def _check_trailing(input: Any, shape: Tuple[int, ...], name: str = "input") -> None:
    """torch's check (and words): the trailing dims of ``input`` (the argument ``name``) are
    ``normalized_shape``."""
    size = _shape_of(input, name)
    if len(size) < len(shape) or size[len(size) - len(shape):] != shape:
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected {name} with shape "
            f"[*, {', '.join(map(str, shape))}], but got {name} of size{list(size)}"
        )


def _machine_eps(input: Any) -> float:
    """torch's ``eps=None`` for RMSNorm: the machine epsilon of the type the input is computed
    in, its own dtype or float32 for float16 and bfloat16 (torch's opmath type)."""
    name = _dtype_name(input)  # by name: torch's and ml_dtypes' bfloat16 are no NumPy dtypes np.finfo knows
    if name in ("float16", "bfloat16"):
        name = "float32"
    if name not in ("float32", "float64"):
        raise TypeError(f"input must be float32, float64, float16 or bfloat16, got {name}")
    return float(np.finfo(name).eps)


@overload
def layer_norm(
    input: npt.NDArray[Any],
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    eps: float = ...,
    *,
    out: Optional[npt.NDArray[Any]] = ...,
    residual: Optional[ArrayIn] = ...,
    sum_out: Optional[ArrayIn] = ...,
) -> FloatArray: ...
@overload
def layer_norm(
    input: ArrayIn,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    eps: float = ...,
    *,
    out: Optional[ArrayIn] = ...,
    residual: Optional[ArrayIn] = ...,
    sum_out: Optional[ArrayIn] = ...,
) -> Any: ...
def layer_norm(
    input: ArrayIn,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = None,
    bias: Optional[ArrayIn] = None,
    eps: float = 1e-5,
    *,
    out: Optional[ArrayIn] = None,
    residual: Optional[ArrayIn] = None,
    sum_out: Optional[ArrayIn] = None,
) -> Any:
    """Layer normalization over the trailing ``normalized_shape`` dims of ``input``.

    Equivalent to ``torch.nn.functional.layer_norm`` (same arguments, same order), plus
    ``out`` and a fused residual add.

    Parameters
    ----------
    input : array (*, *normalized_shape), float32, float64, float16 or bfloat16 (docs/dtypes.md);
        NumPy or a CPU DLPack producer.
    normalized_shape : int or sequence of ints, the trailing dims normalized together.
    weight, bias : arrays of shape ``normalized_shape`` or None (None means 1 and 0).
    eps : float > 0, added to the variance.
    out : array, optional; destination with the shape and dtype of ``input`` (may be it).
    residual : array like ``input``, optional; then the result is ``LN(input + residual)``.
    sum_out : array like ``input``, optional (with ``residual``); receives ``input + residual``.

    Returns
    -------
    array
        ``out`` itself when given; else a new array of the kind of ``input``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_trailing(input, shape)
    try:
        y = _layer_norm(input, len(shape), weight, bias, eps, False, out, residual, sum_out)[0]
    except TypeError:
        _name_the_scalar(eps=eps)
        raise
    return _returned(input, out, y)


@overload
def rms_norm(
    input: npt.NDArray[Any],
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = ...,
    eps: Optional[float] = ...,
    *,
    out: Optional[npt.NDArray[Any]] = ...,
    residual: Optional[ArrayIn] = ...,
    sum_out: Optional[ArrayIn] = ...,
) -> FloatArray: ...
@overload
def rms_norm(
    input: ArrayIn,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = ...,
    eps: Optional[float] = ...,
    *,
    out: Optional[ArrayIn] = ...,
    residual: Optional[ArrayIn] = ...,
    sum_out: Optional[ArrayIn] = ...,
) -> Any: ...
def rms_norm(
    input: ArrayIn,
    normalized_shape: ShapeLike,
    weight: Optional[ArrayIn] = None,
    eps: Optional[float] = None,
    *,
    out: Optional[ArrayIn] = None,
    residual: Optional[ArrayIn] = None,
    sum_out: Optional[ArrayIn] = None,
) -> Any:
    """RMS normalization ``x / sqrt(mean(x**2) + eps) * weight`` over the trailing
    ``normalized_shape`` dims; equivalent to ``torch.nn.functional.rms_norm``.

    ``eps=None`` is the machine epsilon of the input's dtype, as in torch. ``out``,
    ``residual`` and ``sum_out`` as for ``layer_norm``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_trailing(input, shape)
    eps = _machine_eps(input) if eps is None else eps
    try:
        y = _layer_norm(input, len(shape), weight, None, eps, True, out, residual, sum_out)[0]
    except TypeError:
        _name_the_scalar(eps=eps)
        raise
    return _returned(input, out, y)


@overload
def layer_norm_backward(
    grad_y: npt.NDArray[Any],
    x: ArrayIn,
    normalized_shape: ShapeLike,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    out: Optional[npt.NDArray[Any]] = ...,
) -> Triple: ...
@overload
def layer_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    normalized_shape: ShapeLike,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    out: Optional[ArrayIn] = ...,
) -> Tuple[Any, Any, Any]: ...
def layer_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    normalized_shape: ShapeLike,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    out: Optional[ArrayIn] = None,
) -> Tuple[Any, Any, Any]:
    """Gradients of ``layer_norm``: ``torch.ops.aten.native_layer_norm_backward``.

    ``mean`` and ``invstd = 1/sqrt(var + eps)`` are the forward's per-sample statistics, of
    shape ``x.shape[:-len(normalized_shape)]``. ``weight`` None means 1.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_x`` like ``x`` (``out`` when given, written in place); the others of shape
        ``normalized_shape``. New arrays are of the kind of ``grad_y``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_trailing(x, shape, "x")
    if weight is None:
        weight = _ones_like_params(x, shape)
    grads = _layer_norm_backward(grad_y, x, mean, invstd, weight, len(shape), False, out)
    return _returned_grads(grad_y, out, grads)


@overload
def rms_norm_backward(
    grad_y: npt.NDArray[Any],
    x: ArrayIn,
    normalized_shape: ShapeLike,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    out: Optional[npt.NDArray[Any]] = ...,
) -> Tuple[FloatArray, FloatArray]: ...
@overload
def rms_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    normalized_shape: ShapeLike,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    out: Optional[ArrayIn] = ...,
) -> Tuple[Any, Any]: ...
def rms_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    normalized_shape: ShapeLike,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    out: Optional[ArrayIn] = None,
) -> Tuple[Any, Any]:
    """Gradients of ``rms_norm``; ``invstd = 1/sqrt(mean(x**2) + eps)`` per sample.

    Returns
    -------
    (grad_x, grad_weight): ``grad_x`` is ``out`` when given (written in place); new arrays
    are of the kind of ``grad_y``.
    """
    shape = _normalized_shape(normalized_shape)
    _check_trailing(x, shape, "x")
    if weight is None:
        weight = _ones_like_params(x, shape)
    grads = _layer_norm_backward(grad_y, x, None, invstd, weight, len(shape), True, out)
    return _returned_grads(grad_y, out, grads[:2])


class _LayerNormBase(_Module):
    """LayerNorm and RMSNorm: parameters of ``normalized_shape``, statistics per sample."""

    _rms = False
    eps: Optional[float]

    def _init_layer(self, normalized_shape: ShapeLike, dtype: npt.DTypeLike) -> None:
        self.normalized_shape = _normalized_shape(normalized_shape)
        self._init_module(dtype, self.normalized_shape)

    @overload
    def __call__(self, x: npt.NDArray[Any], out: Optional[npt.NDArray[Any]] = ...) -> FloatArray: ...
    @overload
    def __call__(self, x: ArrayIn, out: Optional[ArrayIn] = ...) -> Any: ...
    def __call__(self, x: ArrayIn, out: Optional[ArrayIn] = None) -> Any:
        """Normalize ``x`` over its trailing ``normalized_shape`` dims, as the torch module.

        ``out`` may be ``x`` itself (then ``backward`` is impossible); ``x`` is kept by
        reference for ``backward``. Returns ``out`` when given, else a new array of the
        kind of ``x``.
        """
        shape = self.normalized_shape
        _check_trailing(x, shape)
        eps = _machine_eps(x) if self.eps is None else self.eps
        weight, bias = self.__dict__["_weight"], self.__dict__["_bias"]
        try:
            y, mean, invstd = _layer_norm(x, len(shape), weight, bias, eps, self._rms, out)
        except TypeError:
            self._blame_dtype(x, weight=weight, bias=bias)
            raise
        nd, rms = len(shape), self._rms
        self._save(x, out, weight,
                   lambda gy, o: _layer_norm_backward(gy, x, mean, invstd, weight, nd, rms, o))
        return _returned(x, out, y)

    forward = __call__


class LayerNorm(_LayerNormBase):
    """Layer normalization; equivalent to ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or sequence of ints
        The trailing dims of the input normalized together.
    eps : float
        Added to the variance. Default 1e-5.
    elementwise_affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros) of ``normalized_shape``; None when False.
    bias : bool
        With ``elementwise_affine``, whether there is a ``bias``.
    dtype : float32 or float64 (None: float32, as in torch)
        Dtype of the parameters; the input must have it where there are
        any (a module without them takes either, as torch's does).
    device : None, "cpu" or ``torch.device("cpu")``
        Accepted for torch users; any other device is a ValueError.

    Attributes
    ----------
    weight, bias : arrays of ``normalized_shape`` or None
    weight_grad, bias_grad : set by ``backward``
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        *,
        dtype: npt.DTypeLike = np.float32,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self._init_layer(normalized_shape, dtype)
        self.eps = _eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(self.elementwise_affine, bool(bias))

    def _torch_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(_LayerNormBase):
    """Root-mean-square normalization; equivalent to ``torch.nn.RMSNorm``.

    Parameters
    ----------
    normalized_shape : int or sequence of ints
        The trailing dims of the input normalized together.
    eps : float or None
        Added to the mean square; None (default) is the machine epsilon of the input's dtype.
    elementwise_affine : bool
        Learnable ``weight`` (ones) of ``normalized_shape``; None when False.
    dtype : float32 or float64 (None: float32, as in torch)
        Dtype of the parameters; the input must have it where there are
        any (a module without them takes either, as torch's does).
    device : None, "cpu" or ``torch.device("cpu")``
        Accepted for torch users; any other device is a ValueError.

    Attributes
    ----------
    weight : array of ``normalized_shape`` or None (``bias`` is always None)
    weight_grad : set by ``backward``
    """

    _state_keys = ("weight",)
    _rms = True

    def __init__(
        self,
        normalized_shape: ShapeLike,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        *,
        dtype: npt.DTypeLike = np.float32,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self._init_layer(normalized_shape, dtype)
        self.eps = None if eps is None else _eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine(self.elementwise_affine, False)

    def _torch_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )
