"""batchnorm's kernels as torch operators (``torch.ops.batchnorm.*``), for graph capture and
function transforms: ``torch.compile`` / ``torch.export`` / ``torch.fx`` record them as
``batchnorm::`` nodes, ``torch.func`` (grad, vmap, is_grads_batched) runs them through
their autograd and vmap rules.

Each normalization registers a few ops with ``register_op``: a schema-bearing Python kernel
that calls ``_core`` on NumPy views of the tensors, a fake implementation (shapes only), and
optionally autograd (``setup_context`` + ``backward``) and a vmap rule. The kernels take any
strides (each output follows its input's layout, as the fake one says), so the ops are tagged
``flexible_layout``: inductor hands them its channels-last conv outputs as they are. Without
the tag it copied each such input back to the strides seen when tracing, a full read and write
per batch norm (compiled ResNet-18 training, NCHW: 20 copies a step). For the vmap rules of
per-channel norms, ``to_channels`` / ``from_channels`` fold the vmapped dimension into the
channel axis (B independent norms over C channels are one norm over B*C channels).

Imported by ``batchnorm.torch`` only (this module imports torch).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format  # torch's own rule (its refs use it)

from . import _core  # type: ignore[attr-defined, unused-ignore]

NAMESPACE = "batchnorm"


_BFLOAT16: Any = None  # ml_dtypes' bfloat16 as a NumPy dtype; False without ml_dtypes; None: not looked up


def bfloat16_view(t: Tensor) -> Any:
    """A bfloat16 tensor's memory as a NumPy array of ml_dtypes' bfloat16 (a view, no copy),
    or, without ml_dtypes, the tensor itself, which the bindings take through DLPack: about
    5 us more per array (a (1, 64, 7, 7) eval call: 11.7 us with two DLPack arrays, 3.8 with
    these views, on an Intel Xeon)."""
    global _BFLOAT16
    if _BFLOAT16 is None:
        try:
            import ml_dtypes
            _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            _BFLOAT16 = False
    t = t.detach()
    return t if _BFLOAT16 is False else t.view(torch.int16).numpy().view(_BFLOAT16)


def numpy_view(t: Optional[Tensor]) -> Any:
    """A NumPy view of a CPU tensor's memory (no copy), or None (bfloat16: ``bfloat16_view``).
    ``force=True`` detaches in C++ (a third of the call's cost against ``detach()``); it would
    copy a tensor with a conjugate or negative bit, which the kernels' real inputs never have
    and their outputs, new tensors, cannot."""
    if t is None:
        return None
    return bfloat16_view(t) if t.dtype == torch.bfloat16 else t.numpy(force=True)


def stats_like(input: Tensor, size: int) -> Tensor:
    """A new (size,) tensor of the kernels' per-channel dtype for ``input``: float32 for the
    half-precision types (their statistics and parameter gradients), else the input's."""
    half = input.dtype in (torch.float16, torch.bfloat16)
    return input.new_empty(size, dtype=torch.float32 if half else input.dtype)


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# the innermost functorch transform (vmap, grad, ...) running, or None
transform_active: Callable[[], Any] = torch._C._functorch.peek_interpreter_stack


def in_torch_layout(y: Tensor, x: Tensor, follows_channels_last: bool, suggested: bool = False) -> Tensor:
    """``y``, the kernels' output for ``x``, in the memory format of torch's own op's output:
    ``x``'s suggested format (channels_last for a 4-D / 5-D input strided that way, else
    contiguous) where ``follows_channels_last`` (batch, group and RMS norm), contiguous where
    not (instance and layer norm). The kernels' output follows ``x``'s memory order, which is
    torch's for contiguous and channels_last inputs but not for other dense orders, such as
    a (N, L, C) sequence transposed for BatchNorm1d: torch's output is contiguous there, and
    code after the norm may ``.view`` it. A copy in that case only. ``y`` as it is for an fx
    proxy (no strides) and under a functorch transform (its tensors cannot answer
    channels_last queries); dynamo's tracing answers the transform question as if one ran,
    and its fake tensors answer the layout queries, so a compiled call is fixed up too.
    ``suggested``: ``x``'s suggested format always (group norm's rule), also where a size-1
    dimension makes ``x`` channels_last-contiguous but torch suggests contiguous: batch norm
    keeps such an input's order in its output, group norm does not."""
    if isinstance(x, torch.fx.Proxy) or (transform_active() is not None and not torch.compiler.is_compiling()):
        return y
    if y.is_contiguous() and (not follows_channels_last or x.is_contiguous()):
        return y
    if follows_channels_last:
        cl = CHANNELS_LAST.get(x.dim())
        if (not suggested and cl is not None and x.is_contiguous(memory_format=cl)
                and y.is_contiguous(memory_format=cl)):
            return y
        fmt = suggest_memory_format(x)
    else:
        fmt = torch.contiguous_format
    return y if y.is_contiguous(memory_format=fmt) else y.contiguous(memory_format=fmt)


_LIBRARY: Any = torch.library.Library(NAMESPACE, "DEF")  # type: ignore[no-untyped-call]


def register_op(
    name: str,
    kernel: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    schema: str,
    setup_context: Optional[Callable[..., None]] = None,
    backward: Optional[Callable[..., Any]] = None,
    vmap: Optional[Callable[..., Any]] = None,
) -> Any:
    """Registers ``batchnorm::<name>`` with its CPU kernel, fake kernel and (when given)
    autograd and vmap rules; returns the op (``torch.ops.batchnorm.<name>``).

    Defined on a ``torch.library.Library`` rather than by ``torch.library.custom_op``, whose
    wrappers around the kernel (a dynamo-disabled frame, an aliasing check of the outputs)
    cost about 2.5 us a call, a sixth of a small eval call's."""
    qualname = f"{NAMESPACE}::{name}"
    _LIBRARY.define(name + schema, tags=(torch.Tag.pt2_compliant_tag, torch.Tag.flexible_layout))
    _LIBRARY.impl(name, kernel, "CPU")
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIBRARY)
    if vmap is not None:
        torch.library.register_vmap(qualname, vmap, lib=_LIBRARY)
    return getattr(torch.ops.batchnorm, name).default


