"""PyTorch drop-in: ``torch.nn.BatchNorm1d/2d/3d`` running on batchnorm's kernels.

``BatchNorm1d/2d/3d`` here *are* torch modules (subclasses of ``torch.nn.BatchNorm1d/2d/3d``):
same constructor, parameters, buffers, ``state_dict``, ``repr`` and input checks; only
``forward`` differs. It computes exactly what torch's ``forward`` computes, on batchnorm's
kernels, by one of two routes:

- eager calls on plain CPU tensors call the kernels directly (a lean
  ``torch.autograd.Function``; a few microseconds per call);
- graph capture and transforms (``torch.compile``, ``torch.export``, ``torch.fx``,
  ``torch.func`` grad / vmap, batched gradients) call the registered operators
  ``torch.ops.batchnorm.batch_norm_train / batch_norm_eval / batch_norm_backward``
  (``_torch_ops``), which carry fake, autograd and vmap rules; under ``torch.compile`` an
  inductor pass fuses them with the ReLU / residual add after them (``_inductor_fusion``).

float16 and bfloat16 inputs run on the kernels too (float32 math inside), with float32
parameters and statistics (CPU autocast hands batch norm its input that way) or parameters in
the input's dtype (``model.bfloat16()``: as torch does, the kernels compute with float32
copies of them and the running statistics are written back in their dtype).

Where the kernels do not apply (a non-CPU device, another dtype, running statistics that
require grad, an empty batch, tensor subclasses or torch-function modes, forward-mode AD,
``torch.jit``, ...) it calls ``torch.nn.functional.batch_norm`` itself.

``convert(model)`` swaps every ``torch.nn.BatchNorm1d/2d/3d`` of a model for these, keeping
its parameter and buffer tensors; ``revert(model)`` swaps them back; ``fold_model(model)``
folds eval-mode batch norms into the convolutions / linear layers that feed them. This is
the only module of the package that imports torch at import time.
"""

# torch's own annotations leave some methods untyped (e.g. _check_input_dim); TorchScript,
# which compiles forward, reads "# type:" comments, so no per-line ignore there.
# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar, overload

import numpy as np

try:
    import torch
except ModuleNotFoundError as error:  # say what the module is and what it takes, not only torch's name
    if error.name != "torch":  # an install of torch that is broken: its own words
        raise
    raise ImportError("batchnorm.torch (the drop-ins for torch models) needs PyTorch, which batchnorm itself does "
                      "not install: pip install torch (its CPU build is enough)") from error
import torch.nn.functional as F
import torch.onnx
from torch import Tensor
from torch.autograd import forward_ad
from torch.ao.quantization import fuser_method_mappings as fuser_methods
from torch.nn.modules.batchnorm import _BatchNorm

from . import _core  # type: ignore[attr-defined, unused-ignore]
from . import _torch_ops as ops
from . import functional
from .distributed import _is_torch_non_member

__all__ = ["FUSER_METHOD_MAPPING", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm",
           "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm", "SyncBatchNorm",
           "batch_norm", "convert", "fold_model", "group_norm", "instance_norm", "layer_norm", "revert",
           "rms_norm"]

_torch_batch_norm = F.batch_norm  # the fallback (a module attribute, so tests can watch it)
_FLOATS = (torch.float32, torch.float64)
_HALVES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = _FLOATS + _HALVES
_from_numpy = torch.from_numpy  # where the array is known not to be bfloat16
_BFLOAT16 = torch.bfloat16
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_has_torch_function = torch.overrides.has_torch_function_variadic
_is_compiling = torch.compiler.is_compiling
# dynamo itself tracing (not a non-strict torch.export, which runs the Python as it is)
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_is_tracing: Callable[[], bool] = getattr(torch.jit, "is_tracing")
_is_scripting: Callable[[], bool] = getattr(torch.jit, "is_scripting")
_in_onnx_export: Callable[[], bool] = torch.onnx.is_in_onnx_export
_transform_active = ops.transform_active
_Proxy = torch.fx.Proxy
_dispatch_modes: Callable[[], int] = getattr(torch._C, "_len_torch_dispatch_stack")
# tensors of graph capture (fake and functional tensors) run the ops, whose fake rules they use
_GRAPH_TENSORS = (torch._subclasses.FakeTensor, torch._subclasses.functional_tensor.FunctionalTensor)
_grad_enabled = torch.is_grad_enabled
_inference_mode = torch.is_inference_mode_enabled
_tracing_state: Callable[[], Any] = getattr(torch._C, "_get_tracing_state")
_has_torch_function_unary = torch.overrides.has_torch_function_unary


def _tensor(array: Any) -> Tensor:
    """``torch.from_numpy``, also for bfloat16 results (``functional._torch_from_numpy``);
    a float array goes straight through (a quarter of a microsecond less per call)."""
    return _from_numpy(array) if array.dtype.kind == "f" else functional._torch_from_numpy(array)


def _records_graph(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether autograd records this call: grad mode on and ``_records`` of its tensors."""
    return _grad_enabled() and _records((input, weight, bias))


def _records(tensors: Sequence[Any]) -> bool:
    """Whether autograd records an op on ``tensors`` (others than tensors skipped) in grad mode,
    as torch's dispatcher decides: one of them requires grad, and not all of them were made
    under ``torch.inference_mode``. Inference tensors carry no autograd key, so a model and its
    input made there run outside it without a graph; with any other tensor among them torch
    records, and refuses to save an inference tensor (``_saves_inference_tensor``)."""
    for t in tensors:  # (a loop: a generator costs half a microsecond, and most calls end here)
        if isinstance(t, Tensor) and t.requires_grad:
            break
    else:
        return False
    # (dynamo cannot trace is_inference(); a compiled graph holds no inference tensors)
    return _is_compiling() or not all(t.is_inference() for t in tensors if isinstance(t, Tensor))


def _records_module_graph(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """``_records_graph`` for a module's shortcut, which leaves parameters made under
    ``torch.inference_mode`` to the general route where grad is on (``_grad_outside_inference_mode``):
    whether a tensor requires grad then decides (the inference tests cost a quarter of a
    microsecond, a few percent of a small call). An inference input that requires grad
    would be saved and raise, as torch's module raises for it."""
    return _grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                or (bias is not None and bias.requires_grad))


def _grad_outside_inference_mode() -> bool:
    """Grad mode on outside ``torch.inference_mode``: a module shortcut whose parameters were
    made there hands such a call to the general route (see ``_records_module_graph``)."""
    return _grad_enabled() and not _inference_mode()


def _plain_eager_input(input: Tensor) -> bool:
    """The cheap first test of a module's shortcut: a tensor of torch's own class, outside
    graph capture, TorchScript tracing, ``torch.func`` transforms, forward-mode AD and
    ``__torch_function__`` overrides."""
    return not (type(input) is not Tensor or _is_compiling() or _tracing_state() is not None
                or _transform_active() is not None or forward_ad._current_level >= 0
                or _has_torch_function_unary(input))


