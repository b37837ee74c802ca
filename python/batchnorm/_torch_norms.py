"""PyTorch drop-ins for ``torch.nn.LayerNorm``, ``RMSNorm``, ``GroupNorm`` and
``InstanceNorm1d/2d/3d`` on batchnorm's kernels (exported by ``batchnorm.torch``).

Each class *is* torch's (a subclass: same constructor, parameters, buffers, ``state_dict``,
``repr`` and input checks); only the call of the normalization differs. Eager calls,
``torch.compile``, ``torch.export`` and ``torch.fx`` run the ``batchnorm::`` operators of
``_torch_norm_ops`` (with their autograd rules); TorchScript, ``torch.jit.trace``,
``torch.func`` transforms, forward-mode AD, tensor subclasses, other devices and dtypes, and
every argument the kernels refuse take torch's own function (which then also gives torch's
own error messages).

float16 and bfloat16 inputs run on the kernels (float32 math) with float32 parameters (what
CPU autocast hands them) or parameters of the input's dtype (``model.bfloat16()``), which,
as torch does, are computed with as float32 copies: differentiable casts, so their gradients
come back in their dtype, and running statistics written back rounded to it.
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import math
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _core  # type: ignore[attr-defined, unused-ignore]
from . import _torch_norm_ops as ops
from . import _torch_ops
from ._torch_ops import numpy_view as _numpy
from .group_norm import _check_values_per_group
from .torch import (_dispatch_modes, _eager, _eps_applies, _grad_enabled, _grad_outside_inference_mode,
                    _inference_mode, _inference_tensor_outside_inference_mode, _integer, _is_compiling, _is_scripting,
                    _is_tracing, _momentum_applies, _plain_eager_input, _Proxy, _records, _records_graph,
                    _records_module_graph, _route, _tensor, _transform_active, _up, _ViewsFollowTensors)

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
           "group_norm", "instance_norm", "layer_norm", "rms_norm"]

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_Shape = Sequence[int]  # torch.Size too; an int alone only in the modules, as in torch


def _graph_or_eager(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether the ``batchnorm::`` ops serve this call: a plain eager call or graph capture
    (fx, dynamo / export, dispatch-mode tracing); torch's own function otherwise."""
    padded = (list(params) + [None] * 4)[:4]
    return _eager(x, *padded) or _route(x, *padded) == "graph"


def _run(name: str, x: Tensor, *args: Any) -> Any:
    """The op ``batchnorm::<name>`` on ``(x, *args)``; for a plain eager call, its kernel
    directly (no grad needed) or with its autograd rule as a plain autograd function."""
    if type(x) is Tensor and _eager(x, None, None, None, None) and _dispatch_modes() == 0:
        if not (torch.is_grad_enabled() and _records((x, *args))):
            return ops.call_kernel(name, ops.KERNELS[name], x, *args)
        return ops.EAGER[name](x, *args)
    return getattr(ops, name)(x, *args)


def _direct(input: Tensor) -> bool:
    """Whether a module may hand this call to its kernel directly, past the functional route's
    checks (most of a small call's cost: a (1, 64, 7, 7) GroupNorm eval 24 -> 11 us): a plain
    eager call on a contiguous non-empty float32/float64 CPU input. The module's own
    constructor vouches for the parameters' shapes, ``_ParamViews`` for their kind; each
    shortcut checks the input's shape. Not while a profiler runs: the general route shows the
    kernels under the ops' names. (The profiler is asked last: dynamo cannot trace that
    question, and a compiled model broke its graph at every norm.)"""
    return not (not _plain_eager_input(input) or input.dtype not in _FLOATS or not input.is_cpu
                or input.layout != torch.strided or not input.is_contiguous() or input.numel() == 0
                or _dispatch_modes() > 0 or ops.profiling())


