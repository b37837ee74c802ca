"""PyTorch drop-in: ``torch.nn.BatchNorm1d/2d/3d`` running on batchnorm's kernels.

``BatchNorm1d/2d/3d`` here *are* torch modules (subclasses of ``torch.nn.BatchNorm1d/2d/3d``):
same constructor, parameters, buffers, ``state_dict``, ``repr`` and input checks; only
``forward`` differs. It computes exactly what torch's ``forward`` computes, with
batchnorm's kernels inside a ``torch.autograd.Function``: the training forward updates
the running statistics in place in the buffers' memory, the backward returns the
gradients of the input, ``weight`` and ``bias``. Where the kernels do not apply (a
non-CPU device, a dtype other than float32/float64, running statistics that require
grad, an empty batch, tensor subclasses or torch-function modes, ``torch.compile`` /
tracing, CPU autocast, ...) it calls ``torch.nn.functional.batch_norm`` itself.

``convert(model)`` swaps every ``torch.nn.BatchNorm1d/2d/3d`` of a model for these, keeping
its parameter and buffer tensors. This is the only module of the package that imports torch.
"""

# torch's own annotations leave some methods untyped (e.g. _check_input_dim); TorchScript,
# which compiles forward, reads "# type:" comments, so no per-line ignore there.
# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import _core  # type: ignore[attr-defined, unused-ignore]

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert"]

_torch_batch_norm = F.batch_norm  # the fallback (a module attribute, so tests can watch it)
_FLOATS = (torch.float32, torch.float64)
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_has_torch_function = torch.overrides.has_torch_function_variadic
_is_compiling = torch.compiler.is_compiling
_is_tracing: Callable[[], bool] = getattr(torch.jit, "is_tracing")
_is_scripting: Callable[[], bool] = getattr(torch.jit, "is_scripting")
# vmap / grad transforms wrap tensors: their batch norm must be torch's own
_is_functorch_wrapped: Callable[[Tensor], bool] = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False
)


def _per_channel_ok(t: Optional[Tensor], x: Tensor, channels: int) -> bool:
    """A weight/bias/running-stat argument the kernels can take as is (or None)."""
    return t is None or (
        type(t) in _TENSORS
        and t.dtype == x.dtype
        and t.is_cpu
        and t.layout == _STRIDED
        and t.dim() == 1
        and t.shape[0] == channels
    )


def _kernels_apply(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> bool:
    """Whether batchnorm's kernels compute this call exactly as torch would."""
    if _is_compiling() or _is_tracing():  # first: graph capture must not see the checks below
        return False
    if type(x) not in _TENSORS or x.dtype not in _FLOATS or not x.is_cpu or x.layout != _STRIDED:
        return False
    if x.dim() < 2 or x.numel() == 0:  # torch's own messages and empty-batch behaviour
        return False
    channels = x.shape[1]
    if training and x.numel() == channels:  # one value per channel: torch raises its error
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad):  # type: ignore[union-attr]
        return False
    if training and running_mean is not None and not 0.0 <= momentum <= 1.0:
        return False
    if not 0.0 < eps < float("inf"):
        return False
    if not all(_per_channel_ok(t, x, channels) for t in (running_mean, running_var, weight, bias)):
        return False
    if _has_torch_function(x, running_mean, running_var, weight, bias):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return not _is_functorch_wrapped(x)


def _numpy(t: Optional[Tensor]) -> Any:
    """A NumPy view of a CPU tensor's memory (no copy), or None."""
    return None if t is None else t.detach().numpy()


def _forward(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Any, Any]:
    """Run the kernels; return (y, mean, invstd) where mean/invstd are NumPy (C,) arrays
    (the batch's in training, None in eval). ``y`` is allocated by torch in the memory
    format of ``x`` and written by the kernels through a NumPy view of it."""
    xn = _numpy(x)
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    if training:
        if running_mean is None:
            momentum = 0.0  # no running statistics: torch ignores momentum
        _, mean, invstd = _core.forward_train(
            xn, _numpy(weight), _numpy(bias), _numpy(running_mean), _numpy(running_var),
            momentum, eps, 1, y.numpy(),
        )
        return y, mean, invstd
    _core.forward_eval(
        xn, _numpy(running_mean), _numpy(running_var), _numpy(weight), _numpy(bias), eps, 1,
        y.numpy(), None, False,
    )
    return y, None, None


