"""``torch.nn.SyncBatchNorm`` for CPU tensors: gloo (or MPI) process groups, under DDP.

torch's own SyncBatchNorm refuses CPU input ("SyncBatchNorm expected input tensor to be on
GPU ..."). This one takes the same constructor, parameters, buffers and ``state_dict``, and
runs the exchange of ``batchnorm.distributed`` (exact float64 statistics, one all-gather
forward and one all-reduce backward) with batchnorm's kernels inside an autograd Function.

It subclasses torch's ``_BatchNorm`` (the base of ``torch.nn.SyncBatchNorm``), not
``torch.nn.SyncBatchNorm`` itself: ``DistributedDataParallel`` refuses every
``torch.nn.SyncBatchNorm`` instance in a CPU model ("SyncBatchNorm layers only work with GPU
modules"). Non-CPU input is handed to torch's own SyncBatchNorm forward.

Exported by ``batchnorm.torch``; importing it imports torch.
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type, TypeVar, overload

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import _core  # type: ignore[attr-defined, unused-ignore]
from ._torch_ops import in_torch_layout
from .distributed import (
    _DTYPE_CODES,
    Moments,
    _local_moments,
    _is_torch_group,
    _is_torch_non_member,
    _Transport,
    backward_sums,
    check_count,
    check_peers,
    global_grad_sums,
    global_moments,
    invstd_of,
    kernel_stats,
    peers_checked,
    shifted_bias,
    shifted_sum_dy,
    token_to_restore,
    torch_transport,
    update_running,
)

__all__ = ["SyncBatchNorm", "convert_sync"]

_FLOATS: Dict[torch.dtype, np.dtype[Any]] = {
    torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)
}


def _numpy(t: Optional[Tensor]) -> Any:
    """A NumPy view of a CPU tensor's memory (no copy), or None."""
    return None if t is None else t.detach().numpy()


