"""What every NumPy normalization module shares, written once: validated parameter and
buffer attributes, train/eval, ``backward`` bookkeeping, ``state_dict`` /
``load_state_dict`` under PyTorch's keys, resets, pickling and ``repr``.

``_Module`` is the base of all of them (like ``torch.nn.Module`` for LayerNorm, RMSNorm,
GroupNorm); ``_NormBase`` adds the running statistics of BatchNorm and InstanceNorm, as
torch's ``_NormBase`` does. A module owns its arrays; ``_core`` reads them (and updates
running statistics) in place, so ``m.weight[:] = ...`` is seen by the next call.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple, TypeVar, Union, overload

import numpy as np
import numpy.typing as npt

from .functional import ArrayIn, FloatArray, _backward, _integer, _name_the_scalar, _real, _returned

_Self = TypeVar("_Self", bound="_Module")

_NO_BACKWARD_IN_PLACE = (
    "backward is impossible after an in-place forward (out=x): "
    "the input it needs was overwritten by the output"
)
_NO_BACKWARD_ACTIVATION = "backward is not available after a forward with activation"


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


# What ``backward`` needs from the last forward (references, not copies), a plain tuple
# (x, out, why_not, weight, grads), written on every forward and unpacked only by backward:
# a NamedTuple, even built by tuple.__new__, cost a tenth of a small eval's call.
#   out: where the forward wrote; overlapping x makes backward impossible
#   why_not: set when this forward cannot be differentiated
#   grads: (grad_y, out) -> (grad_x, grad_w, grad_b); or a batch-norm eval forward's
#     _eval_saved array, turned into gradients by backward (a closure per call costs a tenth of
#     a small eval)
_Saved = Tuple[Any, Any, Optional[str], Optional[FloatArray],
               Union[Callable[[Any, Any], Any], FloatArray, None]]


def _array_like(value: Any) -> bool:
    """An array, a NumPy scalar, a torch tensor or any DLPack / array-protocol object: what a
    state dict may hold (torch refuses None, lists and Python numbers there too)."""
    return isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__dlpack__") or hasattr(value, "__array__")


def _to_numpy(value: Any, name: str = "x") -> npt.NDArray[Any]:
    """NumPy array from an array, a torch tensor or a DLPack producer (torch is never imported).
    A torch bfloat16 tensor, which neither DLPack nor the array protocol hand to NumPy, becomes
    a view of its bits as ml_dtypes' bfloat16 (a TypeError naming ``name`` without ml_dtypes)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        torch = sys.modules.get("torch")
        if torch is not None and getattr(value, "dtype", None) is torch.bfloat16:
            try:
                import ml_dtypes
            except ImportError:
                raise TypeError(f"{name}: a torch bfloat16 tensor becomes a NumPy array only with ml_dtypes "
                                "installed (pip install ml_dtypes)") from None
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)  # type: ignore[no-any-return]
    if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
        try:
            return np.from_dlpack(value)
        except (TypeError, RuntimeError, BufferError):
            pass  # e.g. a dtype NumPy cannot take through DLPack: try the array protocol
    return np.asarray(value)


def _dtype_name(value: Any) -> str:
    """The name of an array's or tensor's dtype ("float32", "bfloat16"), without converting it
    (a torch bfloat16 tensor becomes a NumPy array only with ml_dtypes)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        dtype = _to_numpy(value).dtype
    name = getattr(dtype, "name", None)  # NumPy's (ml_dtypes' too) and others'; torch's has none
    return name if isinstance(name, str) else str(dtype).rpartition(".")[2]


def _shape_of(x: Any, name: str = "x") -> Tuple[int, ...]:
    """Shape of an ndarray, a torch tensor or any DLPack producer; TypeError naming ``name`` otherwise."""
    shape = getattr(x, "shape", None)
    if shape is None or not hasattr(x, "__dlpack__"):  # ndarray and torch.Tensor have both
        if not hasattr(x, "__dlpack__"):
            raise TypeError(
                f"{name} must be a NumPy array or a CPU tensor supporting DLPack, got {type(x).__name__}"
            )
        shape = np.from_dlpack(x).shape
    return tuple(shape)


def _quoted(keys: List[str]) -> str:
    return ", ".join(f'"{key}"' for key in keys)


def _wrote_input(out: Any, x: Any) -> bool:
    """Whether a forward's ``out`` shares an element with its input ``x`` (it overwrote it):
    exact, since an output beside the input in one buffer (``[x | bn(x)]``) lies within the
    input's bounds without touching it. Where that is too hard to tell, assumed."""
    work: Any = 1 << 16  # a bound on the search (NumPy's stubs know only 0 and -1, unbounded)
    try:
        return bool(np.shares_memory(_to_numpy(out), _to_numpy(x), max_work=work))
    except np.exceptions.TooHardError:
        return True