class _BatchNormFunction(torch.autograd.Function):
    """Batch norm forward and backward on batchnorm's kernels (CPU, float32/float64)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """Run the kernels; save what backward needs (batch or running statistics)."""
        y, mean, invstd = _forward(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if training:
            save_mean, save_invstd = torch.from_numpy(mean), torch.from_numpy(invstd)
            ctx.save_for_backward(x, weight, save_mean, save_invstd)
        else:
            # eval: the gradient goes through the running statistics as they are now
            assert running_mean is not None and running_var is not None
            ctx.save_for_backward(x, weight, running_mean.detach().clone(), running_var.detach().clone())
        ctx.training, ctx.eps = training, eps
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Gradients of input, weight and bias (those needed); None for the rest."""
        x, weight, mean, second = ctx.saved_tensors
        training, eps = ctx.training, ctx.eps
        mask = list(ctx.needs_input_grad[:3])
        if weight is None:
            mask[1] = False
        if torch.is_grad_enabled():
            # create_graph=True: torch's own backward op, which is differentiable (double backward).
            if training:
                rm = rv = None
                save_mean, save_invstd = mean, second
            else:
                rm, rv, save_mean, save_invstd = mean, second, None, None
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, weight, rm, rv, save_mean, save_invstd, training, eps, mask
            )
        else:
            invstd = second if training else torch.rsqrt(second.double() + eps).to(second.dtype)
            grad_x = torch.empty_like(x, memory_format=torch.preserve_format)
            _, grad_weight, grad_bias = _core.backward(
                _numpy(grad_y), _numpy(x), _numpy(mean), _numpy(invstd), _numpy(weight), 1, training,
                grad_x.numpy(),
            )
            gx = grad_x
            gw, gb = torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)
        return (
            gx if mask[0] else None,
            gw if mask[1] else None,
            gb if mask[2] else None,
            None, None, None, None, None,
        )


_apply: Callable[..., Tensor] = _BatchNormFunction.apply


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on batchnorm's kernels, differentiable.

    Same arguments, results, in-place running-statistics update and gradients as
    ``torch.nn.functional.batch_norm``; falls back to it where the kernels do not apply
    (see the module docstring). The output has the memory format of ``input``.
    """
    if not _kernels_apply(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    ):
        return _apply(input, weight, bias, running_mean, running_var, training, momentum, eps)
    return _forward(input, running_mean, running_var, weight, bias, training, momentum, eps)[0]


class _DropIn(_BatchNorm):
    """torch's ``_BatchNorm.forward``, line for line, calling ``batch_norm`` above."""

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` as ``torch.nn.BatchNorm*d.forward`` does, on batchnorm's kernels."""
        self._check_input_dim(input)
        # momentum=None: cumulative average, factor 1/num_batches_tracked (after the
        # increment), exactly torch's exponential_average_factor.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if buffers else None
        running_var = self.running_var if buffers else None
        if _is_scripting():  # TorchScript: torch's own op (the kernels are Python-bound)
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, exponential_average_factor, self.eps)
        return self._batch_norm(input, running_mean, running_var, bn_training,
                                exponential_average_factor)

    @torch.jit.unused
    def _batch_norm(
        self,
        input: Tensor,
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
    ) -> Tensor:
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, training,
                          momentum, self.eps)


class BatchNorm1d(_DropIn, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` ((N, C) or (N, C, L) input) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm1d``. ``isinstance(m, torch.nn.BatchNorm1d)`` holds.
    """


class BatchNorm2d(_DropIn, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` ((N, C, H, W) input, also channels_last) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm2d``. ``isinstance(m, torch.nn.BatchNorm2d)`` holds.
    """


class BatchNorm3d(_DropIn, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` ((N, C, D, H, W) input, also channels_last_3d) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm3d``. ``isinstance(m, torch.nn.BatchNorm3d)`` holds.
    """


_REPLACEMENTS: Dict[type, Type[_DropIn]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


_OWN_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _replacement(module: torch.nn.Module, cls: Type[_DropIn]) -> _DropIn:
    """A ``cls`` with the state of ``module``: the same parameter and buffer tensors, flags,
    hooks and attributes. The parameter/buffer registries are new containers (registering
    a tensor on one module does not touch the other); hook dictionaries are shared, so the
    handles returned by ``register_*_hook`` before ``convert`` still remove their hooks."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in _OWN_CONTAINERS:
        if key in state:
            state[key] = state[key].copy()
    new.__dict__.update(state)
    return new


def convert(module: torch.nn.Module, sync: Any = False) -> torch.nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` for batchnorm's drop-in.

    ``sync``: True, or a torch.distributed ProcessGroup, makes every batch norm (also
    ``torch.nn.SyncBatchNorm``) a ``SyncBatchNorm`` over that group (True: the default
    group), as ``SyncBatchNorm.convert_sync_batchnorm(module, group)`` does.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: recursive, in place (the
    children are replaced in their parents), returns ``module``; a batch norm passed at
    the top level returns its replacement. A replacement holds the same parameter and
    buffer tensors (an optimizer built before ``convert`` keeps training them), the
    training flag, hooks and attributes of the module it replaces. Only exact
    ``BatchNorm1d/2d/3d`` are swapped: subclasses (which may override ``forward``),
    ``SyncBatchNorm`` and uninitialized ``LazyBatchNorm*d`` are left alone.
    """
    if sync is not False:
        return convert_sync(module, None if sync is True else sync)
    cls = _REPLACEMENTS.get(type(module))
    if cls is not None:
        return _replacement(module, cls)
    for name, child in module.named_children():
        new_child = convert(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


from ._torch_sync import SyncBatchNorm, convert_sync  # noqa: E402  (it imports this module lazily)
