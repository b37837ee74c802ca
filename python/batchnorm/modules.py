"""Stateful batch-norm layers with the semantics of ``torch.nn.BatchNorm1d/2d/3d``.

A module owns its parameters and running statistics as NumPy arrays; ``_core`` reads
them (and updates the running statistics) in place, so ``m.weight[:] = ...`` is seen by
the next call. Every check runs before the first write: a failed call changes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, overload

import numpy as np
import numpy.typing as npt

from . import _core
from ._norm_base import IncompatibleKeys, _check_channels, _cpu_device, _eval_saved, _NormBase, _shape_of
from ._norm_base import _to_numpy as _to_numpy  # fold.py takes it from here
from .functional import (
    ArrayIn,
    FloatArray,
    _backward,
    _forward_eval,
    _forward_train,
    _like,
    _ndarray,
    _reject_fusion,
    _relu_flag,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "IncompatibleKeys"]

# __call__ in eval mode on a NumPy input, or None where the method's Python must run
_module_eval: Callable[..., Optional[FloatArray]] = _core.module_eval

_NO_BACKWARD_FUSED = "backward is not available after a forward with residual or activation"


class _BatchNorm(_NormBase):
    """Shared implementation of BatchNorm1d/2d/3d; subclasses set the accepted ranks."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        bias: bool = True,
        dtype: npt.DTypeLike = np.float32,
        axis: int = 1,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self._init_norm_base(num_features, eps, momentum, affine, track_running_stats, dtype, axis, bias)

    # ---- forward / backward -----------------------------------------------------------

    def _check_input(self, x: Any) -> bool:
        """Check type, rank and channel count like torch; return whether ``x`` is empty."""
        shape = _shape_of(x)
        self._check_rank(shape)
        _check_channels(shape, self.axis, self.num_features, "num_features")
        return 0 in shape

    @overload
    def __call__(
        self,
        x: npt.NDArray[Any],
        out: Optional[npt.NDArray[Any]] = ...,
        *,
        residual: Optional[ArrayIn] = ...,
        activation: Optional[str] = ...,
    ) -> FloatArray: ...
    @overload
    def __call__(
        self,
        x: ArrayIn,
        out: Optional[ArrayIn] = ...,
        *,
        residual: Optional[ArrayIn] = ...,
        activation: Optional[str] = ...,
    ) -> Any: ...
    def __call__(
        self,
        x: ArrayIn,
        out: Optional[ArrayIn] = None,
        *,
        residual: Optional[ArrayIn] = None,
        activation: Optional[str] = None,
    ) -> Any:
        """Normalize ``x``; same result and state updates as the torch module's forward.

        Parameters
        ----------
        x : array with the channels on ``axis`` (NumPy or a CPU DLPack producer).
        out : array, optional
            Destination; may be ``x`` itself (then ``backward`` is impossible).
        residual, activation : optional
            Inference fusion ``act(bn(x) + residual)``, act in {None, "relu"}; only in
            eval mode with running statistics (no ``backward`` after it).

        Returns
        -------
        array
            ``out`` itself when given; else a new array of the kind of ``x`` (a torch
            tensor for a torch tensor, zero-copy) in the memory layout of ``x``.

        Notes
        -----
        ``x`` is kept (by reference) for ``backward``: modifying it in place before
        ``backward`` changes the gradient. Training updates the running statistics
        and ``num_batches_tracked``; a zero-size batch changes no state.
        """
        if residual is None and activation is None:  # inference's per-call path, in C++
            y = _module_eval(self, x, out)
            if y is not None:
                return y
        # _check_input, inline for a NumPy input that passes (the per-call path: each call
        # saved is a few percent of a small eval); any other input, or a failing check, there.
        shape = x.shape if type(x) is _ndarray else ()
        rank, axis = len(shape), self.axis
        try:
            fits = rank in self._ranks and -rank <= axis < rank and shape[axis] == self.num_features
        except TypeError:  # an axis that is not an integer: _check_input names it
            fits = False
        empty = 0 in shape if fits else self._check_input(x)
        # The attributes' own slots, read directly: this is the per-call path, and each
        # descriptor lookup costs as much as a tenth of a small eval.
        state = self.__dict__
        weight, bias = state["_weight"], state["_bias"]
        running_mean, running_var = state["_running_mean"], state["_running_var"]
        # torch: bn_training = training or (running_mean is None and running_var is None)
        training = state["training"]
        if training or (running_mean is None and running_var is None):
            if residual is not None or activation is not None:
                _reject_fusion(residual, activation)
            tracking = state["track_running_stats"]
            counter = state["_num_batches_tracked"] if tracking and training else None
            if not tracking:  # torch passes no running stats then
                running_mean = running_var = None
            momentum = state["momentum"]
            try:
                y, mean, invstd = _forward_train(
                    x, weight, bias, running_mean, running_var,
                    self._momentum_factor(counter) if momentum is None else momentum, state["eps"], axis, out,
                )
            except TypeError:
                self._blame_dtype(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
                raise
            # Only after _core succeeded (a failed call must not count a batch); an empty
            # batch carries no statistics and is not counted either. `[()]`: an in-place add
            # through the scalar, a sixth of the cost of `counter += 1` (a ufunc call).
            if counter is not None and not empty:
                counter[()] += 1
            self._saved = (x, out, None, weight, lambda gy, o: _backward(gy, x, mean, invstd, weight, axis, True, o))
        else:
            fused = residual is not None or activation is not None
            saved = None if fused else state["_eval_stats"]
            if saved is None and not fused:
                saved = _eval_saved(self)
            try:
                y = _forward_eval(
                    x, running_mean, running_var, weight, bias, state["eps"], axis, out, residual,
                    fused and _relu_flag(activation), saved,
                )
            except TypeError:
                self._blame_dtype(x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
                raise
            if fused:
                self._save(x, out, weight, None, _NO_BACKWARD_FUSED)
            else:  # _save, inline: the inference path, where a method call is a twentieth of the call
                self._saved = (x, out, None, weight, saved)
        if type(x) is _ndarray or out is not None:  # NumPy in, or `out` (returned as given)
            return y
        return _like(x, y)

    forward = __call__

    def _momentum_factor(self, counter: Optional[npt.NDArray[Any]]) -> float:
        """torch's exponential_average_factor; ``counter`` is incremented after the batch."""
        if self.momentum is not None:
            return self.momentum
        # momentum=None: cumulative average, factor 1/num_batches_tracked including this batch
        return 0.0 if counter is None else 1.0 / float(counter + 1)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; equivalent to ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance. Default 1e-5.
    momentum : float in [0, 1] or None
        Running-statistics update factor; None means a cumulative average.
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); None when False.
    track_running_stats : bool
        Keep ``running_mean``, ``running_var``, ``num_batches_tracked``; None when False.
    bias : bool
        With ``affine``, whether there is a ``bias`` (torch's keyword, new in 2.x): False
        keeps the ``weight`` alone.
    dtype : float32 or float64 (None: float32, as in torch)
        Dtype of the parameters and buffers (NumPy's, or ``torch.float32`` /
        ``torch.float64``); the input must have it where there are any (a module
        without them takes either, as torch's does).
    axis : int
        Channel axis of the input; -1 for channels-last data.
    device : None, "cpu" or ``torch.device("cpu")``
        Accepted for torch users; any other device is a ValueError.

    Attributes
    ----------
    weight, bias : (C,) arrays or None
    running_mean, running_var : (C,) arrays or None
    num_batches_tracked : 0-d int64 array or None
    weight_grad, bias_grad : (C,) arrays set by ``backward``
    training : bool
    """

    _ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; equivalent to ``torch.nn.BatchNorm2d``.

    Parameters as for ``BatchNorm1d``.
    """

    _ranks = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input; equivalent to ``torch.nn.BatchNorm3d``.

    Parameters as for ``BatchNorm1d``.
    """

    _ranks = (5,)