def _fill(*pairs: Tuple[Optional[npt.NDArray[Any]], int]) -> None:
    """Fill each array that exists with its value, in place (holders keep seeing it)."""
    for array, value in pairs:
        if array is not None:
            array.fill(value)


def _positive_int(name: str, value: object) -> int:
    result = _integer(name, value)
    if result <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return result


def _eps(value: object) -> float:
    eps = _real("eps", value)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive and finite, got {value}")
    return eps


_TORCH_DTYPES = {"torch.float32": np.float32, "torch.float64": np.float64}


def _cpu_device(device: Any) -> None:
    """Accepts the CPU as torch users name it (None, "cpu", torch.device("cpu")); the
    modules hold NumPy arrays, so any other device is an error."""
    if device is None or str(device) in ("cpu", "cpu:0"):
        return
    raise ValueError(f"device: batchnorm's NumPy modules run on the CPU, got {device!r}; for "
                     "tensors on other devices use batchnorm.torch (torch's own op runs there)")


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    if dtype is None:  # torch's default dtype, as torch's modules take None (NumPy's is float64)
        return np.dtype(np.float32)
    # torch.float32 / torch.float64 (torch users' habit), without importing torch
    dtype = _TORCH_DTYPES.get(str(dtype), dtype) if type(dtype).__name__ == "dtype" else dtype
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _axis(module: _Module, axis: object, top: int) -> int:
    """The channel axis, checked against the highest rank the module takes."""
    result = _integer("axis", axis)
    if not -top <= result < top:
        raise ValueError(f"axis must be in [{-top}, {top - 1}] for {type(module).__name__}, got {axis}")
    return result


def _check_channels(shape: Tuple[int, ...], axis: int, channels: int, name: str) -> None:
    """The module's channel ``axis`` exists in the input's ``shape`` and holds ``channels``
    (the module's argument ``name``)."""
    rank = len(shape)
    axis = _integer("axis", axis)  # a plain attribute of the module, which a user may set to anything
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for {rank}D input")
    if shape[axis] != channels:
        raise ValueError(
            f"x: expected {channels} channels ({name}) on axis {axis}, got input of shape {shape}"
        )


def _eval_saved(module: Any) -> FloatArray:
    """The (2, C) array a running-statistics forward has ``_core.forward_eval`` write its mean
    and invstd into (``saved=``), so later updates of the running buffers do not reach its
    backward (the forward's values, as torch's autograd formula saves them). One per module,
    reused: only the last forward's saved context refers to it, and copies of the module get
    their own."""
    saved: Optional[FloatArray] = module.__dict__.get("_eval_stats")
    if saved is None:
        saved = module.__dict__["_eval_stats"] = np.empty((2,) + module._param_shape, module.dtype)
    return saved


def _eval_backward(grad_y: Any, out: Any, x: Any, saved: FloatArray, weight: Optional[FloatArray],
                   axis: int) -> Any:
    """Backward of a running-statistics forward from its ``_eval_saved`` (mean, invstd)."""
    return _backward(grad_y, x, saved[0], saved[1], weight, axis, False, out)


class _ArrayAttribute:
    """A validated array attribute: None, or the module's own writable array.

    Assignment stores the array itself (no copy), so the kernels read and update the
    memory the caller holds; it must therefore have the exact shape (the module's
    ``_param_shape``, or () for the int64 counter) and dtype and be writable and
    C-contiguous (``_core`` updates running statistics and ``load_state_dict`` copies
    values in place).
    """

    def __init__(self, counter: bool = False) -> None:
        self.counter = counter
        self.name = self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, "_" + name

    @overload
    def __get__(self, module: None, owner: type) -> _ArrayAttribute: ...
    @overload
    def __get__(self, module: _Module, owner: type) -> Optional[npt.NDArray[Any]]: ...
    def __get__(self, module: Optional[_Module], owner: type) -> Any:
        return self if module is None else module.__dict__[self.slot]

    def __set__(self, module: _Module, value: Optional[npt.NDArray[Any]]) -> None:
        if value is not None:
            if self.counter:
                shape: Tuple[int, ...] = ()
                dtype: np.dtype[Any] = np.dtype(np.int64)
            else:
                shape, dtype = module._param_shape, module.dtype
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