class _ParamViews(_ViewsFollowTensors):
    """Mixin of the sibling drop-ins: NumPy views of the module's weight and bias, cached while
    the same tensors hold the same memory at the same strides and sizes (``.data =`` and
    ``.to()`` swap the memory under the same Parameter), as batch norm's drop-in caches its
    views: two views cost about 1.4 us a call, most of a small eval's Python."""

    _views: Optional[Tuple[Any, ...]] = None

    def _param(self, name: str) -> Optional[Tensor]:
        """``self.<name>``, from ``_parameters`` where it is there (``Module.__getattr__`` costs
        about a microsecond); pruning and parametrizations move a parameter out of it and
        compute the attribute instead (a pruned weight read from there was None: no weight)."""
        params = self._parameters
        return params[name] if name in params else getattr(self, name, None)

    def _param_views(self, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     shape: Sequence[int]) -> Optional[Tuple[Any, Any]]:
        """(weight, bias) as NumPy views (None for an absent one); None where a parameter is
        not a plain CPU tensor of ``shape`` and of the input's dtype (the call then takes the
        route, and torch's errors), and for parameters made under ``torch.inference_mode``
        while grad is on outside it (the route decides on a graph)."""
        views = self._views
        key = (weight.data_ptr() if weight is not None else 0, bias.data_ptr() if bias is not None else 0,
               weight.stride() if weight is not None else 0, bias.stride() if bias is not None else 0,
               weight.numel() if weight is not None else 0, bias.numel() if bias is not None else 0)
        if views is None or views[0] is not weight or views[1] is not bias or views[2] != key:
            if not all(p is None or (type(p) in (Tensor, torch.nn.Parameter) and p.is_cpu and p.layout == torch.strided
                                     and p.dtype in _FLOATS and tuple(p.shape) == tuple(shape))
                       for p in (weight, bias)):
                return None
            dtypes = {p.dtype for p in (weight, bias) if p is not None}
            if len(dtypes) > 1:
                return None
            made_in_inference_mode = any(p is not None and p.is_inference() for p in (weight, bias))
            views = self._views = (weight, bias, key, (_numpy(weight), _numpy(bias)), dtypes.pop() if dtypes else None,
                                   made_in_inference_mode)
        if views[5] and _grad_outside_inference_mode():
            return None
        dtype = views[4]
        return views[3] if dtype is None or dtype is input.dtype else None


class _Kernels:
    """One sibling norm's kernels for a module's direct calls, on NumPy arrays: ``forward``
    returns (y, mean, invstd), ``backward`` (grad_x, grad_weight, grad_bias); ``fallback`` is
    the autograd rule of its op, for the backward calls the kernels cannot serve alone."""

    __slots__ = ("eps",)

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def forward(self, x: Any, weight: Any, bias: Any) -> Tuple[Any, Any, Any]:
        raise NotImplementedError

    def backward(self, grad_y: Any, x: Any, mean: Any, invstd: Any, weight: Any) -> Tuple[Any, Any, Any]:
        raise NotImplementedError

    def fallback(self, grad_y: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Any,
                 invstd: Any, needs: Sequence[bool]) -> ops.Grads:
        raise NotImplementedError

    def keeps_input(self, x: Tensor) -> bool:
        """Whether backward may read ``x`` itself (else a copy): torch's own op saves its input
        too, so an in-place edit of it before backward raises there as here."""
        return True

    def saves_weight(self, x: Tensor) -> bool:
        """Whether the node saves the weight: torch's own op does, so an in-place edit of it
        before backward raises there as here."""
        return True


class _LayerKernels(_Kernels):
    __slots__ = ("ndim", "rms")

    def __init__(self, ndim: int, eps: float, rms: bool) -> None:
        super().__init__(eps)
        self.ndim, self.rms = ndim, rms

    def forward(self, x: Any, weight: Any, bias: Any) -> Tuple[Any, Any, Any]:
        return _core.layer_norm(x, self.ndim, weight, bias, self.eps, self.rms)

    def backward(self, grad_y: Any, x: Any, mean: Any, invstd: Any, weight: Any) -> Tuple[Any, Any, Any]:
        return _core.layer_norm_backward(grad_y, x, mean, invstd, weight, self.ndim, self.rms)

    def keeps_input(self, x: Tensor) -> bool:
        """RMS norm's input when it needs no gradient: a copy. torch's composite rms_norm then
        saves x * rsqrt(mean(x^2) + eps), a tensor of its own, so x may be edited in place (or
        come from inference_mode) before backward; reading x there would raise."""
        return not self.rms or x.requires_grad

    def saves_weight(self, x: Tensor) -> bool:
        """RMS norm's weight only where the input needs a gradient: torch's composite rms_norm
        multiplies by it last, so only the input's gradient reads it, and an in-place edit of
        it (or one made under inference_mode) is no error there otherwise."""
        return not self.rms or x.requires_grad

    def fallback(self, grad_y: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Any,
                 invstd: Any, needs: Sequence[bool]) -> ops.Grads:
        mean_t = _torch_ops.stats_like(x, 0) if mean is None else torch.from_numpy(mean)  # RMS norm: no mean
        return ops.layered_backward(grad_y, x, weight, has_bias, mean_t, torch.from_numpy(invstd), self.ndim, self.eps,
                                    self.rms, needs)


class _GroupKernels(_Kernels):
    """Group norm; instance norm is its case of one channel a group (``groups`` None)."""

    __slots__ = ("groups",)

    def __init__(self, groups: Optional[int], eps: float) -> None:
        super().__init__(eps)
        self.groups = groups

    def forward(self, x: Any, weight: Any, bias: Any) -> Tuple[Any, Any, Any]:
        if self.groups is None:
            return _core.instance_norm(x, weight, bias, None, None, 0.0, self.eps)
        return _core.group_norm(x, self.groups, weight, bias, self.eps)

    def backward(self, grad_y: Any, x: Any, mean: Any, invstd: Any, weight: Any) -> Tuple[Any, Any, Any]:
        groups = x.shape[1] if self.groups is None else self.groups
        return _core.group_norm_backward(grad_y, x, mean, invstd, weight, groups)

    def fallback(self, grad_y: Tensor, x: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Any,
                 invstd: Any, needs: Sequence[bool]) -> ops.Grads:
        groups = x.shape[1] if self.groups is None else self.groups
        return ops.grouped_backward(grad_y, x, weight, has_bias, torch.from_numpy(mean), torch.from_numpy(invstd), groups,
                                    self.eps, needs)


class _DirectFunction(torch.autograd.Function):
    """A sibling module's eager call that records a graph: the kernels on NumPy views and a
    minimal autograd node holding the views backward reads, as batch norm's drop-in does.
    Under the op's autograd rule (``ops.EAGER``: three outputs, tensors of the statistics
    saved, every array viewed again in backward) a (1, 64, 7, 7) GroupNorm training step took
    73 us, here 53 (torch's 37). Applied through ``_direct_apply``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                views: Tuple[Any, Any], kernels: _Kernels) -> Tensor:
        """Run the kernels on x's view and the parameters' ``views``; keep what backward reads."""
        y, mean, invstd = kernels.forward(x.numpy(force=True), *views)
        if not kernels.keeps_input(x):
            x = x.clone()  # a tensor of its own, not an inference tensor
        # x only through save_for_backward (viewed again in backward): saved-tensor hooks
        # (activation checkpointing, offloading) then decide what its memory does. Not the
        # bias, which backward never reads (ops._graph_grads)
        ctx.save_for_backward(x, weight if kernels.saves_weight(x) else None)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.kernels, ctx.arrays = kernels, (views[0], mean, invstd)
        return _tensor(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Gradients of input, weight and bias (those needed)."""
        x, weight = ctx.saved_tensors
        has_bias: bool = ctx.has_bias
        needs = ctx.needs_input_grad[:3]
        kernels: _Kernels = ctx.kernels
        weight_view, mean, invstd = ctx.arrays
        if weight is None and ctx.has_weight:  # not saved (saves_weight): the weight's gradient
            weight = torch.from_numpy(weight_view)  # does not read its values
        # a graph of the gradients (double backward), batched or unusual gradients, a bias
        # without a weight (the kernels give grad_bias beside a weight only): the op's rule
        if (type(grad_y) is not Tensor or _transform_active() is not None or _grad_enabled()
                or ops.legacy_batched(grad_y) or grad_y.dtype != x.dtype or (weight is None and has_bias)):
            return (*kernels.fallback(grad_y, x, weight, has_bias, mean, invstd, needs), None, None)
        gx, gw, gb = kernels.backward(grad_y.contiguous().numpy(force=True), x.numpy(force=True), mean, invstd,
                                      weight_view)
        return (_tensor(gx) if needs[0] else None,
                torch.from_numpy(gw) if needs[1] and weight is not None else None,
                torch.from_numpy(gb) if needs[2] and has_bias else None, None, None)


_direct_apply: Any = getattr(super(torch.autograd.Function, _DirectFunction), "apply")


def _direct_call(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], views: Tuple[Any, Any],
                 kernels: _Kernels) -> Tensor:
    """A module's call that ``_direct`` let through: with its autograd node when it records a
    graph, else the kernel alone; ``views``: the parameters' (``_ParamViews``)."""
    if _records_module_graph(x, weight, bias):
        return _direct_apply(x, weight, bias, views, kernels)  # type: ignore[no-any-return]
    return _tensor(kernels.forward(x.numpy(), *views)[0])


def _same_kind(x: Tensor, *params: Optional[Tensor]) -> bool:
    """A float32/float64/float16/bfloat16 CPU strided non-empty ``x`` and parameters of its
    device and dtype, or all float32 for a half ``x`` (torch's mixed CPU kernels take either,
    and refuse a mix: the call then goes to torch, for its error)."""
    if x.dtype not in _FLOATS + _HALVES or x.device.type != "cpu" or x.layout != torch.strided or x.numel() == 0:
        return False
    given = [t for t in params if t is not None]
    dtypes = (x.dtype, torch.float32) if x.dtype in _HALVES else (x.dtype,)
    return all(t.dtype is given[0].dtype and t.dtype in dtypes and t.device == x.device and t.layout == torch.strided
               for t in given)


def _opmath_eps(x: Tensor) -> float:
    """torch's ``eps=None`` for RMSNorm: the machine epsilon of the type ``x`` is computed in
    (float32 for the half types)."""
    return torch.finfo(torch.float32 if x.dtype in _HALVES else x.dtype).eps


# Both read the input's dtype, which an fx proxy does not have: symbolic tracing records them
# as calls, made when the graph runs (fx.wrap names a function of the module that calls it).
torch.fx.wrap("_up")
torch.fx.wrap("_opmath_eps")


def _shape(normalized_shape: _Shape) -> Optional[Tuple[int, ...]]:
    """``normalized_shape`` as a tuple of ints, or None where torch's function refuses it (an
    int alone, a float, None, a tensor, an element that is not an integer): the caller hands
    such a call to it, for its TypeError. (torch's modules take an int alone; its functions
    do not, and code that ran on the drop-in must run on torch.)"""
    if not isinstance(normalized_shape, (tuple, list)):  # (torch.Size is a tuple)
        return None
    for size in normalized_shape:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            return None
    return tuple(int(size) for size in normalized_shape)


def _layer_applies(x: Tensor, shape: Tuple[int, ...], eps: float, *params: Optional[Tensor]) -> bool:
    return (_same_kind(x, *params) and 0 < len(shape) <= x.dim() and tuple(x.shape[x.dim() - len(shape):]) == shape
            and all(t is None or tuple(t.shape) == shape for t in params) and _eps_applies(eps))


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.layer_norm`` on batchnorm's kernels (torch's where they do not apply)."""
    shape = _shape(normalized_shape)
    if shape is None:  # torch's TypeError naming the argument
        return F.layer_norm(input, normalized_shape, weight, bias, eps)
    if isinstance(input, _Proxy) or (_graph_or_eager(input, weight, bias) and _layer_applies(input, shape, eps, weight, bias)):
        return _run("layer_norm", input, len(shape), _up(input, weight), _up(input, bias), eps,  # type: ignore[no-any-return]
                    False)[0]
    return F.layer_norm(input, list(shape), weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """``torch.nn.functional.rms_norm`` on batchnorm's kernels; ``eps=None`` is the machine
    epsilon of the type the input is computed in (float32 for half inputs), as in torch."""
    shape = _shape(normalized_shape)
    if shape is None:  # torch's TypeError naming the argument
        return F.rms_norm(input, normalized_shape, weight, eps)
    if not isinstance(input, _Proxy):
        if not isinstance(input, Tensor):  # torch's TypeError naming the argument
            return F.rms_norm(input, list(shape), weight, eps)
        value = _opmath_eps(input) if eps is None and input.is_floating_point() else eps
        if not (_graph_or_eager(input, weight) and value is not None and _layer_applies(input, shape, value, weight)):
            return F.rms_norm(input, list(shape), weight, eps)
        eps = value
    elif eps is None:
        eps = _opmath_eps(input)
    y = _run("layer_norm", input, len(shape), _up(input, weight), None, eps, True)[0]
    return _torch_ops.in_torch_layout(y, input, True)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.group_norm`` on batchnorm's kernels (channels-last memory read in place)."""
    if not isinstance(input, _Proxy) and not _is_tracing():  # traced: torch's function, its check
        _check_values_per_group(input.shape, num_groups, 1)  # torch's first check, in its words
    if isinstance(input, _Proxy) or (
            _graph_or_eager(input, weight, bias) and _same_kind(input, weight, bias) and input.dim() >= 2
            and _integer(num_groups) and num_groups > 0 and input.shape[1] % num_groups == 0 and _eps_applies(eps)
            and all(t is None or tuple(t.shape) == (input.shape[1],) for t in (weight, bias))):
        y = _run("group_norm", _dense(input), num_groups, _up(input, weight), _up(input, bias), eps)[0]
        return _torch_ops.in_torch_layout(y, input, True, suggested=True)
    return F.group_norm(input, num_groups, weight, bias, eps)


def _instance_applies(x: Tensor, params: List[Optional[Tensor]], use_input_stats: bool, momentum: float,
                      eps: float) -> bool:
    running_mean, running_var = params[2], params[3]
    if not (_graph_or_eager(x, *params) and _same_kind(x, *params) and x.dim() >= 3 and _eps_applies(eps)):
        return False
    if any(t is not None and tuple(t.shape) != (x.shape[1],) for t in params):
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):  # type: ignore[union-attr]
        return False
    if not use_input_stats:  # torch's op also for parameters made under inference_mode, which it takes there
        return running_mean is not None and not _inference_tensor_outside_inference_mode(*params[:2])
    # one value per instance: torch's error
    return x[0, 0].numel() > 1 and (running_mean is None or _momentum_applies(momentum))


def _dense(x: Tensor) -> Tensor:
    """``x`` in memory the kernels read in place (``ops.channels_dense``: a copy when it is
    neither channels-first nor channels-last dense), made before the op, so that the op saves
    the copy, as torch's ops save theirs: an in-place edit of ``x`` between forward and
    backward is then no error."""
    return x if isinstance(x, _Proxy) else ops.channels_dense(x)


def _copy_in_graph(x: Tensor, weight: Optional[Tensor]) -> Optional[Tensor]:
    """Instance norm's weight for a call that records a graph: a copy. torch's instance norm
    runs a batch norm on its weight repeated per instance, a copy, so an in-place update of
    the weight between forward and backward is no error there and backward uses the forward's
    values; the copy does the same here."""
    if weight is not None and not isinstance(x, _Proxy) and _records_graph(x, weight, None):
        return weight.clone()
    return weight


def _plain_copy(t: Optional[Tensor]) -> Optional[Tensor]:
    """A parameter made under ``torch.inference_mode``, used outside it: a copy that records
    no graph, as torch's instance norm's repeat of it is (an inference tensor carries no
    autograd key, whatever its requires_grad). Any other: itself."""
    return t.detach().clone() if t is not None and t.is_inference() else t


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.instance_norm`` on batchnorm's kernels: per-instance statistics
    (updating the running statistics in place when given), or the running statistics when
    ``use_input_stats`` is False."""
    params = [weight, bias, running_mean, running_var]
    if type(use_input_stats) is not bool or (  # (not a bool: torch's TypeError)
            not isinstance(input, _Proxy) and not _instance_applies(input, params, use_input_stats, momentum, eps)):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    # torch repeats them per instance: a copy, plain for one made under inference_mode (dynamo
    # cannot trace the test, and a compiled graph holds no inference tensors)
    if not _is_compiling() and not _inference_mode():
        weight, bias = _plain_copy(weight), _plain_copy(bias)
    weight, bias = _copy_in_graph(input, _up(input, weight)), _up(input, bias)
    dense = _dense(input)
    if not use_input_stats:
        y = _torch_ops.batch_norm_eval(dense, weight, bias, _up(input, running_mean), _up(input, running_var), eps)
    else:
        y, _, _, new_mean, new_var = _run("instance_norm_train", dense, weight, bias, _up(input, running_mean),
                                           _up(input, running_var), momentum, eps)
        if running_mean is not None and running_var is not None:  # the op's outputs carry no grad
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    return _torch_ops.in_torch_layout(y, input, False)


class LayerNorm(_ParamViews, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on batchnorm's kernels; constructor, parameters, ``state_dict``
    and ``repr`` are torch's. ``isinstance(m, torch.nn.LayerNorm)`` holds."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize the trailing ``normalized_shape`` dimensions, as torch's ``forward``."""
        if _is_scripting():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        weight, bias, shape = self._param("weight"), self._param("bias"), self.normalized_shape
        if shape and _direct(input) and input.shape[input.dim() - len(shape):] == shape and _eps_applies(self.eps):
            views = self._param_views(input, weight, bias, shape)
            if views is not None:
                return _direct_call(input, weight, bias, views, _LayerKernels(len(shape), self.eps, False))
        return layer_norm(input, shape, weight, bias, self.eps)


class RMSNorm(_ParamViews, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on batchnorm's kernels; constructor, parameters, ``state_dict``
    and ``repr`` are torch's. ``isinstance(m, torch.nn.RMSNorm)`` holds."""

    def forward(self, x: Tensor) -> Tensor:
        """Divide by the root mean square of the trailing dimensions, as torch's ``forward``."""
        if _is_scripting():
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return self._kernels(x)

    @torch.jit.unused
    def _kernels(self, x: Tensor) -> Tensor:
        weight, shape, eps = self._param("weight"), self.normalized_shape, self.eps
        if shape and _direct(x) and x.shape[x.dim() - len(shape):] == shape:
            value = torch.finfo(x.dtype).eps if eps is None else eps
            views = self._param_views(x, weight, None, shape) if _eps_applies(value) else None
            if views is not None:
                return _direct_call(x, weight, None, views, _LayerKernels(len(shape), value, True))
        return rms_norm(x, shape, weight, eps)


class GroupNorm(_ParamViews, torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` ((N, C, *) input, also channels_last) on batchnorm's kernels;
    constructor, parameters, ``state_dict`` and ``repr`` are torch's."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize over each group of channels per sample, as torch's ``forward``."""
        if _is_scripting():
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        weight, bias, groups = self._param("weight"), self._param("bias"), self.num_groups
        # numel == groups: one value per group, torch's error (the general route raises it)
        if (_direct(input) and input.dim() >= 2 and input.shape[1] == self.num_channels and input.numel() != groups
                and _eps_applies(self.eps)):
            views = self._param_views(input, weight, bias, (self.num_channels,))
            if views is not None:
                return _direct_call(input, weight, bias, views, _GroupKernels(groups, self.eps))
        return group_norm(input, groups, weight, bias, self.eps)


class _InstanceDropIn(_ParamViews, torch.nn.modules.instancenorm._InstanceNorm):
    """torch's ``_InstanceNorm`` (its rank checks, unbatched inputs and warnings) with the
    normalization itself on batchnorm's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        """torch's ``_InstanceNorm.forward``, check for check (TorchScript compiles no call to
        it). Under ``torch.fx`` tracing, a call of this module: torch's own instance norm is a
        leaf there (the checks branch on the input's rank, which a proxy does not have), so
        the traced graph calls the module, and the module the kernels."""
        if not _is_scripting():
            traced = self._traced_call(input)
            if traced is not None:
                return traced
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            if self.affine:
                raise ValueError(f"expected input's size at dim={feature_dim} to match num_features"
                                 f" ({self.num_features}), but got: {input.size(feature_dim)}.")
            warnings.warn(f"input's size at dim={feature_dim} does not match num_features. "
                          "You can silence this warning by not passing in num_features, "
                          "which is not used because affine=False", stacklevel=2)
        if input.dim() == self._get_no_batch_dim():
            return self._handle_no_batch_input(input)  # type: ignore[no-any-return]
        return self._apply_instance_norm(input)

    @torch.jit.unused
    def _traced_call(self, input: Tensor) -> Optional[Tensor]:
        """The module's call as a graph node, when ``input`` is an fx proxy inside a traced
        model (tracing the module itself fails, as it does for torch's); else None."""
        if not isinstance(input, _Proxy) or input.tracer.root is self:
            return None
        return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        if _is_scripting():
            return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training or not self.track_running_stats,
                                   self.momentum if self.momentum is not None else 0.0, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        weight, bias = self._param("weight"), self._param("bias")
        # without running statistics (the default; buffers kept after track_running_stats was
        # turned off are still updated, as torch does); one value per instance is torch's error
        if (not self.track_running_stats and self.running_mean is None and self.running_var is None
                and _direct(input) and input.dim() >= 3
                and input.shape[1] == self.num_features and input[0, 0].numel() > 1 and _eps_applies(self.eps)):
            views = self._param_views(input, weight, bias, (self.num_features,))
            if views is not None:
                copy = _copy_in_graph(input, weight)
                if copy is not weight:
                    views = (copy.detach().numpy(), views[1])  # type: ignore[union-attr]
                return _direct_call(input, copy, bias, views, _GroupKernels(None, self.eps))
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceDropIn, torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` ((N, C, L) or (C, L) input) on batchnorm's kernels."""


class InstanceNorm2d(_InstanceDropIn, torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` ((N, C, H, W) or (C, H, W) input) on batchnorm's kernels."""


class InstanceNorm3d(_InstanceDropIn, torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` ((N, C, D, H, W) or (C, D, H, W) input) on batchnorm's kernels."""


REPLACEMENTS: List[Tuple[type, type]] = [
    (torch.nn.LayerNorm, LayerNorm), (torch.nn.RMSNorm, RMSNorm), (torch.nn.GroupNorm, GroupNorm),
    (torch.nn.InstanceNorm1d, InstanceNorm1d), (torch.nn.InstanceNorm2d, InstanceNorm2d),
    (torch.nn.InstanceNorm3d, InstanceNorm3d),
]
