"""Stateful batch-norm layers with the semantics of ``torch.nn.BatchNorm1d/2d/3d``.

A module owns its parameters and running statistics as NumPy arrays; ``_core`` reads
them (and updates the running statistics) in place, so ``m.weight[:] = ...`` is seen by
the next call. Every check runs before the first write: a failed call changes nothing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar, overload

import numpy as np
import numpy.typing as npt

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

STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

_Module = TypeVar("_Module", bound="_BatchNorm")

_NO_BACKWARD_FUSED = "backward is not available after a forward with residual or activation"
_NO_BACKWARD_IN_PLACE = (
    "backward is impossible after an in-place forward (out=x): "
    "the input it needs was overwritten by the output"
)


class IncompatibleKeys(NamedTuple):
    """Result of ``load_state_dict``, like torch's ``_IncompatibleKeys``."""

    missing_keys: List[str]
    unexpected_keys: List[str]

    def __repr__(self) -> str:
        if not self.missing_keys and not self.unexpected_keys:
            return "<All keys matched successfully>"
        return (
            f"IncompatibleKeys(missing_keys={self.missing_keys}, "
            f"unexpected_keys={self.unexpected_keys})"
        )


class _Saved(NamedTuple):
    """What ``backward`` needs from the last forward (references, not copies)."""

    x: Any
    mean: Optional[FloatArray]
    invstd: Optional[FloatArray]  # None after a running-stat forward: derived from var
    var: Optional[FloatArray]
    eps: float
    weight: Optional[FloatArray]
    axis: int
    batch_stats: bool
    out: Any  # where the forward wrote; overlapping x makes backward impossible
    why_not: Optional[str]  # set when this forward cannot be differentiated