class _Module:
    """Base of the NumPy normalization modules: parameters ``weight`` and ``bias`` of shape
    ``_param_shape`` (None when absent), plus the buffers a subclass lists in
    ``_state_keys`` (torch's ``state_dict`` order)."""

    _state_keys: Tuple[str, ...] = ("weight", "bias")
    _optional_keys: Tuple[str, ...] = ()  # missing from a state_dict: keep the current value

    weight = _ArrayAttribute()
    bias = _ArrayAttribute()

    dtype: np.dtype[Any]
    _param_shape: Tuple[int, ...]

    def _init_module(self, dtype: npt.DTypeLike, shape: Tuple[int, ...]) -> None:
        """Common attributes; call before assigning any array attribute."""
        self.dtype = _float_dtype(dtype)
        self._param_shape = shape
        self.training = True
        self.weight_grad: Optional[FloatArray] = None
        self.bias_grad: Optional[FloatArray] = None
        self._saved: Optional[_Saved] = None
        self._eval_stats: Optional[FloatArray] = None  # see _eval_saved

    def _init_affine(self, weight: bool, bias: bool) -> None:
        """weight = ones and bias = zeros of ``_param_shape``, or None."""
        shape = self._param_shape
        self.weight = np.ones(shape, self.dtype) if weight else None
        self.bias = np.zeros(shape, self.dtype) if weight and bias else None

    # ---- mode -------------------------------------------------------------------------

    def train(self: _Self, mode: bool = True) -> _Self:
        """Set training mode; returns self, like ``nn.Module.train``."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def eval(self: _Self) -> _Self:
        """Set evaluation mode; returns self, like ``nn.Module.eval``."""
        return self.train(False)

    # ---- backward -----------------------------------------------------------------------

    def _save(self, x: Any, out: Any, weight: Optional[FloatArray],
              grads: Optional[Callable[[Any, Any], Any]], why_not: Optional[str] = None) -> None:
        self._saved = (x, out, why_not, weight, grads)

    @overload
    def backward(self, grad_y: npt.NDArray[Any], out: Optional[npt.NDArray[Any]] = ...) -> FloatArray: ...
    @overload
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = ...) -> Any: ...
    def backward(self, grad_y: ArrayIn, out: Optional[ArrayIn] = None) -> Any:
        """Gradient of the last forward; sets ``weight_grad`` and ``bias_grad``.

        Uses the ``x`` and ``weight`` arrays of the last forward, by reference, and the
        statistics that forward used, as they were then (the values torch's autograd
        formula saves).

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
        saved_x, saved_out, why_not, saved_weight, grads = saved
        if why_not is not None:
            raise RuntimeError(why_not)
        if saved_out is not None and _wrote_input(saved_out, saved_x):
            raise RuntimeError(_NO_BACKWARD_IN_PLACE)
        assert grads is not None  # only a forward with why_not set saves none
        if callable(grads):
            grad_x, grad_weight, grad_bias = grads(grad_y, out)
        else:  # a batch-norm eval forward's saved statistics (only _NormBase, with its axis, saves them)
            axis: int = getattr(self, "axis")
            grad_x, grad_weight, grad_bias = _eval_backward(grad_y, out, saved_x, grads, saved_weight, axis)
        self.weight_grad = None if saved_weight is None else grad_weight
        self.bias_grad = None if self.bias is None else grad_bias
        return _returned(grad_y, out, grad_x)

    # ---- state ------------------------------------------------------------------------

    def _state_arrays(self) -> Dict[str, npt.NDArray[Any]]:
        """The module's own parameter and buffer arrays under torch's keys, None left out."""
        arrays = {key: getattr(self, key) for key in self._state_keys}
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
        optional = self._optional_keys
        class_errors, dropped = self._checkpoint_errors(state_dict)
        missing = [k for k in targets if k not in state_dict and k not in optional]
        unexpected = [k for k in state_dict if k not in targets and k not in dropped]
        errors = []  # torch's wording and order, so messages read the same
        if strict and missing:
            errors.append(f"Missing key(s) in state_dict: {_quoted(missing)}. ")
        if strict and unexpected:
            errors.append(f"Unexpected key(s) in state_dict: {_quoted(unexpected)}. ")
        errors += class_errors
        values = {}
        for key, target in targets.items():
            if key not in state_dict:
                continue
            given = state_dict[key]
            if not _array_like(given):  # torch's words; np.asarray(None) would be a 0-d object array
                errors.append(f'While copying the parameter named "{key}", expected an array or Tensor-like '
                              f"object from checkpoint but received {type(given)}")
                continue
            value = _to_numpy(given, key)
            if target.ndim == 0 and value.shape == (1,):  # a 0.3-era checkpoint's counter, as torch loads it
                value = value.reshape(())
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

    def _checkpoint_errors(self, state_dict: Mapping[str, Any]) -> Tuple[List[str], List[str]]:
        """A module class's own errors for a checkpoint, and the keys it takes out of it, as
        torch's ``_load_from_state_dict`` overrides add them; none here."""
        return [], []

    def _blame_dtype(self, x: Any, **arrays: Optional[npt.NDArray[Any]]) -> None:
        """After a call the core refused with a TypeError: when one of the module's scalar
        attributes (``eps``, ``momentum``, ``axis``, ``num_groups``: plain attributes a user
        may set to anything) is not a number of its kind, name it (the core's own message lists
        its signatures). When ``x`` has a dtype this module
        does not take but a module of another dtype would, and the call passed some of the
        module's own ``arrays``, say so (the core can only name the first of those arrays it
        checks, which the caller did not pass). Otherwise the core's error stands: it names
        the argument at fault (``out``, ``residual``, an integer ``x``)."""
        state = self.__dict__
        _name_the_scalar(**{name: state[name] for name in ("eps", "momentum", "axis", "num_groups")
                            if state.get(name) is not None})
        given = [name for name, array in arrays.items() if array is not None]
        dtype = _dtype_name(x)
        wanted = {"float16": "float32", "bfloat16": "float32"}.get(dtype, dtype)
        if not given or wanted not in ("float32", "float64") or np.dtype(wanted) == self.dtype:
            return
        takes = "float64" if self.dtype == np.float64 else "float32, float16 or bfloat16"
        name = type(self).__name__
        held = ", ".join(given[:-1]) + " and " + given[-1] if len(given) > 1 else given[0]
        sizes = self._torch_repr().split(", eps=")[0]  # the repr's leading sizes, as the constructor takes them
        raise TypeError(f"x has dtype {dtype} but this {name} is {self.dtype} (its {held}): pass {takes} input, "
                        f"or make a {wanted} module with {name}({sizes}, dtype=np.{wanted})") from None

    def reset_parameters(self) -> None:
        """Set weight 1, bias 0, in place (torch's method)."""
        _fill((self.weight, 1), (self.bias, 0))

    # ---- pickling and copies ------------------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        """State for ``pickle`` and ``copy``: every attribute and array, but not the saved
        forward context (a reference to the last input), so ``backward`` on a copy needs a
        forward first. ``copy.deepcopy`` and a pickle round trip give independent arrays."""
        state = self.__dict__.copy()
        state["_saved"] = state["_eval_stats"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self._eval_stats = None  # absent from the state of a module pickled before it existed
        self.__dict__.update(state)

    # ---- repr -------------------------------------------------------------------------

    def _torch_repr(self) -> str:
        """torch's ``extra_repr`` for this module."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        """Constructor arguments in torch's format; dtype and axis when not the default."""
        text = self._torch_repr()
        if self.dtype != np.float32:
            text += f", dtype={self.dtype}"
        axis = getattr(self, "axis", 1)
        if axis != 1:
            text += f", axis={axis}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _NormBase(_Module):
    """Modules with optional running statistics (BatchNorm, InstanceNorm), as torch's
    ``_NormBase``: ``num_features`` channels on ``axis``, ``weight``/``bias`` when
    ``affine``, ``running_mean``/``running_var``/``num_batches_tracked`` when
    ``track_running_stats``. Subclasses set ``_ranks``, the input ranks they take."""

    _ranks: Tuple[int, ...] = ()
    _state_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    _optional_keys = ("num_batches_tracked",)

    running_mean = _ArrayAttribute()
    running_var = _ArrayAttribute()
    num_batches_tracked = _ArrayAttribute(counter=True)

    def _init_norm_base(
        self,
        num_features: int,
        eps: float,
        momentum: Optional[float],
        affine: bool,
        track_running_stats: bool,
        dtype: npt.DTypeLike,
        axis: int,
        bias: bool = True,
    ) -> None:
        self.num_features = _positive_int("num_features", num_features)
        self.eps = _eps(eps)
        self.momentum = None if momentum is None else _real("momentum", momentum)
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum}")
        self._init_module(dtype, (self.num_features,))
        self.axis = _axis(self, axis, max(self._ranks))
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self._init_affine(self.affine, bool(bias))
        channels, tracking = self.num_features, self.track_running_stats
        self.running_mean = np.zeros(channels, self.dtype) if tracking else None
        self.running_var = np.ones(channels, self.dtype) if tracking else None
        self.num_batches_tracked = np.zeros((), np.int64) if tracking else None

    def _check_rank(self, shape: Tuple[int, ...]) -> int:
        """torch's rank check (and words) against ``_ranks``; returns the rank."""
        rank = len(shape)
        if rank not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {expected} input (got {rank}D input)")
        return rank

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, counter 0, in place (torch's method)."""
        _fill((self.running_mean, 0), (self.running_var, 1), (self.num_batches_tracked, 0))

    def reset_parameters(self) -> None:
        """Reset the running statistics and set weight 1, bias 0, in place (torch's method)."""
        self.reset_running_stats()
        super().reset_parameters()

    def _torch_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )
