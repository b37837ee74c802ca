"""Functional batch normalization, the counterpart of ``torch.nn.functional.batch_norm``.

Every array check (types, dtypes, shapes, ``out``) happens in ``_core``, in C++, before
any write; this layer only routes the call, so that a call on a tiny input stays cheap.

Results come back as the kind of array the call was given (see ``_like``): ``_core`` reads
any CPU DLPack producer in place and writes new NumPy arrays, which are handed back as
zero-copy views of the caller's kind (a torch tensor for a torch tensor). NumPy input takes
the shortest path: one ``type(x) is ndarray`` test.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable, Dict, Optional, Protocol, Tuple, Union, cast, overload

import numpy as np
import numpy.typing as npt

from . import _core  # type: ignore[attr-defined, unused-ignore]

__all__ = ["batch_norm", "batch_norm_stats", "batch_norm_backward"]


class SupportsDLPack(Protocol):
    """Anything ``_core`` can read: a NumPy array or a DLPack producer (a torch CPU tensor)."""

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any: ...


ArrayIn = Union[npt.NDArray[Any], SupportsDLPack]
FloatArray = npt.NDArray[np.floating[Any]]
Triple = Tuple[FloatArray, FloatArray, FloatArray]

# Typed handles on the untyped extension, bound once: one global lookup per call.
_forward_train: Callable[..., Triple] = _core.forward_train
_forward_eval: Callable[..., FloatArray] = _core.forward_eval
_stats: Callable[..., Tuple[FloatArray, FloatArray]] = _core.stats
# (its parameter gradients are None only with parameters=False, which only the drop-ins pass)
_backward = cast(Callable[..., Triple], _core.backward)
_ndarray = np.ndarray

# type of a source array -> how a new NumPy array becomes that kind of array (zero-copy)
_WRAPPERS: Dict[type, Callable[[FloatArray], Any]] = {}


def _as_numpy(array: FloatArray) -> FloatArray:
    return array


def _torch_from_numpy(array: FloatArray) -> Any:
    """``torch.from_numpy``, also for bfloat16 results, which torch cannot take from NumPy:
    ml_dtypes' bfloat16 (kind "V") or, without ml_dtypes, its bits as uint16 (kind "u")."""
    torch = sys.modules["torch"]
    if array.dtype.kind in "Vu":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _wrapper_for(source: object) -> Callable[[FloatArray], Any]:
    """How to hand a NumPy result back as the kind of ``source``, without a copy.

    torch tensors (and subclasses: ``Parameter``, a user's own): ``torch.from_numpy``, a
    plain tensor that keeps the strides, so a channels_last input gives a channels_last result. Array API objects
    (JAX, ...): their namespace's ``from_dlpack``. NumPy subclasses and anything else: the
    NumPy array itself.
    """
    kind = type(source)
    if issubclass(kind, np.ndarray):
        return _as_numpy
    if any(base.__module__.partition(".")[0] == "torch" for base in kind.__mro__):  # torch made `source`
        return _torch_from_numpy
    namespace = getattr(source, "__array_namespace__", None)
    if namespace is not None:
        from_dlpack = getattr(namespace(), "from_dlpack", None)
        if callable(from_dlpack):
            return from_dlpack  # type: ignore[no-any-return]
    return _as_numpy


def _like(source: object, array: FloatArray) -> Any:
    """``array`` (new, written by ``_core``) as the kind of array ``source`` is; no copy."""
    wrap = _WRAPPERS.get(type(source))
    if wrap is None:
        wrap = _WRAPPERS[type(source)] = _wrapper_for(source)
    return wrap(array)


def _returned(source: object, out: object, array: Any) -> Any:
    """What a call returns: ``out`` when given (written in place), else ``array`` as the
    kind of ``source`` (see ``_like``)."""
    if out is not None:
        return out
    if type(source) is _ndarray:
        return array
    return _like(source, array)