# ---------------------------------------------------------------- vmap helpers (per-channel)


def to_channels(x: Tensor, dim: Optional[int], size: int) -> Tensor:
    """(..., B at ``dim``, N, C, *rest) -> (N, B*C, *rest): B norms over C channels as one
    norm over B*C channels (an unbatched ``x`` is repeated B times)."""
    x = x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)
    return x.movedim(0, 1).flatten(1, 2)


def from_channels(y: Tensor, size: int) -> Tensor:
    """(N, B*C, *rest) -> (N, B, C, *rest), the vmapped dimension at 1 (a view)."""
    return y.view(*y.shape[:1], size, -1, *y.shape[2:])


def per_channel(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """A (C,) argument (or (B, C) batched at ``dim``) as (B*C,)."""
    if t is None:
        return None
    return t.repeat(size) if dim is None else t.movedim(dim, 0).flatten()


# ---------------------------------------------------------------- batch norm


def _train_outputs(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float, eps: float, relu: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    y = torch.empty_like(input, memory_format=torch.preserve_format)
    # functional (autograd needs it): the updated running statistics are new tensors, which
    # the caller copies into the buffers
    new_mean, new_var = (running_mean.clone(), running_var.clone()) if running_mean is not None \
        and running_var is not None else (stats_like(input, 0), stats_like(input, 0))
    stats = running_mean is not None
    _, mean, invstd = _core.forward_train(
        numpy_view(input), numpy_view(weight), numpy_view(bias),
        numpy_view(new_mean) if stats else None, numpy_view(new_var) if stats else None,
        momentum if stats else 0.0, eps, 1, numpy_view(y), relu)
    return y, torch.from_numpy(mean), torch.from_numpy(invstd), new_mean, new_var


def _train_kernel(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _train_outputs(input, weight, bias, running_mean, running_var, momentum, eps, False)


def _train_relu_kernel(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], momentum: float, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _train_outputs(input, weight, bias, running_mean, running_var, momentum, eps, True)


def _fusion_pass() -> None:
    """Installs the inductor fusion pass (a no-op unless inductor is loaded): the fake kernels
    call it, since tracing them is the first sign that a graph holding these ops may compile."""
    from . import _inductor_fusion

    _inductor_fusion.install()


def _train_fake(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float,
                eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _fusion_pass()
    channels = input.shape[1]
    stats = channels if running_mean is not None else 0
    return (torch.empty_like(input, memory_format=torch.preserve_format),
            stats_like(input, channels), stats_like(input, channels), stats_like(input, stats),
            stats_like(input, stats))


def _eval_kernel(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    return _eval_act_kernel(input, weight, bias, running_mean, running_var, eps, None, False)


def _eval_fake(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    _fusion_pass()
    return torch.empty_like(input, memory_format=torch.preserve_format)


def _eval_act_kernel(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, eps: float, residual: Optional[Tensor], relu: bool) -> Tensor:
    y = torch.empty_like(input, memory_format=torch.preserve_format)
    _core.forward_eval(numpy_view(input), numpy_view(running_mean), numpy_view(running_var),
                       numpy_view(weight), numpy_view(bias), eps, 1, numpy_view(y), numpy_view(residual), relu)
    return y


def _eval_act_fake(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                   running_var: Tensor, eps: float, residual: Optional[Tensor], relu: bool) -> Tensor:
    return _eval_fake(input, weight, bias, running_mean, running_var, eps)


def _not_positive_kernel(input: Tensor) -> Tensor:
    mask = torch.empty_like(input, dtype=torch.bool, memory_format=torch.preserve_format)
    view = numpy_view(input)
    if isinstance(view, Tensor):  # bfloat16 without ml_dtypes
        torch.le(view, 0, out=mask)
    else:  # NumPy's comparison: 69 us for (8, 64, 32, 32) float32 where ATen's took 270
        np.less_equal(view, 0, out=mask.numpy())
    return mask


def _not_positive_fake(input: Tensor) -> Tensor:
    return torch.empty_like(input, dtype=torch.bool, memory_format=torch.preserve_format)


def _backward_kernel(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                     invstd: Tensor, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    grad_input = torch.empty_like(input, memory_format=torch.preserve_format)
    _, grad_weight, grad_bias = _core.backward(
        numpy_view(grad_out), numpy_view(input), numpy_view(mean), numpy_view(invstd),
        numpy_view(weight), 1, training, numpy_view(grad_input))
    return grad_input, torch.from_numpy(grad_weight), torch.from_numpy(grad_bias)


def _backward_fake(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                   invstd: Tensor, training: bool) -> Tuple[Tensor, Tensor, Tensor]:
    channels = input.shape[1]
    return (torch.empty_like(input, memory_format=torch.preserve_format),
            stats_like(input, channels), stats_like(input, channels))


def eval_invstd(running_var: Tensor, eps: float) -> Tensor:
    """1 / sqrt(running_var + eps), computed in float64 (the kernels' backward takes invstd)."""
    return torch.rsqrt(running_var.detach().double() + eps).to(running_var.dtype)


def backward_of(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                second: Tensor, training: bool, eps: float,
                needs: Sequence[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of (input, weight, bias), None where not needed. ``mean``/``second`` are the
    batch mean and invstd (training) or the running mean and variance as saved at forward
    (eval: the forward's values, as torch's autograd formula saves them). With grad mode on (``create_graph=True``) torch's differentiable
    ``native_batch_norm_backward`` runs, so that higher-order gradients exist."""
    mask = [needs[0], needs[1] and weight is not None, needs[2]]
    if torch.is_grad_enabled() and not training:
        # eval backward is linear in grad_out: composite ops (functorch has no batching rule
        # for an eval-mode native_batch_norm_backward)
        shape = [1, -1] + [1] * (input.dim() - 2)
        invstd = torch.rsqrt(second + eps).view(shape)
        dims = [d for d in range(input.dim()) if d != 1]
        gx = grad_out * (invstd if weight is None else invstd * weight.view(shape))
        gw = (grad_out * (input - mean.view(shape)) * invstd).sum(dims)
        gb = grad_out.sum(dims)
    elif torch.is_grad_enabled():
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, weight, None, None, mean, second, training, eps, mask)
    else:
        invstd = second if training else eval_invstd(second, eps)
        gx, gw, gb = batch_norm_backward(grad_out, input, weight, mean, invstd, training)
    return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None


def _train_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, ...]) -> None:
    x, weight = inputs[0], inputs[1]
    ctx.mark_non_differentiable(*output[1:])  # statistics: no gradient flows back through them
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.eps = inputs[6]


def _train_backward(ctx: Any, grad_y: Tensor, *_: Any) -> Tuple[Any, ...]:
    x, weight, mean, invstd = ctx.saved_tensors
    gx, gw, gb = backward_of(grad_y, x, weight, mean, invstd, True, ctx.eps, ctx.needs_input_grad[:3])
    return gx, gw, gb, None, None, None, None


def _eval_setup(ctx: Any, inputs: Tuple[Any, ...], output: Tensor) -> None:
    x, weight, _, running_mean, running_var, eps = inputs
    # the running statistics as they are now: a later training step may update them in place
    ctx.save_for_backward(x, weight, running_mean.detach().clone(), running_var.detach().clone())
    ctx.eps = eps


def _eval_backward(ctx: Any, grad_y: Tensor) -> Tuple[Any, ...]:
    x, weight, running_mean, running_var = ctx.saved_tensors
    gx, gw, gb = backward_of(grad_y, x, weight, running_mean, running_var, False, ctx.eps,
                             ctx.needs_input_grad[:3])
    return gx, gw, gb, None, None, None


_UNBATCHED_STATS = (
    "batchnorm::batch_norm_train: vmap got a batched input but unbatched running_mean / "
    "running_var, which training updates in place. Batch the running statistics too, or do "
    "without them (track_running_stats=False, or torch.func.replace_all_batch_norm_modules_)")


def _train_vmap(info: Any, in_dims: Tuple[Optional[int], ...], input: Tensor,
                weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum: float, eps: float) -> Tuple[Any, Any]:
    size = info.batch_size
    if running_mean is not None and (in_dims[3] is None or in_dims[4] is None):
        raise RuntimeError(_UNBATCHED_STATS)
    args = [per_channel(t, d, size) for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])]
    y, mean, invstd, new_mean, new_var = batch_norm_train(
        to_channels(input, in_dims[0], size), *args, momentum, eps)
    stats = [t.view(size, t.shape[0] // size) for t in (mean, invstd, new_mean, new_var)]
    return (from_channels(y, size), *stats), (1, 0, 0, 0, 0)


def _eval_vmap(info: Any, in_dims: Tuple[Optional[int], ...], input: Tensor,
               weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
               running_var: Tensor, eps: float) -> Tuple[Tensor, int]:
    size = info.batch_size
    args = [per_channel(t, d, size) for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])]
    y = batch_norm_eval(to_channels(input, in_dims[0], size), *args, eps)
    return from_channels(y, size), 1


def _backward_vmap(info: Any, in_dims: Tuple[Optional[int], ...], grad_out: Tensor, input: Tensor,
                   weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                   training: bool) -> Tuple[Any, Any]:
    size = info.batch_size
    gx, gw, gb = batch_norm_backward(
        to_channels(grad_out, in_dims[0], size), to_channels(input, in_dims[1], size),
        per_channel(weight, in_dims[2], size), per_channel(mean, in_dims[3], size),
        per_channel(invstd, in_dims[4], size), training)
    return (from_channels(gx, size), gw.view(size, -1), gb.view(size, -1)), (1, 0, 0)


batch_norm_train = register_op(
    "batch_norm_train", _train_kernel, _train_fake,
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
           "Tensor? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    setup_context=_train_setup, backward=_train_backward, vmap=_train_vmap)
batch_norm_eval = register_op(
    "batch_norm_eval", _eval_kernel, _eval_fake,
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
           "Tensor running_var, float eps) -> Tensor",
    setup_context=_eval_setup, backward=_eval_backward, vmap=_eval_vmap)

# Fused with the ReLU (and, in eval, the residual add) that follow them, and the ReLU's mask
# for backward: only the graph pass of ``_inductor_fusion`` inserts these, into inductor's
# graphs after autograd, so they need no autograd or vmap rule.
not_positive = register_op("not_positive", _not_positive_kernel, _not_positive_fake,
                           schema="(Tensor input) -> Tensor")
batch_norm_train_relu = register_op(
    "batch_norm_train_relu", _train_relu_kernel, _train_fake,
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
           "Tensor? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
batch_norm_eval_act = register_op(
    "batch_norm_eval_act", _eval_act_kernel, _eval_act_fake,
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, "
           "Tensor running_var, float eps, Tensor? residual, bool relu) -> Tensor")
batch_norm_backward = register_op(
    "batch_norm_backward", _backward_kernel, _backward_fake,
    schema="(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
           "bool training) -> (Tensor, Tensor, Tensor)",
    vmap=_backward_vmap)
