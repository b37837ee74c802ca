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
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _core  # type: ignore[attr-defined, unused-ignore]
from . import _torch_norm_ops as ops
from . import _torch_ops
from ._torch_ops import numpy_view as _numpy
from .group_norm import _check_values_per_group
from .torch import _dispatch_modes, _eager, _grad_enabled, _is_scripting, _plain_eager_input, _Proxy, _route, _tensor

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm",
           "group_norm", "instance_norm", "layer_norm", "rms_norm"]

_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_Shape = Union[int, Sequence[int], torch.Size]


def _graph_or_eager(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether the ``batchnorm::`` ops serve this call: a plain eager call or graph capture
    (fx, dynamo / export, dispatch-mode tracing); torch's own function otherwise."""
    padded = (list(params) + [None] * 4)[:4]
    return _eager(x, *padded) or _route(x, *padded) == "graph"


def _run(name: str, x: Tensor, *args: Any) -> Any:
    """The op ``batchnorm::<name>`` on ``(x, *args)``; for a plain eager call, its kernel
    directly (no grad needed) or with its autograd rule as a plain autograd function."""
    if type(x) is Tensor and _eager(x, None, None, None, None) and _dispatch_modes() == 0:
        if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (x, *args))):
            return ops.call_kernel(name, ops.KERNELS[name], x, *args)
        return ops.EAGER[name](x, *args)
    return getattr(ops, name)(x, *args)


def _direct(input: Tensor, *params: Optional[Tensor]) -> Optional[bool]:
    """Whether a module may hand this call to its kernel directly, past the functional route's
    checks (most of a small call's cost: a (1, 64, 7, 7) GroupNorm eval 24 -> 11 us, its
    forward with grad 30 -> 21 us): a plain eager call on a contiguous non-empty
    float32/float64 CPU input, with parameters of its dtype. False: no graph to record, the
    kernel runs on NumPy views; True: a graph to record, the kernel runs with its autograd rule
    (``ops.EAGER``); None: take the route. The module's own constructor vouches for the
    parameters' shapes; each shortcut checks the input's. Not while a profiler runs: the
    general route shows the kernels under the ops' names."""
    if (ops.profiling() or not _plain_eager_input(input) or input.dtype not in _FLOATS or not input.is_cpu
            or input.layout != torch.strided or not input.is_contiguous() or input.numel() == 0
            or _dispatch_modes() > 0):
        return None
    if not all(p is None or (type(p) in (Tensor, torch.nn.Parameter) and p.dtype == input.dtype and p.is_cpu
                             and p.layout == torch.strided) for p in params):
        return None
    return _grad_enabled() and (input.requires_grad or any(p is not None and p.requires_grad for p in params))


def _same_kind(x: Tensor, *params: Optional[Tensor]) -> bool:
    """A float32/float64/float16/bfloat16 CPU strided non-empty ``x`` and parameters of its
    device and dtype (or float32 for a half ``x``: torch's mixed CPU kernels take both)."""
    if x.dtype not in _FLOATS + _HALVES or x.device.type != "cpu" or x.layout != torch.strided or x.numel() == 0:
        return False
    dtypes = (x.dtype, torch.float32) if x.dtype in _HALVES else (x.dtype,)
    return all(t is None or (t.dtype in dtypes and t.device == x.device and t.layout == torch.strided)
               for t in params)


def _up(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """A half parameter of a half ``x`` as the float32 the kernels take (a differentiable
    cast); anything else as is."""
    return t.float() if t is not None and x.dtype in _HALVES and t.dtype == x.dtype else t


def _opmath_eps(x: Tensor) -> float:
    """torch's ``eps=None`` for RMSNorm: the machine epsilon of the type ``x`` is computed in
    (float32 for the half types)."""
    return torch.finfo(torch.float32 if x.dtype in _HALVES else x.dtype).eps


def _shape(normalized_shape: _Shape) -> Tuple[int, ...]:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _layer_applies(x: Tensor, shape: Tuple[int, ...], eps: float, *params: Optional[Tensor]) -> bool:
    return (_same_kind(x, *params) and 0 < len(shape) <= x.dim() and tuple(x.shape[x.dim() - len(shape):]) == shape
            and all(t is None or tuple(t.shape) == shape for t in params) and 0.0 < eps < float("inf"))


def layer_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.layer_norm`` on batchnorm's kernels (torch's where they do not apply)."""
    shape = _shape(normalized_shape)
    if isinstance(input, _Proxy) or (_graph_or_eager(input, weight, bias) and _layer_applies(input, shape, eps, weight, bias)):
        return _run("layer_norm", input, len(shape), _up(input, weight), _up(input, bias), eps,  # type: ignore[no-any-return]
                    False)[0]
    return F.layer_norm(input, list(shape), weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: _Shape, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """``torch.nn.functional.rms_norm`` on batchnorm's kernels; ``eps=None`` is the machine
    epsilon of the type the input is computed in (float32 for half inputs), as in torch."""
    shape = _shape(normalized_shape)
    if not isinstance(input, _Proxy):
        value = _opmath_eps(input) if eps is None and input.is_floating_point() else eps
        if not (_graph_or_eager(input, weight) and value is not None and _layer_applies(input, shape, value, weight)):
            return F.rms_norm(input, list(shape), weight, eps)
        eps = value
    return _run("layer_norm", input, len(shape), _up(input, weight), None, eps, True)[0]  # type: ignore[no-any-return]


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.group_norm`` on batchnorm's kernels (channels-last memory read in place)."""
    if not isinstance(input, _Proxy):
        _check_values_per_group(input.shape, num_groups, 1)  # torch's first check, in its words
    if isinstance(input, _Proxy) or (
            _graph_or_eager(input, weight, bias) and _same_kind(input, weight, bias) and input.dim() >= 2
            and num_groups > 0 and input.shape[1] % num_groups == 0 and 0.0 < eps < float("inf")
            and all(t is None or tuple(t.shape) == (input.shape[1],) for t in (weight, bias))):
        return _run("group_norm", input, num_groups, _up(input, weight), _up(input, bias),  # type: ignore[no-any-return]
                    eps)[0]
    return F.group_norm(input, num_groups, weight, bias, eps)


def _instance_applies(x: Tensor, params: List[Optional[Tensor]], use_input_stats: bool, momentum: float,
                      eps: float) -> bool:
    running_mean, running_var = params[2], params[3]
    if not (_graph_or_eager(x, *params) and _same_kind(x, *params) and x.dim() >= 3 and 0.0 < eps < float("inf")):
        return False
    if any(t is not None and tuple(t.shape) != (x.shape[1],) for t in params):
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):  # type: ignore[union-attr]
        return False
    if not use_input_stats:
        return running_mean is not None
    # one value per instance: torch's error
    return x[0, 0].numel() > 1 and (running_mean is None or 0.0 <= momentum <= 1.0)


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.instance_norm`` on batchnorm's kernels: per-instance statistics
    (updating the running statistics in place when given), or the running statistics when
    ``use_input_stats`` is False."""
    params = [weight, bias, running_mean, running_var]
    if not isinstance(input, _Proxy) and not _instance_applies(input, params, use_input_stats, momentum, eps):
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    weight, bias = _up(input, weight), _up(input, bias)
    if not use_input_stats:
        return _torch_ops.batch_norm_eval(input, weight, bias, _up(input, running_mean),  # type: ignore[no-any-return]
                                          _up(input, running_var), eps)
    y, _, _, new_mean, new_var = _run("instance_norm_train", input, weight, bias, _up(input, running_mean),
                                       _up(input, running_var), momentum, eps)
    if running_mean is not None and running_var is not None:  # the op's outputs carry no grad
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y  # type: ignore[no-any-return]


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on batchnorm's kernels; constructor, parameters, ``state_dict``
    and ``repr`` are torch's. ``isinstance(m, torch.nn.LayerNorm)`` holds."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize the trailing ``normalized_shape`` dimensions, as torch's ``forward``."""
        if _is_scripting():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        params = self._parameters
        weight, bias, shape = params.get("weight"), params.get("bias"), self.normalized_shape
        graph = _direct(input, weight, bias) if shape else None
        if (graph is not None and input.shape[input.dim() - len(shape):] == shape
                and all(t is None or t.shape == shape for t in (weight, bias)) and 0.0 < self.eps < math.inf):
            if graph:
                return ops.EAGER["layer_norm"](input, len(shape), weight, bias, self.eps, False)[0]
            return _tensor(_core.layer_norm(input.numpy(), len(shape), _numpy(weight), _numpy(bias), self.eps)[0])
        return layer_norm(input, shape, weight, bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on batchnorm's kernels; constructor, parameters, ``state_dict``
    and ``repr`` are torch's. ``isinstance(m, torch.nn.RMSNorm)`` holds."""

    def forward(self, x: Tensor) -> Tensor:
        """Divide by the root mean square of the trailing dimensions, as torch's ``forward``."""
        if _is_scripting():
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return self._kernels(x)

    @torch.jit.unused
    def _kernels(self, x: Tensor) -> Tensor:
        weight, shape, eps = self._parameters.get("weight"), self.normalized_shape, self.eps
        graph = _direct(x, weight) if shape else None
        if graph is not None and x.shape[x.dim() - len(shape):] == shape and (weight is None or weight.shape == shape):
            value = torch.finfo(x.dtype).eps if eps is None else eps
            if 0.0 < value < math.inf:
                if graph:
                    return ops.EAGER["layer_norm"](x, len(shape), weight, None, value, True)[0]
                return _tensor(_core.layer_norm(x.numpy(), len(shape), _numpy(weight), None, value, True)[0])
        return rms_norm(x, shape, weight, eps)


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` ((N, C, *) input, also channels_last) on batchnorm's kernels;
    constructor, parameters, ``state_dict`` and ``repr`` are torch's."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize over each group of channels per sample, as torch's ``forward``."""
        if _is_scripting():
            return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        params = self._parameters
        weight, bias, groups = params.get("weight"), params.get("bias"), self.num_groups
        # numel == groups: one value per group, torch's error (the general route raises it)
        graph = _direct(input, weight, bias)
        if (graph is not None and input.dim() >= 2 and input.shape[1] == self.num_channels
                and input.numel() != groups and all(t is None or t.shape == (self.num_channels,) for t in (weight, bias))
                and 0.0 < self.eps < math.inf):
            if graph:
                return ops.EAGER["group_norm"](input, groups, weight, bias, self.eps)[0]
            return _tensor(_core.group_norm(input.numpy(), groups, _numpy(weight), _numpy(bias), self.eps)[0])
        return group_norm(input, groups, weight, bias, self.eps)


class _InstanceDropIn(torch.nn.modules.instancenorm._InstanceNorm):
    """torch's ``_InstanceNorm`` (its rank checks, unbatched inputs and warnings) with the
    normalization itself on batchnorm's kernels."""

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        if _is_scripting():
            return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training or not self.track_running_stats,
                                   self.momentum if self.momentum is not None else 0.0, self.eps)
        return self._kernels(input)

    @torch.jit.unused
    def _kernels(self, input: Tensor) -> Tensor:
        params = self._parameters
        weight, bias = params.get("weight"), params.get("bias")
        # without running statistics (the default); one value per instance is torch's error
        graph = None if self.track_running_stats else _direct(input, weight, bias)
        if (graph is not None and input.dim() >= 3 and input.shape[1] == self.num_features
                and input[0, 0].numel() > 1 and all(t is None or t.shape == (self.num_features,) for t in (weight, bias))
                and 0.0 < self.eps < math.inf):
            if graph:
                return ops.EAGER["instance_norm_train"](input, weight, bias, None, None, 0.0, self.eps)[0]
            return _tensor(_core.instance_norm(input.numpy(), _numpy(weight), _numpy(bias), None, None, 0.0,
                                               self.eps)[0])
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