def _returned_all(source: object, arrays: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Several new arrays (gradients, statistics) as the kind of ``source``; None kept."""
    if type(source) is _ndarray:
        return arrays
    return tuple(None if a is None else _like(source, a) for a in arrays)


def _returned_grads(grad_y: object, out: object, grads: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """A backward's gradients: ``grad_x`` is ``out`` when given (written in place), and
    every other one (and ``grad_x`` without ``out``) is of the kind of ``grad_y``."""
    if out is None:
        return _returned_all(grad_y, grads)
    return (out, *_returned_all(grad_y, grads[1:]))


def _ones_like_params(x: object, shape: Tuple[int, ...]) -> FloatArray:
    """A backward's ``weight`` None, as ones of ``shape`` in the parameter dtype ``x`` takes
    (float64 for float64 input, else float32): the core returns no parameter gradients without
    a weight, and "None means 1" promises those of an implicit weight of ones (and of the bias,
    which a layer with a bias and no weight needs, as torch's autograd gives it)."""
    wide = str(getattr(x, "dtype", "")) in ("float64", "torch.float64")
    return np.ones(shape, np.float64 if wide else np.float32)


def _relu_flag(activation: Optional[str]) -> bool:
    """Map the public ``activation`` argument onto ``_core``'s ``relu`` flag."""
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f'activation must be None or "relu", got {activation!r}')


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _flag(name: str, value: object) -> bool:
    """A bool (or NumPy's) argument's value; anything else is a TypeError, as torch's."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _momentum(value: object) -> float:
    """momentum, checked as the training call checks it: what the core takes as a float (a
    number, a 0-d array; not a bool or None) in [0, 1]."""
    try:
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError
        momentum = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"momentum must be a float, got {type(value).__name__}") from None
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return momentum


# The integers the core takes as 64-bit; the others (``axis``) are C ints.
_INT64_SCALARS = ("num_groups",)


def _name_the_scalar(**scalars: object) -> None:
    """After ``_core`` refused a call's argument types (nanobind's message then lists the
    core's signatures): raises the TypeError of ``_real`` (``eps``, ``momentum``) or
    ``_integer`` (the others) for the scalar argument of the wrong type, if one is, or a
    ValueError for an integer beyond the core's C type; else returns, and the caller
    re-raises nanobind's. Called only on that failure, so the calls that succeed pay
    nothing for it."""
    try:
        for name, value in scalars.items():
            if name in ("eps", "momentum"):
                _real(name, value)
                continue
            bits = 63 if name in _INT64_SCALARS else 31
            if not -(2 ** bits) <= _integer(name, value) < 2 ** bits:
                raise ValueError(f"{name} {value} is out of range")
    except (TypeError, ValueError) as error:
        raise error from None  # not "during handling of" nanobind's error


def _reject_fusion(residual: object, activation: Optional[str]) -> None:
    """Raise if an inference-only fusion is requested where batch statistics are used."""
    # act(bn(x) + residual) is a one-pass inference kernel; with batch statistics the
    # result would also need its own backward, which this library does not provide.
    _relu_flag(activation)  # a value that is wrong anywhere: that error first
    if residual is not None:
        raise ValueError("residual is only supported in eval mode with running statistics")
    if activation is not None:
        raise ValueError("activation is only supported in eval mode with running statistics")


@overload
def batch_norm(
    input: npt.NDArray[Any],
    running_mean: Optional[ArrayIn],
    running_var: Optional[ArrayIn],
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    training: bool = ...,
    momentum: float = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
    residual: Optional[ArrayIn] = ...,
    activation: Optional[str] = ...,
) -> FloatArray: ...
@overload
def batch_norm(
    input: ArrayIn,
    running_mean: Optional[ArrayIn],
    running_var: Optional[ArrayIn],
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    training: bool = ...,
    momentum: float = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
    residual: Optional[ArrayIn] = ...,
    activation: Optional[str] = ...,
) -> Any: ...
def batch_norm(
    input: ArrayIn,
    running_mean: Optional[ArrayIn],
    running_var: Optional[ArrayIn],
    weight: Optional[ArrayIn] = None,
    bias: Optional[ArrayIn] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
    residual: Optional[ArrayIn] = None,
    activation: Optional[str] = None,
) -> Any:
    """Batch normalization over the channel axis ``axis``.

    Equivalent to ``torch.nn.functional.batch_norm`` (same arguments, same order), plus
    NumPy-style ``axis`` and ``out`` and an inference fusion ``act(bn(x) + residual)``.

    Parameters
    ----------
    input : array, shape (N, C, ...) with C on ``axis``; float32, float64, float16 or bfloat16
        (NumPy's ``ml_dtypes.bfloat16`` or torch's). Half inputs take float32 ``weight``,
        ``bias`` and running statistics and compute in float32 (docs/dtypes.md).
        A NumPy array or any CPU DLPack producer (a torch tensor), read in place.
    running_mean, running_var : (C,) arrays or None.
        Required when ``training`` is False. When ``training`` is True and they are
        given, they are updated in place with ``momentum`` (``running_var`` unbiased).
    weight, bias : (C,) arrays or None (None means 1 and 0).
    training : bool
        Use batch statistics (True) or the running statistics (False).
    momentum : float in [0, 1]
    eps : float > 0
    axis : int
        Channel axis; -1 for channels-last data.
    out : array, optional
        Destination with the shape and dtype of ``input``; may be ``input`` itself.
    residual : array, optional
        Added after normalization (eval only).
    activation : None or "relu"
        Applied last (eval only).

    Returns
    -------
    array
        ``out`` itself when given; else a new array of the kind of ``input`` (NumPy for
        NumPy, a torch tensor for a torch tensor: a zero-copy view of the NumPy array the
        kernels wrote) in the memory layout of ``input``.
    """
    if training is True or (training is not False and _flag("training", training)):
        if residual is not None or activation is not None:
            _reject_fusion(residual, activation)
        if momentum is None:  # torch's F.batch_norm refuses it too; say what to do instead
            raise TypeError("momentum must be a float; the cumulative average (momentum=None) needs "
                            "num_batches_tracked: use a BatchNorm module, or pass 1/num_batches_tracked")
        # Positional: _core parses positional arguments faster than keywords.
        try:
            y = _forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, out)[0]
        except TypeError:
            _name_the_scalar(momentum=momentum, eps=eps, axis=axis)
            raise
    else:
        # torch raises "running_mean must be defined in evaluation mode" here; same words.
        if running_mean is None:
            raise ValueError("running_mean must be defined in evaluation mode (training=False)")
        if running_var is None:
            raise ValueError("running_var must be defined in evaluation mode (training=False)")
        if momentum.__class__ is not float or not 0.0 <= momentum <= 1.0:
            _momentum(momentum)  # unused in eval, but checked as in training
        relu = activation is not None and _relu_flag(activation)  # no call in the common case
        try:
            y = _forward_eval(input, running_mean, running_var, weight, bias, eps, axis, out, residual, relu)
        except TypeError:
            _name_the_scalar(eps=eps, axis=axis)
            raise
    if type(input) is _ndarray or out is not None:  # NumPy in, or `out` (returned as given)
        return y
    return _like(input, y)


@overload
def batch_norm_stats(x: npt.NDArray[Any], *, axis: int = ...) -> Tuple[FloatArray, FloatArray]: ...
@overload
def batch_norm_stats(x: ArrayIn, *, axis: int = ...) -> Tuple[Any, Any]: ...
def batch_norm_stats(x: ArrayIn, *, axis: int = 1) -> Tuple[Any, Any]:
    """Per-channel mean and biased variance of ``x`` over every axis but ``axis``.

    Equivalent to ``x.mean(dims)`` and ``x.var(dims, unbiased=False)`` in torch, with
    ``dims`` every axis but ``axis``; accurate at large means (float64 merges).

    Returns
    -------
    (mean, var) : two new (C,) arrays of the kind of ``x`` (NumPy or torch), in its dtype
        (float32 for float16 and bfloat16 input).
    """
    try:
        moments = _stats(x, axis)
    except TypeError:
        _name_the_scalar(axis=axis)
        raise
    if type(x) is _ndarray:
        return moments
    return _like(x, moments[0]), _like(x, moments[1])


@overload
def batch_norm_backward(
    grad_y: npt.NDArray[Any],
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
) -> Triple: ...
@overload
def batch_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
) -> Tuple[Any, Any, Any]: ...
def batch_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
) -> Tuple[Any, Any, Any]:
    """Gradients of a training-mode (batch statistics) batch norm.

    Equivalent to ``torch.ops.aten.native_batch_norm_backward`` with ``train=True``:
    ``mean`` and ``invstd`` are the saved batch mean and ``1/sqrt(var + eps)``.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_x`` like ``x`` (``out`` when given: written in place, like ``x`` in shape and
        dtype, any strides; it may be ``grad_y`` itself); ``grad_weight =
        sum(grad_y*(x - mean))*invstd`` and ``grad_bias = sum(grad_y)``, both (C,).
        ``weight`` None means 1. New arrays are of the kind of ``grad_y`` (NumPy for NumPy,
        torch tensors for a torch tensor).
    """
    try:
        grads = _backward(grad_y, x, mean, invstd, weight, axis, True, out)
    except TypeError:
        _name_the_scalar(axis=axis)
        raise
    return _returned_grads(grad_y, out, grads)