def _to_numpy(value: Any) -> npt.NDArray[Any]:
    """NumPy array from an array, a torch tensor or a DLPack producer (torch is never imported)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        try:
            return np.from_dlpack(value)
        except (TypeError, RuntimeError, BufferError):
            pass  # e.g. a dtype NumPy cannot take through DLPack: try the array protocol
    return np.asarray(value)


def _quoted(keys: List[str]) -> str:
    return ", ".join(f'"{key}"' for key in keys)


def _fill(*pairs: Tuple[Optional[npt.NDArray[Any]], int]) -> None:
    """Fill each array that exists with its value, in place (holders keep seeing it)."""
    for array, value in pairs:
        if array is not None:
            array.fill(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


_TORCH_DTYPES = {"torch.float32": np.float32, "torch.float64": np.float64}


def _cpu_device(device: Any) -> None:
    """Accepts the CPU as torch users name it (None, "cpu", torch.device("cpu")); the
    modules hold NumPy arrays, so any other device is an error."""
    if device is None or str(device) in ("cpu", "cpu:0"):
        return
    raise ValueError(f"device: batchnorm's NumPy modules run on the CPU, got {device!r}; for "
                     "tensors on other devices use batchnorm.torch (torch's own op runs there)")


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    # torch.float32 / torch.float64 (torch users' habit), without importing torch
    dtype = _TORCH_DTYPES.get(str(dtype), dtype) if type(dtype).__name__ == "dtype" else dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class _ArrayAttribute:
    """A validated array attribute: None, or the module's own writable array.

    Assignment stores the array itself (no copy), so the kernels read and update the
    memory the caller holds; it must therefore have the exact shape and dtype and be
    writable and C-contiguous (``_core`` updates running statistics and
    ``load_state_dict`` copies values in place).
    """

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = per_channel
        self.name = self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    @overload
    def __get__(self, module: None, owner: type) -> _ArrayAttribute: ...
    @overload
    def __get__(self, module: _BatchNorm, owner: type) -> Optional[npt.NDArray[Any]]: ...
    def __get__(self, module: Optional[_BatchNorm], owner: type) -> Any:
        return self if module is None else module.__dict__[self.slot]

    def __set__(self, module: _BatchNorm, value: Optional[npt.NDArray[Any]]) -> None:
        if value is not None:
            if self.per_channel:
                shape: Tuple[int, ...] = (module.num_features,)
                dtype: np.dtype[Any] = module.dtype
            else:
                shape, dtype = (), np.dtype(np.int64)
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"{self.name} must be a NumPy array or None, got {type(value).__name__}"
                )
            if value.dtype != dtype:
                raise TypeError(f"{self.name} must have dtype {dtype}, got {value.dtype}")
            if value.shape != shape:
                raise ValueError(f"{self.name} must have shape {shape}, got {value.shape}")
            if not (value.flags.c_contiguous and value.flags.writeable):
                raise ValueError(f"{self.name} must be a writable C-contiguous array")
        module.__dict__[self.slot] = value


class _BatchNorm:
    """Shared implementation of BatchNorm1d/2d/3d; subclasses set the accepted ranks."""

    _ranks: Tuple[int, ...] = ()

    weight = _ArrayAttribute()
    bias = _ArrayAttribute()
    running_mean = _ArrayAttribute()
    running_var = _ArrayAttribute()
    num_batches_tracked = _ArrayAttribute(per_channel=False)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        dtype: npt.DTypeLike = np.float32,
        axis: int = 1,
        device: Any = None,
    ) -> None:
        _cpu_device(device)
        self.num_features = _integer("num_features", num_features)
        if self.num_features <= 0:
            raise ValueError(f"num_features must be > 0, got {num_features}")
        self.eps = _real("eps", eps)
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be positive and finite, got {eps}")
        self.momentum = None if momentum is None else _real("momentum", momentum)
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum}")
        self.dtype = _float_dtype(dtype)
        self.axis = _integer("axis", axis)
        top = max(self._ranks)
        if not -top <= self.axis < top:
            raise ValueError(
                f"axis must be in [{-top}, {top - 1}] for {type(self).__name__}, got {axis}"
            )
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.training = True

        channels = self.num_features
        self.weight = np.ones(channels, self.dtype) if self.affine else None
        self.bias = np.zeros(channels, self.dtype) if self.affine else None
        tracking = self.track_running_stats
        self.running_mean = np.zeros(channels, self.dtype) if tracking else None
        self.running_var = np.ones(channels, self.dtype) if tracking else None
        self.num_batches_tracked = np.zeros((), np.int64) if tracking else None
        self.weight_grad: Optional[FloatArray] = None
        self.bias_grad: Optional[FloatArray] = None
        self._saved: Optional[_Saved] = None

    # ---- mode -------------------------------------------------------------------------

    def train(self: _Module, mode: bool = True) -> _Module:
        """Set training mode (batch statistics); returns self, like ``nn.Module.train``."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def eval(self: _Module) -> _Module:
        """Set evaluation mode (running statistics); returns self, like ``nn.Module.eval``."""
        return self.train(False)

    # ---- forward / backward -----------------------------------------------------------

    def _check_input(self, x: Any) -> bool:
        """Check type, rank and channel count like torch; return whether ``x`` is empty."""
        shape = getattr(x, "shape", None)
        if shape is None or not hasattr(x, "__dlpack__"):  # ndarray and torch.Tensor have both
            if not hasattr(x, "__dlpack__"):
                raise TypeError(
                    f"x must be a NumPy array or a CPU tensor supporting DLPack, got {type(x).__name__}"
                )
            shape = np.from_dlpack(x).shape
        rank = len(shape)
        if rank not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {rank}D input)")
        axis = self.axis
        if not -rank <= axis < rank:
            raise ValueError(f"axis {axis} is out of range for {rank}D input")
        if shape[axis] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} channels (num_features) on axis {axis}, "
                f"got input of shape {tuple(shape)}"
            )
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
        empty = self._check_input(x)
        # The attributes' own slots, read directly: this is the per-call path, and each
        # descriptor lookup costs as much as a tenth of a small eval.
        state = self.__dict__
        weight, bias = state["_weight"], state["_bias"]
        running_mean, running_var = state["_running_mean"], state["_running_var"]
        # torch: bn_training = training or (running_mean is None and running_var is None)
        if self.training or (running_mean is None and running_var is None):
            if residual is not None or activation is not None:
                _reject_fusion(residual, activation)
            counting = self.training and self.track_running_stats
            counter = state["_num_batches_tracked"] if counting else None
            if not self.track_running_stats:  # torch passes no running stats then
                running_mean = running_var = None
            y, mean, invstd = _forward_train(
                x, weight, bias, running_mean, running_var,
                self._momentum_factor(counter), self.eps, self.axis, out,
            )
            # Only after _core succeeded (a failed call must not count a batch); an empty
            # batch carries no statistics and is not counted either.
            if counter is not None and not empty:
                counter += 1
            fields: Tuple[Any, ...] = (x, mean, invstd, None, self.eps, weight, self.axis, True, out, None)
        else:
            fused = residual is not None or activation is not None
            y = _forward_eval(
                x, running_mean, running_var, weight, bias, self.eps, self.axis, out, residual,
                fused and _relu_flag(activation),
            )
            why_not = _NO_BACKWARD_FUSED if fused else None
            fields = (x, running_mean, None, running_var, self.eps, weight, self.axis, False, out, why_not)
        # tuple.__new__ skips the NamedTuple constructor's argument handling (per-call path).
        self._saved = tuple.__new__(_Saved, fields)
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

    @overload
    def backward(self, grad_y: npt.NDArray[Any], out: Optional[npt.NDArray[Any]] = ...) -> FloatArray: ...
    @overload
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = ...) -> Any: ...
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = None) -> Any:
        """Gradient of the last forward; sets ``weight_grad`` and ``bias_grad``.

        After a batch-statistics forward this is torch's training-mode batch-norm
        backward; after a running-statistics forward ``grad_x = grad_y*weight*invstd``
        with ``invstd = 1/sqrt(running_var + eps)`` (the running statistics as they are
        now). Uses the ``x`` and ``weight`` arrays of the last forward, by reference.

        Returns
        -------
        grad_x : array like ``x`` (``out`` when given), of the kind of ``grad_y`` (a torch
            tensor for a torch tensor). ``weight_grad`` and ``bias_grad`` are NumPy arrays,
            like the module's parameters.

        Raises
        ------
        RuntimeError
            Before any forward, after an in-place forward (``out=x`` overwrote the input)
            and after a fused forward (``residual`` or ``activation``).
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError("backward needs a forward first: call the module on an input")
        if saved.why_not is not None:
            raise RuntimeError(saved.why_not)
        if saved.out is not None and np.may_share_memory(_to_numpy(saved.out), _to_numpy(saved.x)):
            raise RuntimeError(_NO_BACKWARD_IN_PLACE)
        invstd = saved.invstd
        if invstd is None:  # running-stat forward: invstd from the running variance
            var = saved.var
            assert var is not None
            invstd = (1.0 / np.sqrt(var.astype(np.float64) + saved.eps)).astype(var.dtype)
        grad_x, grad_weight, grad_bias = _backward(
            grad_y, saved.x, saved.mean, invstd, saved.weight, saved.axis, saved.batch_stats, out,
        )
        self.weight_grad = None if saved.weight is None else grad_weight
        self.bias_grad = None if self.bias is None else grad_bias
        if type(grad_y) is _ndarray or out is not None:
            return grad_x
        return _like(grad_y, grad_x)

    # ---- state ------------------------------------------------------------------------

    def _state_arrays(self) -> Dict[str, npt.NDArray[Any]]:
        """The module's own parameter and buffer arrays under torch's keys, None left out."""
        arrays = {key: getattr(self, key) for key in STATE_KEYS}
        return {key: array for key, array in arrays.items() if array is not None}

    def state_dict(self) -> Dict[str, npt.NDArray[Any]]:
        """Copies of the parameters and buffers under PyTorch's keys (absent when None)."""
        return {key: array.copy() for key, array in self._state_arrays().items()}

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True
    ) -> IncompatibleKeys:
        """Copy values (NumPy arrays or torch tensors) into the existing arrays.

        Like ``nn.Module.load_state_dict``: with ``strict``, missing or unexpected keys
        raise ``RuntimeError``; a shape mismatch (or a dtype that cannot be cast, e.g.
        float into the int64 counter) always does. Everything is checked before
        anything is written. A missing ``num_batches_tracked`` keeps the current value,
        as torch does for checkpoints without that key.

        Returns
        -------
        IncompatibleKeys(missing_keys, unexpected_keys)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
        targets = self._state_arrays()
        missing = [k for k in targets if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict if k not in targets]
        errors = []  # torch's wording and order, so messages read the same
        if strict and missing:
            errors.append(f"Missing key(s) in state_dict: {_quoted(missing)}. ")
        if strict and unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {_quoted(unexpected)}. ")
        values = {}
        for key, target in targets.items():
            if key not in state_dict:
                continue
            value = _to_numpy(state_dict[key])
            if value.shape != target.shape:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {value.shape} from "
                    f"checkpoint, the shape in current model is {target.shape}."
                )
            elif not np.can_cast(value.dtype, target.dtype, "same_kind"):
                errors.append(
                    f"dtype mismatch for {key}: cannot copy {value.dtype} into {target.dtype}."
                )
            else:
                values[key] = value
        if errors:
            name = type(self).__name__
            details = "\n\t".join(errors)
            raise RuntimeError(f"Error(s) in loading state_dict for {name}:\n\t{details}")
        for key, value in values.items():
            np.copyto(targets[key], value, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0, in place (torch's method)."""
        _fill((self.running_mean, 0), (self.running_var, 1), (self.num_batches_tracked, 0))

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight 1, bias 0, in place (torch's method)."""
        self.reset_running_stats()
        _fill((self.weight, 1), (self.bias, 0))

    # ---- pickling and copies ------------------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        """State for ``pickle`` and ``copy``: every attribute and array, but not the saved
        forward context (a reference to the last input), so ``backward`` on a copy needs a
        forward first. ``copy.deepcopy`` and a pickle round trip give independent arrays."""
        state = self.__dict__.copy()
        state["_saved"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ---- repr -------------------------------------------------------------------------

    def extra_repr(self) -> str:
        """Constructor arguments in torch's format; dtype and axis when not the default."""
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        if self.axis != 1:
            text += f", axis={self.axis}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


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
    dtype : float32 or float64
        Dtype of the parameters, buffers and accepted inputs (NumPy's, or
        ``torch.float32`` / ``torch.float64``).
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
