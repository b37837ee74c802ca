"""Instance normalization, the counterpart of ``torch.nn.InstanceNorm1d/2d/3d`` and
``torch.nn.functional.instance_norm``: each (sample, channel) is normalized over its spatial
extent; optional running statistics (the mean over the batch of the per-instance
statistics) serve evaluation, as in torch. ``axis`` names the channel axis of the batched
input (-1 for channels-last data)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, List, Mapping, Optional, Tuple, overload

import numpy as np
import numpy.typing as npt

from . import _core  # type: ignore[attr-defined, unused-ignore]
from ._norm_base import (_NO_BACKWARD_ACTIVATION, _cpu_device, _eval_backward, _eval_saved, _NormBase, _shape_of,
                         _to_numpy)
from .functional import (
    ArrayIn,
    FloatArray,
    Triple,
    _forward_eval,
    _flag,
    _integer,
    _momentum,
    _name_the_scalar,
    _ones_like_params,
    _relu_flag,
    _returned,
    _returned_grads,
)

__all__ = [
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "instance_norm",
    "instance_norm_backward",
]

_instance_norm: Callable[..., Triple] = _core.instance_norm
_group_norm_backward: Callable[..., Triple] = _core.group_norm_backward


def _eval_inputs(running_mean: object, running_var: object) -> None:
    if running_mean is None or running_var is None:
        raise ValueError(
            "Expected running_mean and running_var to be defined when use_input_stats is false"
        )


@overload
def instance_norm(
    input: npt.NDArray[Any],
    running_mean: Optional[ArrayIn] = ...,
    running_var: Optional[ArrayIn] = ...,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    use_input_stats: bool = ...,
    momentum: float = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
    activation: Optional[str] = ...,
) -> FloatArray: ...
@overload
def instance_norm(
    input: ArrayIn,
    running_mean: Optional[ArrayIn] = ...,
    running_var: Optional[ArrayIn] = ...,
    weight: Optional[ArrayIn] = ...,
    bias: Optional[ArrayIn] = ...,
    use_input_stats: bool = ...,
    momentum: float = ...,
    eps: float = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
    activation: Optional[str] = ...,
) -> Any: ...
def instance_norm(
    input: ArrayIn,
    running_mean: Optional[ArrayIn] = None,
    running_var: Optional[ArrayIn] = None,
    weight: Optional[ArrayIn] = None,
    bias: Optional[ArrayIn] = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
    activation: Optional[str] = None,
) -> Any:
    """Instance normalization; equivalent to ``torch.nn.functional.instance_norm`` (same
    arguments, same order), plus ``axis``, ``out`` and a fused ``activation``.

    Parameters
    ----------
    input : array (N, C, *) with C on ``axis``, float32, float64, float16 or bfloat16
        (docs/dtypes.md); NumPy or a CPU DLPack producer.
    running_mean, running_var : (C,) arrays or None (both or neither). With
        ``use_input_stats`` they are updated in place with ``momentum`` (the batch mean of
        the per-instance means and unbiased variances); without, they normalize.
    weight, bias : (C,) arrays or None (None means 1 and 0).
    use_input_stats : bool, per-instance statistics (True) or the running ones (False).
    momentum : float in [0, 1]; eps : float > 0.
    axis : int, the channel axis; -1 for channels-last data.
    out : array, optional; destination with the shape and dtype of ``input`` (may be it).
    activation : None or "relu", applied to the normalized output in the same pass.

    Returns
    -------
    array
        ``out`` itself when given; else a new array of the kind of ``input``.
    """
    if use_input_stats is not True and use_input_stats is not False:
        use_input_stats = _flag("use_input_stats", use_input_stats)
    relu = activation is not None and _relu_flag(activation)
    try:
        if use_input_stats:
            y = _instance_norm(input, weight, bias, running_mean, running_var, momentum, eps, axis, out, relu)[0]
        else:
            _eval_inputs(running_mean, running_var)
            if momentum.__class__ is not float or not 0.0 <= momentum <= 1.0:
                _momentum(momentum)  # unused without input statistics, but checked as with them
            y = _forward_eval(input, running_mean, running_var, weight, bias, eps, axis, out, None, relu)
    except TypeError:
        _name_the_scalar(momentum=momentum, eps=eps, axis=axis)
        raise
    return _returned(input, out, y)


@overload
def instance_norm_backward(
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
def instance_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = ...,
    *,
    axis: int = ...,
    out: Optional[ArrayIn] = ...,
) -> Tuple[Any, Any, Any]: ...
def instance_norm_backward(
    grad_y: ArrayIn,
    x: ArrayIn,
    mean: ArrayIn,
    invstd: ArrayIn,
    weight: Optional[ArrayIn] = None,
    *,
    axis: int = 1,
    out: Optional[ArrayIn] = None,
) -> Tuple[Any, Any, Any]:
    """Gradients of ``instance_norm`` with ``use_input_stats=True``.

    ``mean`` and ``invstd = 1/sqrt(var + eps)`` are the forward's (N, C) per-instance
    statistics. ``weight`` None means 1.

    Returns
    -------
    (grad_x, grad_weight, grad_bias)
        ``grad_x`` like ``x`` (``out`` when given, written in place), the others (C,); new
        arrays are of the kind of ``grad_y``.
    """
    _name_the_scalar(axis=axis)  # before it indexes the shape
    shape = _shape_of(x)
    if len(shape) < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {tuple(shape)}")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} is out of range for x of rank {len(shape)}")
    channels = shape[axis]  # an instance is a group of one channel
    if weight is None:
        weight = _ones_like_params(x, (channels,))
    if channels == 0:  # no instance, nothing to differentiate (group norm takes no zero groups)
        if tuple(_shape_of(grad_y, "grad_y")) != tuple(shape):
            raise ValueError(f"grad_y must have the shape of x {tuple(shape)}, got {tuple(_shape_of(grad_y, 'grad_y'))}")
        no_params = np.empty(0, np.asarray(weight).dtype)
        return _returned_grads(grad_y, out, (np.empty(tuple(shape), _to_numpy(x).dtype), no_params, no_params.copy()))
    grads = _group_norm_backward(grad_y, x, mean, invstd, weight, channels, axis, out)
    return _returned_grads(grad_y, out, grads)


def _batch_of_one(value: Any) -> Any:
    """An unbatched array or tensor as a batch of one sample: a view of the same kind, so that
    the kernels' checks (an array, writable, no tensor that requires grad) see what the caller
    passed. Anything else is passed on as it is, for the kernels to refuse by name."""
    if isinstance(value, np.ndarray) or hasattr(value, "__dlpack__"):
        return value[None]
    return value


def _unbatched(grads: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """The backward of a forward that added a batch dim to an unbatched input."""

    def unbatched_grads(grad_y: Any, out: Any) -> Any:
        grad_x, grad_weight, grad_bias = grads(_batch_of_one(grad_y), _batch_of_one(out))
        return grad_x[0], grad_weight, grad_bias

    return unbatched_grads


class _InstanceNorm(_NormBase):
    """Shared implementation of InstanceNorm1d/2d/3d; ``_ranks`` = (unbatched, batched)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        *,
        bias: bool = True,
        dtype: npt.DTypeLike = np.float32,
        axis: int = 1,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self._init_norm_base(num_features, eps, momentum, affine, track_running_stats, dtype, axis, bias)

    def _checkpoint_errors(self, state_dict: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
        """torch's ``_InstanceNorm._load_from_state_dict``: a checkpoint without a version (a
        plain dict, or one saved before torch 0.4, when instance norm tracked running
        statistics by default) holding running statistics for a module that does not track
        them is an error, even when not strict; the keys are not reported as unexpected."""
        metadata = getattr(state_dict, "_metadata", None)
        version = None if metadata is None else metadata.get("", {}).get("version")
        keys = [k for k in ("running_mean", "running_var") if k in state_dict]
        if version is not None or self.track_running_stats or not keys:
            return [], []
        name = type(self).__name__
        names = " and ".join(f'"{k}"' for k in keys)
        return [f"Unexpected running stats buffer(s) {names} for {name} with track_running_stats=False. If "
                "state_dict is a checkpoint saved before 0.4.0, this may be expected because "
                f"{name} does not track running stats by default since 0.4.0. Please remove these keys from "
                "state_dict. If the running stats are actually needed, instead set track_running_stats=True in "
                f"{name} to enable them. See the documentation of {name} for details."], keys

    def _check_input(self, x: Any) -> bool:
        """torch's checks and warning; return whether ``x`` is unbatched."""
        shape = _shape_of(x)
        rank = self._check_rank(shape)
        unbatched = rank == self._ranks[0]
        axis = _integer("axis", self.axis) % self._ranks[1]  # in the batched input's terms
        if unbatched and axis == 0:
            raise ValueError(f"axis {self.axis} is the batch axis, absent from unbatched {rank}D input")
        dim = axis - unbatched
        if shape[dim] != self.num_features:
            if self.affine:
                raise ValueError(
                    f"expected input's size at dim={dim} to match num_features"
                    f" ({self.num_features}), but got: {shape[dim]}."
                )
            warnings.warn(
                f"input's size at dim={dim} does not match num_features. "
                "You can silence this warning by not passing in num_features, "
                "which is not used because affine=False",
                stacklevel=3,
            )
        return unbatched

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
        """Normalize ``x`` as the torch module does (an unbatched input is one sample).

        In training, or without running statistics, each instance uses its own statistics
        and the running statistics (when tracked) move by ``momentum``; in evaluation with
        running statistics those normalize. ``activation="relu"`` fuses a ReLU (no
        ``backward`` after it). ``out`` may be ``x`` itself (then ``backward`` is
        impossible); ``x`` is kept by reference for ``backward``. Returns ``out`` when
        given, else a new array of the kind of ``x``.
        """
        unbatched = self._check_input(x)
        relu = activation is not None and _relu_flag(activation)
        xb, outb = x, out
        if unbatched:
            xb, outb = _batch_of_one(x), _batch_of_one(out)
        state = self.__dict__
        weight, bias = state["_weight"], state["_bias"]
        running_mean, running_var = state["_running_mean"], state["_running_var"]
        eps, axis = self.eps, self.axis
        grads: Optional[Callable[[Any, Any], Any]]
        own = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var}
        if self.training or not self.track_running_stats:
            momentum = 0.0 if self.momentum is None else self.momentum
            try:
                y, mean, invstd = _instance_norm(
                    xb, weight, bias, running_mean, running_var, momentum, eps, axis, outb, relu
                )
            except TypeError:
                self._blame_dtype(x, **own)
                raise
            channels = _shape_of(xb)[axis]

            def grads(gy: Any, o: Any) -> Any:
                return _group_norm_backward(gy, xb, mean, invstd, weight, channels, axis, o)
        else:
            saved = _eval_saved(self)
            try:
                y = _forward_eval(xb, running_mean, running_var, weight, bias, eps, axis, outb, None, relu, saved)
            except TypeError:
                self._blame_dtype(x, **own)
                raise

            def grads(gy: Any, o: Any) -> Any:
                return _eval_backward(gy, o, xb, saved, weight, axis)
        if relu:
            self._save(x, out, weight, None, _NO_BACKWARD_ACTIVATION)
        else:
            self._save(x, out, weight, _unbatched(grads) if unbatched else grads)
        return _returned(x, out, y[0] if unbatched else y)

    forward = __call__


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over (N, C, L) or unbatched (C, L) input; equivalent to
    ``torch.nn.InstanceNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance. Default 1e-5.
    momentum : float in [0, 1] or None
        Running-statistics update factor (None: the statistics stay, as in torch).
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros); None when False (the default).
    track_running_stats : bool
        Keep ``running_mean``, ``running_var``, ``num_batches_tracked`` and use them in
        evaluation; None when False (the default).
    bias : bool
        With ``affine``, whether there is a ``bias`` (torch's newer argument).
    dtype : float32 or float64 (None: float32, as in torch)
        Dtype of the parameters and buffers; the input must have it where there are
        any (a module without them takes either, as torch's does).
    axis : int
        Channel axis of the batched input; -1 for channels-last data.
    device : None, "cpu" or ``torch.device("cpu")``
        Accepted for torch users; any other device is a ValueError.

    Attributes
    ----------
    weight, bias, running_mean, running_var : (C,) arrays or None
    num_batches_tracked : 0-d int64 array or None (torch never advances it for InstanceNorm)
    weight_grad, bias_grad : set by ``backward``
    """

    _ranks = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over (N, C, H, W) or unbatched (C, H, W) input; equivalent to
    ``torch.nn.InstanceNorm2d``. Parameters as for ``InstanceNorm1d``."""

    _ranks = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """Instance norm over (N, C, D, H, W) or unbatched (C, D, H, W) input; equivalent to
    ``torch.nn.InstanceNorm3d``. Parameters as for ``InstanceNorm1d``."""

    _ranks = (4, 5)