def _forward_ad_active(*tensors: Optional[Tensor]) -> bool:
    """Whether a tangent would flow through this call: an eager dual tensor among
    ``tensors`` or a ``torch.func.jvp`` transform. The kernels have no forward-mode rule,
    so torch's op runs (never a silently dropped tangent)."""
    if forward_ad._current_level >= 0 and any(
            t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return True
    if _transform_active() is None:
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType
    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def _per_channel_ok(t: Optional[Tensor], x: Tensor, channels: int, widened: bool = False) -> bool:
    """A weight/bias/running-stat argument the kernels can take as is (or None): of the
    input's dtype, or float32 for a half-precision input (also of the input's dtype where the
    caller hands the kernels float32 copies: ``widened``)."""
    return t is None or (
        (t.dtype == x.dtype if x.dtype in _FLOATS or widened else t.dtype == torch.float32)
        and t.device == x.device
        and t.layout == _STRIDED
        and t.dim() == 1
        and t.shape[0] == channels
    )


def _number(value: object) -> bool:
    """A real number the kernels' bindings take: not a flag (torch reads True as 1.0), a
    tensor or anything else, for which torch's op runs, with its result or its error."""
    return type(value) is float or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _eps_applies(eps: float) -> bool:
    """An ``eps`` the kernels take: a positive finite number (see ``_number``)."""
    return _number(eps) and 0.0 < eps < math.inf


def _momentum_applies(momentum: float) -> bool:
    """A ``momentum`` the kernels take: a number in [0, 1] (see ``_number``)."""
    return _number(momentum) and 0.0 <= momentum <= 1.0


def _integer(value: object) -> bool:
    """An integer the kernels' bindings take (``num_groups``): not a flag, not a float."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _kernels_apply(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    widened: bool = False,
) -> bool:
    """Whether batchnorm's kernels (directly or as ``batchnorm::`` ops) compute this call
    exactly as torch would. Reads only metadata, so it also holds for fake tensors.
    ``widened``: half-precision per-channel tensors the caller copies to float32."""
    if x.dtype not in _KERNEL_DTYPES or x.device.type != "cpu" or x.layout != _STRIDED:
        return False
    if x.dim() < 2 or x.numel() == 0:  # torch's own messages and empty-batch behaviour
        return False
    channels = x.shape[1]
    if training and x.numel() == channels:  # one value per channel: torch raises its error
        return False
    if (running_mean is None) != (running_var is None):
        return False
    if running_mean is None and not training:  # torch's error, in its words and type
        return False
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad  # type: ignore[union-attr]
                                     or not _apart(running_mean, running_var)):  # type: ignore[arg-type]
        return False
    if training and running_mean is not None and not _momentum_applies(momentum):
        return False
    if training and _inference_tensor_outside_inference_mode(running_mean, running_var):
        return False
    if _saves_inference_tensor(x, weight, bias):
        return False
    if not _eps_applies(eps):
        return False
    return all(_per_channel_ok(t, x, channels, widened) for t in (running_mean, running_var, weight, bias))


def _inference_tensor_outside_inference_mode(*tensors: Optional[Tensor]) -> bool:
    """Whether one of ``tensors`` was made under ``torch.inference_mode`` and this call is
    outside it. Torch then refuses to update such a tensor (a training call's running
    statistics: its op runs, for its error, before anything is written) but takes it as a
    parameter of an eval call (the norms' drop-ins leave that to torch's op)."""
    if _is_compiling():  # dynamo cannot trace these tests (and captures the update as a graph)
        return False
    return not _inference_mode() and any(t is not None and t.is_inference() for t in tensors)


def _apart(a: Tensor, b: Tensor) -> bool:
    """Whether the memory spans of two 1-D tensors are apart, as the kernels require of the
    running statistics; torch also takes interleaved views of one buffer (its op runs then).
    Tensors without memory (graph capture's fake tensors) count as apart."""
    def span(t: Tensor) -> Tuple[int, int]:
        start = t.data_ptr()
        return start, start + ((t.numel() - 1) * max(t.stride(0), 0) + 1) * t.element_size()

    if _is_compiling() or a.numel() == 0 or b.numel() == 0 or a.dim() != 1 or b.dim() != 1:
        return True  # (dynamo cannot trace data_ptr; other shapes: _per_channel_ok refuses them)
    try:
        (a0, a1), (b0, b1) = span(a), span(b)
    except RuntimeError:
        return True
    return a1 <= b0 or b1 <= a0


def _saves_inference_tensor(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether a call would save an inference tensor (``x``, or parameters made under
    ``torch.inference_mode``) for backward, which torch refuses before its op runs; the
    kernels' autograd node saves after them, when a training call has moved the running
    statistics, so torch's op runs such a call, for its error."""
    return (not _is_compiling() and not _inference_mode() and _grad_enabled()
            and any(t is not None and t.is_inference() for t in (x, weight, bias)) and _records((x, weight, bias)))


def _eager(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> bool:
    """Whether this is a plain eager call: CPU tensors of torch's own classes, no graph
    capture, transform, torch-function mode or forward AD. CPU autocast leaves batch norm
    alone (it runs in its input's dtype), so it runs here as without autocast."""
    return (
        _plain_eager_input(x)
        and not _has_torch_function(running_mean, running_var, weight, bias)
        and all(t is None or type(t) in _TENSORS for t in (running_mean, running_var, weight, bias))
    )


def _route(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> Optional[str]:
    """How a call that is not plain eager runs batchnorm's kernels: "graph" (the
    ``batchnorm::`` ops with their own autograd: fx, dynamo / export, dispatch-mode tracing
    such as make_fx), "transform" (``torch.func`` grad / vmap: the autograd.Function over
    the ops), or None (torch's op: TorchScript tracing, ONNX export, autocast, forward-mode AD,
    tensor subclasses and torch-function modes)."""
    if isinstance(x, _Proxy):  # fx.symbolic_trace: record the op
        return "graph"
    if _is_tracing() or _in_onnx_export():  # ONNX has no batchnorm:: ops, but its own norms
        return None
    if _is_compiling():  # autocast too: it leaves batch norm alone, in graphs as in eager calls
        return "graph"
    if torch.is_autocast_enabled("cpu") or _forward_ad_active(x, weight, bias):
        return None
    tensors = [t for t in (x, running_mean, running_var, weight, bias) if t is not None]
    if any(type(t) in _GRAPH_TENSORS for t in tensors) or _dispatch_modes() > 0:
        return "graph"
    if _transform_active() is not None and all(type(t) in _TENSORS for t in tensors):
        return "transform"
    return None


_numpy = ops.numpy_view


def _read_view(t: Tensor) -> Any:
    """``_numpy`` for a tensor the kernels only read (the input, grad_y): ``numpy(force=True)``
    is a view of a CPU tensor also when it requires grad, without ``detach()``'s new tensor
    (0.73 against 0.95 us)."""
    return ops.bfloat16_view(t) if t.dtype is _BFLOAT16 else t.numpy(force=True)


def _half_params(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
) -> bool:
    """A half-precision input whose per-channel tensors all share its dtype
    (``model.bfloat16()``), which torch accepts and computes with in float32. Tensors of
    graph capture (``torch.export``'s fake and functional tensors) count as torch's own."""
    if isinstance(x, _Proxy):  # fx tracing: no dtype to look at (batch_norm records _up instead)
        return False
    given = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    return x.dtype in _HALVES and bool(given) and all(
        (type(t) in _TENSORS or type(t) in _GRAPH_TENSORS) and t.dtype == x.dtype for t in given)


def _up(x: Tensor, t: Optional[Tensor]) -> Optional[Tensor]:
    """A half per-channel tensor of a half ``x`` as the float32 the kernels take (a
    differentiable cast, so its gradient comes back in its dtype); anything else as is."""
    return t.float() if t is not None and x.dtype in _HALVES and t.dtype == x.dtype else t


def _write_back(buffer: Tensor, widened: Tensor) -> None:
    """A running statistic updated in its float32 copy (``_up``), written back rounded to
    its dtype, as torch's CPU kernel stores it; nothing where there was no copy."""
    if widened is not buffer:
        with torch.no_grad():
            buffer.copy_(widened)


# Both read dtypes and identities, which fx proxies do not have: symbolic tracing records them
# as calls, made when the graph runs (so a traced model.bfloat16() runs the kernels too).
torch.fx.wrap("_up")
torch.fx.wrap("_write_back")


def _with_float_params(
    run: Callable[..., Tensor],
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """``run`` (batch_norm's arguments) on float32 copies of half-precision parameters and
    statistics (``model.bfloat16()``), the statistics written back rounded to their dtype, as
    torch's CPU kernel does."""
    rm, rv = _up(input, running_mean), _up(input, running_var)
    y = run(input, rm, rv, _up(input, weight), _up(input, bias), training, momentum, eps)
    if training and running_mean is not None and running_var is not None:
        _write_back(running_mean, rm)  # type: ignore[arg-type]
        _write_back(running_var, rv)  # type: ignore[arg-type]
    return y


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
    (the batch's in training, None in eval). ``y`` is allocated by the kernels in the
    memory layout of ``x`` (channels_last in, channels_last out)."""
    xn = _numpy(x)
    if training:
        if running_mean is None:
            momentum = 0.0  # no running statistics: torch ignores momentum
        y, mean, invstd = _core.forward_train(
            xn, _numpy(weight), _numpy(bias), _numpy(running_mean), _numpy(running_var),
            momentum, eps, 1, None,
        )
        return _tensor(y), mean, invstd
    y = _core.forward_eval(xn, _numpy(running_mean), _numpy(running_var), _numpy(weight),
                           _numpy(bias), eps, 1, None, None, False)
    return _tensor(y), None, None


def _kernel_backward(grad_y: Tensor, arrays: Tuple[Any, ...], training: bool, eps: float,
                     needs: Tuple[bool, ...]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """The kernels' backward on NumPy views, or None where ``grad_y`` is not a plain tensor
    (double backward, a vmap over the backward: the caller uses ``ops.backward_of``).
    ``arrays`` = (x, weight, mean, second): batch mean and invstd in training, running mean
    and variance in eval; ``needs``: ``needs_input_grad``, of which input, weight and bias
    (the first three) are read."""
    if type(grad_y) is not Tensor or _transform_active() is not None or _grad_enabled():
        return None
    try:
        grad_y_numpy = _read_view(grad_y)
    except RuntimeError:  # is_grads_batched: a (legacy vmap) batched tensor has no memory
        return None
    x, weight, mean, second = arrays
    if type(grad_y_numpy) is not type(x) or grad_y_numpy.dtype != x.dtype:
        return None
    invstd = second if training else (1.0 / np.sqrt(second.astype(np.float64) + eps)).astype(second.dtype)
    parameters = (needs[1] and weight is not None) or needs[2]  # else (a frozen batch norm) grad_x alone
    grad_x, grad_weight, grad_bias = _core.backward(grad_y_numpy, x, mean, invstd, weight, 1, training, None,
                                                    parameters)
    return (_tensor(grad_x) if needs[0] else None,
            _from_numpy(grad_weight) if needs[1] and weight is not None else None,
            _from_numpy(grad_bias) if needs[2] else None)


class _EagerFunction(torch.autograd.Function):
    """Plain eager calls that need grad: the kernels on NumPy views passed in (the
    module caches them), a minimal autograd node. Applied through ``_eager_apply``, which
    skips ``Function.apply``'s argument binding (about 10 us; this class has no
    ``setup_context`` and never sees a functorch transform)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        arrays: Tuple[Any, Any, Any, Any],
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """Run the kernels; keep the NumPy views backward needs. (An inference tensor ``x``
        fails to be saved only after this returns, so the callers send a training call with
        one to torch's op first: ``_saves_inference_tensor``.)"""
        xn = _read_view(x)
        w, b, rm, rv = arrays
        if training:
            y, mean, second = _core.forward_train(xn, w, b, rm, rv, momentum, eps, 1, None)
        else:
            y = _core.forward_eval(xn, rm, rv, w, b, eps, 1, None, None, False)
            mean, second = rm.copy(), rv.copy()  # the statistics at forward
        # x only through save_for_backward (its view is made again in backward): saved-tensor
        # hooks (activation checkpointing, offloading) then decide what x's memory does
        ctx.save_for_backward(x, weight)
        ctx.state = ((w, mean, second), training, eps)  # one attribute: each costs a tenth of a us
        return _tensor(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        """Gradients of input, weight and bias (those needed); None for the rest."""
        x, weight = ctx.saved_tensors
        (w, mean, second), training, eps = ctx.state
        needs = ctx.needs_input_grad  # (only its first three are read)
        grads = _kernel_backward(grad_y, (_read_view(x), w, mean, second), training, eps, needs)
        if grads is None:  # create_graph (double backward), batched gradients: the ops, with a
            # half weight (model.bfloat16()) as the float32 the forward computed with (a
            # differentiable cast: its gradient comes back in its dtype)
            grads = ops.backward_of(grad_y, x, _up(x, weight), _from_numpy(mean), _from_numpy(second), training, eps,
                                    needs[:3])
        return (*grads, None, None, None, None)


_eager_apply: Callable[..., Tensor] = getattr(super(torch.autograd.Function, _EagerFunction), "apply")


class _BatchNormFunction(torch.autograd.Function):
    """Batch norm with autograd under ``torch.func`` transforms (``setup_context`` and a
    generated vmap rule make it usable there): the kernels directly where the transform
    hands plain tensors down (grad), the ``batchnorm::`` ops where not (vmap). Returns (y, a, b): the batch mean and invstd
    in training, copies of the running mean and variance in eval (backward uses the running
    statistics as they were at forward, the values torch's autograd formula saves)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Run the kernels (in-place running-statistics update in training)."""
        if type(x) is not Tensor or _transform_active() is not None:  # e.g. vmap's batched tensors
            if training:
                return _graph_train(x, running_mean, running_var, weight, bias, momentum, eps)
            y = ops.batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
            return y, running_mean.clone(), running_var.clone()  # type: ignore[union-attr]
        y, mean, second = _forward(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if not training:
            return y, running_mean.detach().clone(), running_var.detach().clone()  # type: ignore[union-attr]
        return y, torch.from_numpy(mean), torch.from_numpy(second)

    @staticmethod
    def setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[Tensor, Tensor, Tensor]) -> None:
        """Save the input, weight and the statistics backward needs."""
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.save_for_backward(inputs[0], inputs[1], output[1], output[2])
        ctx.training, ctx.eps = inputs[5], inputs[7]

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, *_: Any) -> Tuple[Optional[Tensor], ...]:
        """Gradients of input, weight and bias (those needed); None for the rest."""
        x, weight, mean, second = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = None
        if type(x) is Tensor and _transform_active() is None:
            arrays = (_numpy(x), _numpy(weight), _numpy(mean), _numpy(second))
            grads = _kernel_backward(grad_y, arrays, ctx.training, ctx.eps, needs)
        if grads is None:  # create_graph, vmap over the backward: the ops
            grads = ops.backward_of(grad_y, x, weight, mean, second, ctx.training, ctx.eps, needs)
        return (*grads, None, None, None, None, None)


_apply: Callable[..., Tuple[Tensor, Tensor, Tensor]] = _BatchNormFunction.apply


def _graph_train(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: float,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """A training call as the ``batchnorm::batch_norm_train`` op: (y, batch mean, invstd);
    the running statistics are updated in place."""
    y, mean, invstd, new_mean, new_var = ops.batch_norm_train(
        input, weight, bias, running_mean, running_var, momentum, eps)
    if running_mean is not None and running_var is not None:  # the op's outputs carry no grad
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    return y, mean, invstd


def _graph_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """The call as ``batchnorm::`` ops (graph capture: their own autograd rules)."""
    if not training:
        return ops.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)  # type: ignore[no-any-return]
    return _graph_train(input, running_mean, running_var, weight, bias, momentum, eps)[0]


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
    (see the module docstring). The output has torch's memory format: channels_last for a
    channels_last input, contiguous otherwise (``ops.in_torch_layout``).
    """
    if not isinstance(input, (Tensor, _Proxy)) or type(training) is not bool:  # torch's TypeError for them
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if _half_params(input, running_mean, running_var, weight, bias) and (
            _eager(input, running_mean, running_var, weight, bias)
            or _route(input, running_mean, running_var, weight, bias) is not None):
        return _with_float_params(batch_norm, input, running_mean, running_var, weight, bias, training, momentum, eps)
    if _eager(input, running_mean, running_var, weight, bias):
        if not _kernels_apply(input, running_mean, running_var, weight, bias, training, momentum, eps):
            return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        if _records_graph(input, weight, bias):
            if training and running_mean is None:
                momentum = 0.0  # no running statistics: torch ignores momentum
            arrays = (_numpy(weight), _numpy(bias), _numpy(running_mean), _numpy(running_var))
            y = _eager_apply(input, weight, bias, arrays, training, momentum, eps)
        else:
            y = _forward(input, running_mean, running_var, weight, bias, training, momentum, eps)[0]
        return ops.in_torch_layout(y, input, True)
    if isinstance(input, _Proxy):  # fx tracing: half or not is known when the graph runs
        return ops.in_torch_layout(_with_float_params(_graph_batch_norm, input, running_mean, running_var, weight,
                                                      bias, training, momentum, eps), input, True)
    route = _route(input, running_mean, running_var, weight, bias)
    if route is not None and _kernels_apply(input, running_mean, running_var, weight, bias, training, momentum, eps):
        if route == "transform":
            return _apply(input, weight, bias, running_mean, running_var, training, momentum, eps)[0]
        return ops.in_torch_layout(
            _graph_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps), input, True)
    return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _memory_of(rm: Optional[Tensor], rv: Optional[Tensor], w: Optional[Tensor], b: Optional[Tensor],
               counter: Optional[Tensor]) -> Tuple[Any, ...]:
    """Where each tensor's memory is, its stride and its size (0 for None): ``.data =`` and
    ``Module.to()`` swap it under the same Parameter, which keeps its identity, and a view of
    other elements, or of fewer, may start at the same address (parameters in one flat buffer,
    ``.data = w.data[:2]``, where torch's error is due). (Spelled out: a generator costs half a
    microsecond here.)"""
    return (rm.data_ptr() if rm is not None else 0, rv.data_ptr() if rv is not None else 0,
            w.data_ptr() if w is not None else 0, b.data_ptr() if b is not None else 0,
            counter.data_ptr() if counter is not None else 0,
            rm.stride() if rm is not None else 0, rv.stride() if rv is not None else 0,
            w.stride() if w is not None else 0, b.stride() if b is not None else 0,
            rm.numel() if rm is not None else 0, rv.numel() if rv is not None else 0,
            w.numel() if w is not None else 0, b.numel() if b is not None else 0)


class _ModuleViews:
    """What a batch-norm drop-in's shortcut keeps between calls: the module's tensors it was
    made from, where their memory was and the eps (it holds while all are the same), their
    NumPy views, and what an input must match to use them."""

    __slots__ = ("running_mean", "running_var", "weight", "bias", "counter", "memory", "eps", "arrays", "count",
                 "dtype", "channels", "half", "inference", "inference_params")
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    counter: Optional[Tensor]
    memory: Tuple[Any, ...]
    eps: float
    arrays: Tuple[Any, Any, Any, Any]
    count: Any  # the counter's 1-element NumPy view, or None
    dtype: torch.dtype
    channels: int
    half: bool
    inference: bool  # running statistics or counter made under torch.inference_mode
    inference_params: bool  # weight or bias made there

    @staticmethod
    def make(input: Tensor, rm: Optional[Tensor], rv: Optional[Tensor], w: Optional[Tensor], b: Optional[Tensor],
             counter: Optional[Tensor], eps: float) -> Optional[_ModuleViews]:
        """The views for ``input``'s dtype and channel count, or None where the kernels do
        not apply to these tensors (the general route decides)."""
        half = _half_params(input, rm, rv, w, b)
        if not (all(t is None or type(t) in _TENSORS for t in (rm, rv, w, b))
                and _kernels_apply(input, rm, rv, w, b, False, 0.0, eps, widened=half)):
            return None
        arrays = (_numpy(w), _numpy(b), _numpy(rm), _numpy(rv))
        if half and not all(a is None or isinstance(a, np.ndarray) for a in arrays):
            return None  # bfloat16 without ml_dtypes: no NumPy view to widen
        views = _ModuleViews()
        views.running_mean, views.running_var, views.weight, views.bias, views.counter = rm, rv, w, b, counter
        views.memory, views.eps, views.arrays = _memory_of(rm, rv, w, b, counter), eps, arrays
        # the counter as a 1-element NumPy view: ``+= 1`` there costs a sixth of ``add_(1)``
        views.count = (counter.numpy().reshape(1) if counter is not None and type(counter) in _TENSORS
                       and counter.is_cpu and counter.shape == () else None)
        views.dtype, views.channels, views.half = input.dtype, input.shape[1], half
        # (see _inference_tensor_outside_inference_mode)
        views.inference = any(t is not None and t.is_inference() for t in (rm, rv, counter))
        views.inference_params = any(t is not None and t.is_inference() for t in (w, b))
        return views


class _ViewsFollowTensors(torch.nn.Module):
    """Mixin of the drop-ins whose shortcut caches NumPy views of their tensors (``_views``):
    the cache goes when the module's tensors are replaced through the module (``.to()``,
    ``.double()``, attribute assignment, ``load_state_dict(assign=True)``), since it holds the
    old tensors' memory, which torch's own module frees at once. A ``.data =`` swap, which the
    module cannot see, is released at its next call."""

    __jit_ignored_attributes__ = ["_views"]  # TorchScript cannot type the cache (and never uses it)

    def __getstate__(self) -> Dict[str, Any]:
        """torch's state (without ``Module.compile()``'s bound call), pickled and copied
        without the cached views (they alias this module's tensors)."""
        state: Dict[str, Any] = super().__getstate__()
        state.pop("_views", None)
        return state

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self.__dict__.pop("_views", None)
        return super()._apply(fn, recurse)

    def register_parameter(self, name: str, param: Optional[torch.nn.Parameter]) -> None:
        self.__dict__.pop("_views", None)
        super().register_parameter(name, param)

    def register_buffer(self, name: str, tensor: Optional[Tensor], persistent: bool = True) -> None:
        self.__dict__.pop("_views", None)
        super().register_buffer(name, tensor, persistent)


class _DropIn(_ViewsFollowTensors, _BatchNorm):
    """torch's ``_BatchNorm.forward``, line for line, calling ``batch_norm`` above; with a
    shortcut for plain eager calls (the per-call cost of a small layer is mostly Python)."""

    _ranks: Tuple[int, ...] = ()  # input ranks _check_input_dim accepts
    _channels_last: torch.memory_format = torch.contiguous_format  # those ranks' channels-last format
    _views: Optional[_ModuleViews] = None  # the shortcut's cache

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` as ``torch.nn.BatchNorm*d.forward`` does, on batchnorm's kernels."""
        if not _is_scripting():
            y = self._shortcut(input)
            if y is not None:
                return y
        if _is_scripting():
            self._check_input_dim(input)
        else:
            self._check_dim(input)
        # momentum=None: cumulative average, factor 1/num_batches_tracked (after the
        # increment), exactly torch's exponential_average_factor.
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                if _is_scripting():
                    self.num_batches_tracked.add_(1)
                else:
                    self._count_batch(input)
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
    def _check_dim(self, input: Tensor) -> None:
        """torch's rank check, except on ``torch.fx`` proxies (the rank is unknown while tracing):
        there, a trace that does not count the batch reads ``num_batches_tracked`` all the same,
        so the GraphModule keeps the buffer and its ``state_dict`` torch's keys (torch's module,
        a leaf of the trace, keeps all of its buffers)."""
        if not isinstance(input, _Proxy):
            self._check_input_dim(input)
        elif self.num_batches_tracked is not None and not (self.training and self.track_running_stats):
            path = "" if input.tracer.root is self else input.tracer.path_of_module(self) + "."
            input.tracer.create_proxy("get_attr", path + "num_batches_tracked", (), {})

    @torch.jit.unused
    def _count_batch(self, input: Tensor) -> None:
        """``num_batches_tracked += 1``; recorded in the graph under ``torch.fx`` tracing."""
        if not isinstance(input, _Proxy):
            self.num_batches_tracked.add_(1)  # type: ignore[union-attr]
            return
        if self.momentum is None:
            raise RuntimeError("torch.fx cannot trace a training-mode batch norm with momentum=None "
                               "(its factor 1/num_batches_tracked is data); trace it in eval mode "
                               "or give a momentum")
        input.tracer.create_proxy("call_method", "add_", (self.num_batches_tracked, 1), {})

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

    @torch.jit.unused
    @torch._dynamo.disable  # type: ignore[untyped-decorator]
    def _outside_graph(self, input: Tensor) -> Tensor:
        """A training call with momentum=None under torch.compile, run eagerly between graphs,
        as torch's own module ends up run: its factor 1/num_batches_tracked is a Python number
        a graph would be specialized on, one recompilation per step until dynamo's limit."""
        return self(input)  # type: ignore[no-any-return]

    @torch.jit.unused
    def _shortcut(self, input: Tensor) -> Optional[Tensor]:
        """``forward`` for a plain eager call (CPU tensors of torch's own classes, no graph
        capture, transform, mode or forward AD) with the usual arguments: the
        kernels on cached NumPy views of the module's tensors. None where this does not
        apply (``forward`` then takes the general route). Reads the tensors from
        ``_buffers`` / ``_parameters`` directly (``Module.__getattr__`` costs about a
        microsecond per name); pruning and parametrizations move a tensor out of them (the
        attribute is then computed), and such a module takes the general route, which reads
        the attributes. Every test here is a few tens of nanoseconds; together they are most
        of a small call's cost, so they are spelled inline."""
        if not _plain_eager_input(input):
            if self.momentum is None and self.training and self.track_running_stats and _is_dynamo_compiling():
                return self._outside_graph(input)  # type: ignore[no-any-return]
            return None
        training = self.training
        buffers, params = self._buffers, self._parameters
        if not ("weight" in params and "bias" in params and "running_mean" in buffers and "running_var" in buffers):
            return None
        w, b = params["weight"], params["bias"]
        rm = rv = None
        if not training or self.track_running_stats:
            rm, rv = buffers.get("running_mean"), buffers.get("running_var")
            if rm is None or rv is None:
                return None  # eval without running statistics: batch statistics, general route
        counter = buffers.get("num_batches_tracked")
        views = self._views
        if (views is None or views.running_mean is not rm or views.running_var is not rv or views.weight is not w
                or views.bias is not b or views.counter is not counter or views.memory != _memory_of(rm, rv, w, b, counter)
                or views.eps != self.eps):
            views = self._views = _ModuleViews.make(input, rm, rv, w, b, counter, self.eps)
            if views is None:
                return None
        if views.inference_params and _grad_outside_inference_mode():
            return None
        # running statistics that require grad: torch's op, for its error (checked per call, as
        # requires_grad_ changes no memory the views' key sees)
        if _grad_enabled() and rm is not None and (rm.requires_grad or rv.requires_grad):  # type: ignore[union-attr]
            return None
        # a channel count other than the cached one: the general route, for torch's error; a
        # memory order other than contiguous or channels_last: there, for torch's output layout
        if (input.dtype is not views.dtype or input.dim() not in self._ranks or input.shape[1] != views.channels
                or not input.is_cpu or input.layout is not _STRIDED or input.numel() == 0
                or not (input.is_contiguous() or input.is_contiguous(memory_format=self._channels_last))):
            return None
        momentum = 0.0
        if training:
            # one value per channel, an inference tensor to update or to save for backward:
            # the general route, for torch's error before any state moves
            if input.numel() == views.channels or ((views.inference or input.is_inference()) and not _inference_mode()):
                return None
            if rm is not None:
                momentum = self.momentum  # type: ignore[assignment]
                if momentum is not None and not _momentum_applies(momentum):
                    return None
                if counter is not None:
                    count = views.count
                    if count is not None:
                        count[0] += 1
                    else:
                        counter.add_(1)
                    if momentum is None:  # cumulative average
                        momentum = 1.0 / float(counter if count is None else count[0])
                if momentum is None:
                    momentum = 0.0
        if views.half:  # model.bfloat16(): float32 copies, as torch computes (never cached: see _widened)
            return self._widened(input, w, b, views.arrays, training, momentum, views.eps)
        return self._run(input, w, b, views.arrays, training, momentum, views.eps)

    @torch.jit.unused
    def _run(self, input: Tensor, w: Optional[Tensor], b: Optional[Tensor], arrays: Tuple[Any, Any, Any, Any],
             training: bool, momentum: float, eps: float) -> Tensor:
        """The kernels on NumPy arrays of (weight, bias, running mean, running variance), with
        the cached views' ``eps`` (the number ``_kernels_apply`` accepted, equal to ``self.eps``)."""
        if _records_module_graph(input, w, b):
            return _eager_apply(input, w, b, arrays, training, momentum, eps)
        w_np, b_np, rm_np, rv_np = arrays
        if input.dtype is _BFLOAT16:
            x = ops.bfloat16_view(input)
            if not training:
                return _tensor(_core.forward_eval(x, rm_np, rv_np, w_np, b_np, eps, 1, None, None, False))
            return _tensor(_core.forward_train(x, w_np, b_np, rm_np, rv_np, momentum, eps, 1, None)[0])
        x = input.numpy(force=True)
        if not training:
            return _from_numpy(_core.forward_eval(x, rm_np, rv_np, w_np, b_np, eps, 1, None, None, False))
        return _from_numpy(_core.forward_train(x, w_np, b_np, rm_np, rv_np, momentum, eps, 1, None)[0])

    @torch.jit.unused
    def _widened(self, input: Tensor, w: Optional[Tensor], b: Optional[Tensor], halves: Tuple[Any, Any, Any, Any],
                 training: bool, momentum: float, eps: float) -> Tensor:
        """``_run`` with float32 copies of half-precision parameters and statistics, made per
        call: a cached copy would miss writes through ``.data`` and torch's own in-place
        updates, which bump no version counter. Parameter gradients come back in float32 and
        autograd rounds them to the parameters' dtype; running statistics are written back
        rounded to nearest even, as torch's CPU kernel stores them."""
        arrays: Tuple[Any, Any, Any, Any] = tuple(  # type: ignore[assignment]
            None if a is None else a.astype(np.float32) for a in halves)
        y = self._run(input, w, b, arrays, training, momentum, eps)
        if training and halves[2] is not None:
            halves[2][...] = arrays[2]
            halves[3][...] = arrays[3]
        return y


class BatchNorm1d(_DropIn, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` ((N, C) or (N, C, L) input) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm1d``. ``isinstance(m, torch.nn.BatchNorm1d)`` holds.
    """

    _ranks = (2, 3)


class BatchNorm2d(_DropIn, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` ((N, C, H, W) input, also channels_last) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm2d``. ``isinstance(m, torch.nn.BatchNorm2d)`` holds.
    """

    _ranks = (4,)
    _channels_last = torch.channels_last


class BatchNorm3d(_DropIn, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` ((N, C, D, H, W) input, also channels_last_3d) on batchnorm's kernels.

    Constructor, parameters, buffers, ``state_dict`` and ``repr`` are torch's; see
    ``torch.nn.BatchNorm3d``. ``isinstance(m, torch.nn.BatchNorm3d)`` holds.
    """

    _ranks = (5,)
    _channels_last = torch.channels_last_3d


# the other norms' drop-ins use the routing above (hence imported here, not at the top)
from ._torch_norms import (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d,  # noqa: E402
                           LayerNorm, RMSNorm, group_norm, instance_norm, layer_norm, rms_norm)
from ._torch_norms import REPLACEMENTS as _NORM_REPLACEMENTS  # noqa: E402

# Public under this module's name, as the batch norms: a pickle (torch.save of a whole model)
# names a class by its __module__, and unpickling imports that module first, which
# batchnorm._torch_norms cannot be (it imports from this module, and this module from it).
# The cost: inspect.getsource looks for these classes in this file and does not find them. Moving
# the helpers _torch_norms takes from here into a module of their own would end the cycle.
for _public in (GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm, group_norm,
                instance_norm, layer_norm, rms_norm):
    _public.__module__ = __name__

_REPLACEMENTS: Dict[type, Type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
    **dict(_NORM_REPLACEMENTS),
}
_ORIGINALS: Dict[type, Type[torch.nn.Module]] = {new: old for old, new in _REPLACEMENTS.items()}

def _on_torch_modules(fuser: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """torch's fuser ``fuser(is_qat, *modules)``, handed torch's own batch norms in place of the
    drop-ins (holding the same tensors): its QAT modules (``nni.ConvBn2d``, ``BNReLU2d``, ...)
    take exact torch types."""
    def fuse(is_qat: bool, *modules: torch.nn.Module) -> torch.nn.Module:
        return fuser(is_qat, *(revert(m) if type(m) in _ORIGINALS else m for m in modules))
    return fuse


# For torch.ao.quantization.fuse_modules / fuse_modules_qat, which look fusers up by exact type:
# fuse_modules(model, names, fuse_custom_config_dict={"additional_fuser_method_mapping":
# batchnorm.torch.FUSER_METHOD_MAPPING}). Every fusion of torch's default mapping that holds a
# batch norm (conv / transposed conv / linear + BN (+ ReLU), BN + ReLU), for the drop-ins.
FUSER_METHOD_MAPPING: Dict[Tuple[type, ...], Callable[..., torch.nn.Module]] = {
    tuple(_REPLACEMENTS.get(t, t) for t in types): _on_torch_modules(fuser)
    for types, fuser in getattr(fuser_methods, "_DEFAULT_OP_LIST_TO_FUSER_METHOD").items()
    if any(t in _REPLACEMENTS for t in types)
}

_OWN_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
# Never carried to a replacement: a drop-in's own caches, and ``Module.compile()``'s call,
# which is bound to the old module (the replacement would run it); compile after converting.
_CACHES = ("_views", "_peers_checked", "_compiled_call_impl")


def _replacement(module: torch.nn.Module, cls: Type[torch.nn.Module]) -> torch.nn.Module:
    """A ``cls`` with the state of ``module``: the same parameter and buffer tensors, flags,
    hooks and attributes. The parameter/buffer registries are new containers (registering
    a tensor on one module does not touch the other); hook dictionaries are shared, so the
    handles returned by ``register_*_hook`` before ``convert`` still remove their hooks."""
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for cache in _CACHES:
        state.pop(cache, None)
    for key in _OWN_CONTAINERS:
        if key in state:
            state[key] = state[key].copy()
    new.__dict__.update(state)
    return new


def _swap_tree(module: torch.nn.Module, replace: Callable[[torch.nn.Module], Optional[torch.nn.Module]],
               done: Optional[Dict[int, torch.nn.Module]] = None) -> torch.nn.Module:
    """``module`` with every submodule that ``replace`` gives a replacement for (None: keep it
    and look inside) replaced, recursively, in place; returns ``module`` or its replacement.
    Every registration counts, not only the first (``named_children`` skips repeats): a module
    registered twice in one parent or in two parents becomes one replacement, in each place."""
    done = {} if done is None else done
    if id(module) in done:
        return done[id(module)]
    new = replace(module)
    done[id(module)] = module if new is None else new
    if new is None:
        for name, child in list(module._modules.items()):
            if child is not None:
                new_child = _swap_tree(child, replace, done)
                if new_child is not child:
                    module.add_module(name, new_child)
        return module
    return new


def _swap(module: torch.nn.Module, classes: Dict[type, Type[torch.nn.Module]]) -> torch.nn.Module:
    """Replace every module whose exact type is a key of ``classes``, recursively, in place."""
    def replace(m: torch.nn.Module) -> Optional[torch.nn.Module]:
        cls = classes.get(type(m))
        return None if cls is None else _replacement(m, cls)
    return _swap_tree(module, replace)


# convert and revert return their argument itself, unless it is one of the modules they swap,
# when they return its replacement: for convert a subclass of the argument's class (a drop-in,
# or with ``sync`` a SyncBatchNorm for any batch norm), for revert the drop-in's torch class.
_M = TypeVar("_M", bound=torch.nn.Module)


@overload
def convert(module: _M, sync: Literal[False] = ...) -> _M: ...
@overload
def convert(module: _BatchNorm, sync: Literal[True]) -> SyncBatchNorm: ...
@overload
def convert(module: _BatchNorm, sync: Any) -> _BatchNorm: ...
@overload
def convert(module: _M, sync: Any) -> _M: ...
def convert(module: torch.nn.Module, sync: Any = False) -> torch.nn.Module:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
    and ``InstanceNorm1d/2d/3d`` in ``module`` for batchnorm's drop-in.

    ``sync``: True, or a torch.distributed ProcessGroup, makes every batch norm (also
    ``torch.nn.SyncBatchNorm``) a ``SyncBatchNorm`` over that group (True: the default
    group), as ``SyncBatchNorm.convert_sync_batchnorm(module, group)`` does; the other
    norms become their drop-ins all the same.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: recursive, in place (the
    children are replaced in their parents), returns ``module``; a batch norm passed at
    the top level returns its replacement. A replacement holds the same parameter and
    buffer tensors (an optimizer built before ``convert`` keeps training them), the
    training flag, hooks and attributes of the module it replaces. Only exact torch
    classes are swapped: subclasses (which may override ``forward``),
    ``SyncBatchNorm`` and uninitialized ``LazyBatchNorm*d`` are left alone.
    """
    if sync is False:
        return _swap(module, _REPLACEMENTS)
    if sync is not True:
        group_type = getattr(torch.distributed, "ProcessGroup", None)
        # new_group's stand-in on the ranks outside the group is taken, as torch's
        # convert_sync_batchnorm takes it; the module says so at its first exchange
        if (group_type is None or not isinstance(sync, group_type)) and not _is_torch_non_member(sync):
            raise TypeError(f"sync must be True, False or a torch.distributed ProcessGroup, got {type(sync).__name__}")
    return _swap(convert_sync(module, None if sync is True else sync), dict(_NORM_REPLACEMENTS))


@overload
def revert(module: BatchNorm1d) -> torch.nn.BatchNorm1d: ...
@overload
def revert(module: BatchNorm2d) -> torch.nn.BatchNorm2d: ...
@overload
def revert(module: BatchNorm3d) -> torch.nn.BatchNorm3d: ...
@overload
def revert(module: SyncBatchNorm) -> torch.nn.SyncBatchNorm: ...
@overload
def revert(module: LayerNorm) -> torch.nn.LayerNorm: ...
@overload
def revert(module: RMSNorm) -> torch.nn.RMSNorm: ...
@overload
def revert(module: GroupNorm) -> torch.nn.GroupNorm: ...
@overload
def revert(module: InstanceNorm1d) -> torch.nn.InstanceNorm1d: ...
@overload
def revert(module: InstanceNorm2d) -> torch.nn.InstanceNorm2d: ...
@overload
def revert(module: InstanceNorm3d) -> torch.nn.InstanceNorm3d: ...
@overload
def revert(module: _M) -> _M: ...
def revert(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of ``convert``: every drop-in becomes a plain torch module (``BatchNorm1d``,
    ``LayerNorm``, ``GroupNorm``, ...) again, in place, holding the same parameter and buffer tensors, flags and hooks.
    A ``SyncBatchNorm`` becomes a ``torch.nn.SyncBatchNorm`` over the same process group
    (``convert(model, sync=...)`` made every batch norm one; which were plain is not kept).

    For tools that match exact torch types (``torch.ao.quantization.fuse_modules``,
    ``torch.fx``'s conv-BN fusion, TorchScript export of a model for C++).
    """
    return _swap(module, _ORIGINALS)


_TRANSPOSED: Tuple[type, ...] = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_FOLDABLE: Tuple[type, ...] = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear) + _TRANSPOSED
# the batch norms default discovery folds: torch's and the drop-ins, exactly
_FOLDED_NORMS: Tuple[type, ...] = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                                   BatchNorm1d, BatchNorm2d, BatchNorm3d)


def _spatial_dims(module: torch.nn.Module) -> int:
    """1, 2 or 3 for a conv, transposed conv or batch norm of that many dimensions; a linear
    layer counts as 1 (it folds into a BatchNorm1d over its outputs, as torch's fusions pair
    them); 0 for anything else (a SyncBatchNorm or a lazy batch norm takes any)."""
    for dims, kinds in enumerate(((torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear, torch.nn.BatchNorm1d),
                                  (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.BatchNorm2d),
                                  (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.BatchNorm3d)), start=1):
        if isinstance(module, kinds):
            return dims
    return 0


def _outputs(layer: torch.nn.Module) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels  # type: ignore[return-value]


def _folds(layer: torch.nn.Module) -> bool:
    """Whether torch's fusion routines fold a batch norm into ``layer``: a conv, a linear, or a
    transposed conv of one group (``fuse_conv_bn_eval(transpose=True)`` scales the weight's
    axis 1, which holds one group's output channels only when there are several)."""
    return type(layer) in _FOLDABLE and not (isinstance(layer, _TRANSPOSED) and layer.groups != 1)


def _folds_into(layer: torch.nn.Module, bn: torch.nn.Module) -> bool:
    """Whether default discovery folds the batch norm ``bn`` into ``layer``, the child before
    it: exact classes only (a subclass may override ``forward``, an uninitialized lazy batch
    norm has no statistics yet), of the same dimensions (a linear layer before a BatchNorm2d
    acts on the last axis, not the channels), the layer's outputs the batch norm's features,
    running statistics, and no hook that would see the value between the two, which folding
    removes (the layer's forward hooks, the batch norm's forward pre-hooks)."""
    return (_folds(layer) and type(bn) in _FOLDED_NORMS and _spatial_dims(layer) == _spatial_dims(bn)
            and _outputs(layer) == bn.num_features and bn.running_mean is not None
            and bn.running_var is not None and not _hooks_between(layer, bn))


def _hooks_between(layer: torch.nn.Module, bn: torch.nn.Module) -> bool:
    return bool(layer._forward_hooks or bn._forward_pre_hooks)


def _foldable_pairs(model: torch.nn.Module) -> List[Tuple[str, str]]:
    """(layer, batch norm) names of consecutive children of plain ``nn.Sequential``
    containers, where the order of the children is the order of the computation (a subclass
    may override ``forward``). Each container once (``named_modules``: a block shared by two
    parents is folded once, for both), its children as listed, a module listed twice too."""
    pairs: List[Tuple[str, str]] = []
    for prefix, module in model.named_modules():
        if type(module) is not torch.nn.Sequential:
            continue
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if _folds_into(a, b):
                pairs.append((f"{prefix}.{name_a}" if prefix else name_a, f"{prefix}.{name_b}" if prefix else name_b))
    return pairs


def _folded_layer(layer: torch.nn.Module, bn: _BatchNorm) -> torch.nn.Module:
    """A copy of ``layer`` with ``bn`` folded in (torch's ``fuse_conv_bn_eval`` /
    ``fuse_linear_bn_eval``), which takes over the batch norm's forward hooks: it gives the
    output they saw, as torch's ``fuse_modules`` moves them."""
    folded: torch.nn.Module
    if isinstance(layer, torch.nn.Linear):
        # fuse_linear_bn_eval's own steps, with 1 and 0 for the parameters of a batch norm
        # without affine ones: it multiplies by None there
        folded = copy.deepcopy(layer)
        folded.weight, folded.bias = torch.nn.utils.fusion.fuse_linear_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps,  # type: ignore[arg-type]
            torch.ones_like(bn.running_mean) if bn.weight is None else bn.weight,
            torch.zeros_like(bn.running_mean) if bn.bias is None else bn.bias)
    else:
        folded = torch.nn.utils.fusion.fuse_conv_bn_eval(  # type: ignore[type-var]
            layer, bn, transpose=isinstance(layer, _TRANSPOSED))
    for key, hook in bn._forward_hooks.items():
        folded.register_forward_hook(hook, with_kwargs=key in bn._forward_hooks_with_kwargs,
                                     always_call=key in bn._forward_hooks_always_called)
    return folded


def fold_model(model: _M, pairs: Optional[List[Tuple[str, str]]] = None) -> _M:
    """Fold eval-mode batch norms into the convolutions / linear layers that feed them.

    ``pairs`` names (layer, batch norm) submodules as ``model.get_submodule`` does, as in
    ``torch.ao.quantization.fuse_modules``; by default every conv/linear (also a transposed
    conv of one group, as a decoder or GAN generator has) followed directly by
    a batch norm of its dimensions (a linear layer: a BatchNorm1d, as torch's fusions pair
    them) over its outputs (plain torch or converted, not a subclass) with running
    statistics inside a plain ``nn.Sequential``, unless a hook would see the value between
    them (the layer's forward hooks, the batch norm's forward pre-hooks). A linear layer
    before a BatchNorm1d is folded over its outputs, which is right for (N, C) input; on
    (N, C, L) input, where the linear layer acts on L, it is not (torch's fx fusion folds it
    alike): name the pairs for such a model. Every pair is checked and folded
    before any is put in: a bad one (not a conv/linear and a batch norm, one without running
    statistics, a layer of other dimensions than the batch norm's or whose output count is
    not its feature count, a place named in two pairs, such hooks) or a failed fold is an
    error that leaves ``model`` as it was. Each layer is replaced by a folded copy (``torch.nn.utils.fusion.fuse_conv_bn_eval``
    / ``fuse_linear_bn_eval``), which takes over the batch norm's forward hooks, and each
    batch norm by an eval-mode ``nn.Identity``, in place (at the names given: a module
    shared by other places stays there); returns ``model`` (unchanged when nothing folds).
    No fx: works on any model, traceable or not. A model in training mode is a ValueError
    (the batch statistics cannot be folded).
    """
    if model.training or any(m.training for m in model.modules()):
        raise ValueError("model: fold_model needs an eval-mode model (call model.eval() first)")
    checked: List[Tuple[str, str, torch.nn.Module, _BatchNorm]] = []
    places: Dict[Tuple[int, str], str] = {}  # (parent, child key) of every named module: each folds once
    for layer_name, bn_name in _foldable_pairs(model) if pairs is None else pairs:
        if not (isinstance(layer_name, str) and isinstance(bn_name, str)):
            raise TypeError(f"pairs: names are strings, as model.get_submodule takes them; got "
                            f"({layer_name!r}, {bn_name!r})")
        try:
            layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        except AttributeError as error:  # torch's words name the missing module, not the argument
            raise ValueError(f"pairs: ({layer_name!r}, {bn_name!r}) names no submodule of model: {error}") from None
        if type(layer) not in _FOLDABLE or not isinstance(bn, _BatchNorm):
            raise TypeError(f"pairs: ({layer_name!r}, {bn_name!r}) is not a conv/linear and a "
                            f"batch norm, got {type(layer).__name__} and {type(bn).__name__}")
        if not _folds(layer):
            raise ValueError(f"pairs: {layer_name!r} is a {type(layer).__name__} of {layer.groups} groups, "
                             "which torch's fuse_conv_bn_eval cannot fold a batch norm into")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"pairs: batch norm {bn_name!r} has no running statistics "
                             "(track_running_stats=False), so it cannot be folded")
        if _spatial_dims(bn) and _spatial_dims(layer) != _spatial_dims(bn):  # (SyncBatchNorm takes any)
            raise ValueError(f"pairs: {layer_name!r} is a {type(layer).__name__} and batch norm {bn_name!r} a "
                             f"{type(bn).__name__}: the layer's outputs are not the batch norm's channels")
        outputs = _outputs(layer)
        if outputs != bn.num_features:
            raise ValueError(f"pairs: {layer_name!r} has {outputs} outputs but batch norm {bn_name!r} "
                             f"normalizes {bn.num_features} features, so it cannot be folded into it")
        if _hooks_between(layer, bn):
            raise ValueError(f"pairs: ({layer_name!r}, {bn_name!r}) has hooks on the value between them "
                             "(forward hooks of the layer, forward pre-hooks of the batch norm), which "
                             "folding removes")
        # A place in two pairs would be folded from its unfolded module twice, the first fold lost.
        for name in (layer_name, bn_name):
            parent, _, leaf = name.rpartition(".")
            place = (id(model.get_submodule(parent)), leaf)
            if place in places:
                raise ValueError(f"pairs: {name!r} is named in more than one pair (each module folds once)"
                                 + (f", as {places[place]!r}" if places[place] != name else ""))
            places[place] = name
        checked.append((layer_name, bn_name, layer, bn))
    folded = [_folded_layer(layer, bn) for _, _, layer, bn in checked]  # all of them before any is put in
    for (layer_name, bn_name, _, bn), new in zip(checked, folded):
        _set_submodule(model, layer_name, new)
        _set_submodule(model, bn_name, torch.nn.Identity().train(bn.training))
    return model


def _set_submodule(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    model.get_submodule(parent).add_module(leaf, new)


from ._torch_sync import SyncBatchNorm, convert_sync  # noqa: E402  (it imports this module lazily)

_ORIGINALS[SyncBatchNorm] = torch.nn.SyncBatchNorm
