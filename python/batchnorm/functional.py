"""Functional batch normalization, the counterpart of ``torch.nn.functional.batch_norm``.

Every array check (types, dtypes, shapes, ``out``) happens in ``_core``, in C++, before
any write; this layer only routes the call, so that a call on a tiny input stays cheap.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Tuple, Union

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
_backward: Callable[..., Triple] = _core.backward


def _relu_flag(activation: Optional[str]) -> bool:
    """Map the public ``activation`` argument onto ``_core``'s ``relu`` flag."""
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f'activation must be None or "relu", got {activation!r}')


def _reject_fusion(residual: object, activation: object) -> None:
    """Raise if an inference-only fusion is requested where batch statistics are used."""
    # act(bn(x) + residual) is a one-pass inference kernel; with batch statistics the
    # result would also need its own backward, which this library does not provide.
    if residual is not None:
        raise ValueError("residual is only supported in eval mode with running statistics")
    if activation is not None:
        raise ValueError("activation is only supported in eval mode with running statistics")


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
    out: Optional[npt.NDArray[Any]] = None,
    residual: Optional[ArrayIn] = None,
    activation: Optional[str] = None,
) -> FloatArray:
    """Batch normalization over the channel axis ``axis``.

    Equivalent to ``torch.nn.functional.batch_norm`` (same arguments, same order), plus
    NumPy-style ``axis`` and ``out`` and an inference fusion ``act(bn(x) + residual)``.

    Parameters
    ----------
    input : array, shape (N, C, ...) with C on ``axis``; float32 or float64.
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
    ndarray
        The normalized array (``out`` when given).
    """
    if training:
        if residual is not None or activation is not None:
            _reject_fusion(residual, activation)
        # Positional: _core parses positional arguments faster than keywords.
        return _forward_train(input, weight, bias, running_mean, running_var, momentum, eps, axis, out)[0]
    # torch raises "running_mean must be defined in evaluation mode" here; same words.
    if running_mean is None:
        raise ValueError("running_mean must be defined in evaluation mode (training=False)")
    if running_var is None:
        raise ValueError("running_var must be defined in evaluation mode (training=False)")
    return _forward_eval(
        input, running_mean, running_var, weight, bias, eps, axis, out, residual,
        activation is not None and _relu_flag(activation),  # no call in the common case
    )


def batch_norm_stats(x: ArrayIn, *, axis: int = 1) -> Tuple[FloatArray, FloatArray]:
    """Per-channel mean and biased variance of ``x`` over every axis but ``axis``.

    Equivalent to ``x.mean(dims)`` and ``x.var(dims, unbiased=False)`` in torch, with
    ``dims`` every axis but ``axis``; accurate at large means (float64 merges).

    Returns
    -------
    (mean, var) : two new (C,) arrays of the dtype of ``x``.
    """
    return _stats(x, axis)


def batch_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    axis: int = 1,
) -> Triple:
    """Gradients of a training-mode (batch statistics) batch norm.

    Equivalent to ``torch.ops.aten.native_batch_norm_backward`` with ``train=True``:
    ``mean`` and ``invstd`` are the saved batch mean and ``1/sqrt(var + eps)``.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_x`` like ``x``; ``grad_weight = sum(grad_y*(x - mean))*invstd`` and
        ``grad_bias = sum(grad_y)``, both (C,). ``weight`` None means 1.
    """
    return _backward(grad_y, x, mean, invstd, weight, axis, True)