class _SyncBatchNormFunction(torch.autograd.Function):
    """Synchronized training batch norm on CPU tensors; gradients of input, weight, bias."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        eps: float,
        factor: float,
        link: _Transport,
        module: "SyncBatchNorm",
    ) -> Tensor:
        """Exchange, merge, update the running statistics, normalize."""
        channels = module.num_features
        empty = [False]

        def local() -> Tuple[Moments, float]:
            module._check_local(x)
            empty[0] = x.numel() == 0
            return _local_moments(_numpy(x), 1, empty[0], channels), _DTYPE_CODES[_FLOATS[x.dtype]]

        count, mean, m2 = global_moments(link, channels, local)
        check_count(count, link)
        invstd = invstd_of(count, m2, eps)
        stats = kernel_stats(mean, invstd, _FLOATS[x.dtype])
        y = torch.empty_like(x, memory_format=torch.preserve_format)
        if not empty[0]:
            w = _numpy(weight)
            _core.batch_norm_apply(_numpy(x), stats.mean, stats.invstd, w, shifted_bias(stats, w, _numpy(bias)),
                                   1, y.numpy())
        if count > 0:  # an empty whole batch carries no statistics
            update_running(_numpy(running_mean), _numpy(running_var), count, mean, m2, factor)
        ctx.save_for_backward(x, weight)
        ctx.stats = (stats, invstd, count, empty[0], link, channels)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        """torch's rule: grad of weight and bias from this rank's sums (DDP averages them);
        grad of the input from the sums over every rank (one all-reduce)."""
        x, weight = ctx.saved_tensors
        stats, invstd64, count, empty, link, channels = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xn, gyn = _numpy(x), _numpy(grad_y)

        def local() -> Tuple[Any, Any]:
            return backward_sums(gyn, xn, stats, 1, empty)

        grad_x = None
        if need_x:  # every rank decides alike: the same model needs the same gradients
            (sum_dy, sum_dy_xmu), (all_dy, all_dy_xmu) = global_grad_sums(link, channels, local)
            grad_x = torch.empty_like(x, memory_format=torch.preserve_format)
            if not empty:
                _core.batch_norm_backward_apply(
                    gyn, xn, stats.mean, stats.invstd, _numpy(weight), shifted_sum_dy(stats, all_dy, all_dy_xmu),
                    all_dy_xmu, count, 1, grad_x.numpy(),
                )
        elif need_w or need_b:
            sum_dy, sum_dy_xmu = local()
        dtype = _FLOATS[x.dtype]
        grad_w = torch.from_numpy((sum_dy_xmu * invstd64).astype(dtype)) if need_w else None
        grad_b = torch.from_numpy(sum_dy.astype(dtype)) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


_M = TypeVar("_M", bound=torch.nn.Module)
_Sync = TypeVar("_Sync", bound="SyncBatchNorm")


def _check_process_group(group: Any) -> None:
    """TypeError naming ``process_group`` for anything but None or a torch.distributed group
    (torch's own SyncBatchNorm takes anything, and fails at the first step with words that
    do not name it)."""
    if group is not None and not (_is_torch_group(group) or _is_torch_non_member(group)):
        raise TypeError(f"process_group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` whose training statistics span a gloo/MPI process group,
    on CPU tensors (float32/float64, contiguous or channels_last).

    Same constructor (``process_group``: None is the default group), parameters, buffers,
    ``state_dict`` and ``convert_sync_batchnorm`` as ``torch.nn.SyncBatchNorm``. In eval mode,
    and in a group of one process, it is plain batch norm on batchnorm's kernels. Differences
    from torch's: the statistics are exact (float64 partials, Chan's merge); a training
    forward with torch.distributed not initialised raises (torch's silently runs unsynced);
    errors in a step (bad input on one rank, mismatched channel counts or dtypes) are raised
    on every rank, not left to hang; ``num_batches_tracked`` counts after a successful step.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        _check_process_group(process_group)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _check_local(self, input: Tensor) -> None:
        """This rank's checks, run inside the exchange so the other ranks hear of a failure."""
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"input: expected {self.num_features} channels (num_features) on dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )
        if input.dtype not in _FLOATS:
            raise TypeError(f"input must be float32 or float64 on the CPU, got {input.dtype}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(self, name)
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but input has {input.dtype}")

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """torch's; the module then checks its peers as one that trained in this job does
        (``distributed.token_to_restore``): a rank that restores a checkpoint into a rebuilt
        model while the others keep theirs takes part in the same exchanges (it checked
        alone: the exchanges did not match, and gloo aborted the process)."""
        super()._load_from_state_dict(*args, **kwargs)
        self._peers_checked = token_to_restore(self.process_group)

    def _link(self) -> _Transport:
        link = torch_transport(self.process_group, "process_group")
        if not peers_checked(link, getattr(self, "_peers_checked", None)):  # distributed._TOKENS
            self._peers_checked = check_peers(link, self.num_features,
                                              _FLOATS.get(self._param_dtype(), np.dtype(np.float32)))
        return link

    def _param_dtype(self) -> torch.dtype:
        t = self.weight if self.weight is not None else self.running_mean
        return torch.float32 if t is None else t.dtype

    def forward(self, input: Tensor) -> Tensor:
        """torch's ``SyncBatchNorm.forward`` for CPU tensors (others: torch's own)."""
        if input.device.type != "cpu":
            return torch.nn.SyncBatchNorm.forward(self, input)  # type: ignore[arg-type]
        counting = self.training and self.track_running_stats and self.num_batches_tracked is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if counting and self.momentum is None:  # cumulative average, this batch included
            factor = 1.0 / float(self.num_batches_tracked + 1)  # type: ignore[operator]
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        buffers = not self.training or self.track_running_stats
        running_mean = self.running_mean if buffers else None
        running_var = self.running_var if buffers else None
        link = self._link() if bn_training and self.training else None
        if link is None or link.size == 1:
            from .torch import batch_norm  # not at import: batchnorm.torch imports this file

            self._check_input_dim(input)  # torch's checks, in its words (several ranks: _check_local)
            self._check_non_zero_input_channels(input)
            y = batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                           factor, self.eps)
        else:
            y = in_torch_layout(_SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, self.eps, factor, link, self
            ), input, True)
        if counting:
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
        return y

    # A batch norm passed at the top level gives a new module of this class; any other
    # module is returned itself.
    @overload
    @classmethod
    def convert_sync_batchnorm(cls: Type[_Sync], module: _BatchNorm, process_group: Any = ...) -> _Sync: ...
    @overload
    @classmethod
    def convert_sync_batchnorm(cls, module: _M, process_group: Any = ...) -> _M: ...
    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` making this class: every
        ``BatchNorm*d`` (any torch ``_BatchNorm``) becomes a SyncBatchNorm holding the same
        parameter and buffer tensors; a batch norm passed at the top level returns its
        replacement."""
        _check_process_group(process_group)
        output = module
        if isinstance(module, _BatchNorm):
            output = cls(
                module.num_features, module.eps, module.momentum, module.affine,
                module.track_running_stats, process_group, bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return output


def convert_sync(module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
    """``convert(model, sync=...)``: every batch norm (any torch ``_BatchNorm``, also
    ``torch.nn.SyncBatchNorm``) becomes this module's SyncBatchNorm over ``process_group``
    (None: the default group), in place, keeping its tensors, flags, hooks and attributes
    (``convert``'s rule; ``convert_sync_batchnorm`` makes new modules, as torch's does)."""
    from .torch import _replacement, _swap_tree  # not at import: batchnorm.torch imports this file

    def replace(m: torch.nn.Module) -> Optional[torch.nn.Module]:
        if not isinstance(m, _BatchNorm):
            return None
        new = m if type(m) is SyncBatchNorm else _replacement(m, SyncBatchNorm)
        new.process_group = process_group
        return new
    return _swap_tree(module, replace)
