"""One adapter per implementation under test.

An adapter turns (operation, case, shared arrays) into a zero-argument callable that runs
the operation once. All adapters read the SAME NumPy buffers (torch through zero-copy
`from_numpy` views, ONNX Runtime through io binding), so every implementation in a cell
touches identical memory. An optional dependency that is missing makes its adapter
unavailable with a reason; it never raises out of the suite.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from .cases import CHANNELS_LAST, EPS, MOMENTUM, Arrays, Case


class NotApplicable(Exception):
    """This implementation has no such operation or layout (reported as n/a, not an error)."""


@dataclasses.dataclass
class Prepared:
    run: Callable[[], Any]  # the timed call
    output: Callable[[Any], np.ndarray]  # run()'s result -> primary output, memory shape


def _returns_out(out: np.ndarray) -> Callable[[Any], np.ndarray]:
    return lambda _result: out


class Impl:
    name = ""
    unavailable: str | None = None  # why the whole column is skipped
    version = ""

    def set_threads(self, n: int) -> None:
        self.threads = n

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        raise NotImplementedError


class Batchnorm(Impl):
    """This project, through its public Python API (DESIGN.md, "Python API contract")."""

    name = "batchnorm"

    def __init__(self):
        try:
            import batchnorm as bn
        except Exception as error:  # not built yet, or a broken build: skip the column
            self.unavailable = f"import batchnorm failed: {error}"
            return
        self.bn = bn
        self.version = getattr(bn, "__version__", "?")

    def set_threads(self, n: int) -> None:
        self.bn.set_num_threads(n)

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        bn, axis = self.bn, case.axis
        stats = (a.x, a.running_mean, a.running_var, a.weight, a.bias)
        if op == "eval":
            run = lambda: bn.batch_norm(*stats, training=False, eps=EPS, axis=axis, out=a.out)
        elif op == "train":
            run = lambda: bn.batch_norm(
                *stats, training=True, momentum=MOMENTUM, eps=EPS, axis=axis, out=a.out
            )
        elif op == "fused":
            run = lambda: bn.batch_norm(
                *stats, training=False, eps=EPS, axis=axis, out=a.out,
                residual=a.residual, activation="relu",
            )
        elif op == "backward":
            run = lambda: bn.batch_norm_backward(
                a.grad_y, a.x, a.save_mean, a.save_invstd, a.weight, axis=axis
            )
            return Prepared(run, lambda result: np.asarray(result[0]))
        else:
            raise NotApplicable(op)
        return Prepared(run, _returns_out(a.out))


class Torch(Impl):
    """torch.nn.functional.batch_norm on zero-copy views; channels_last for NHWC cases."""

    name = "torch"

    def __init__(self):
        try:
            import torch
            import torch.nn.functional as F
        except Exception as error:
            self.unavailable = f"import torch failed: {error}"
            return
        self.torch, self.F = torch, F
        self.version = torch.__version__

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        F, view = self.F, case.to_torch
        x, gy, r = view(a.x), view(a.grad_y), view(a.residual)
        from_numpy = self.torch.from_numpy
        rm, rv, w, b = (from_numpy(v) for v in (a.running_mean, a.running_var, a.weight, a.bias))
        as_numpy = case.from_torch
        if op in ("eval", "train"):
            training = op == "train"
            run = lambda: F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
            return Prepared(run, as_numpy)
        if op == "fused":
            # PyTorch has no fused kernel: the composition a user writes, in place after BN.
            run = lambda: F.batch_norm(x, rm, rv, w, b, False, MOMENTUM, EPS).add_(r).relu_()
            return Prepared(run, as_numpy)
        if op == "backward":
            # The ATen kernel itself: no autograd graph, no forward recomputation.
            backward = self.torch.ops.aten.native_batch_norm_backward
            mean, invstd = from_numpy(a.save_mean), from_numpy(a.save_invstd)
            mask = [True, True, True]
            run = lambda: backward(gy, x, w, rm, rv, mean, invstd, True, EPS, mask)
            return Prepared(run, lambda result: as_numpy(result[0]))
        raise NotApplicable(op)


class OnnxRuntime(Impl):
    """A BatchNormalization node (plus Add and Relu for the fused op), run with io binding."""

    name = "onnxruntime"
    OPSET = 15

    def __init__(self):
        try:
            import onnx
            import onnxruntime
        except Exception as error:
            self.unavailable = f"import onnx/onnxruntime failed: {error}"
            return
        self.onnx, self.ort = onnx, onnxruntime
        self.version = onnxruntime.__version__
        self.threads = 1

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        if op not in ("eval", "fused"):
            raise NotApplicable("ONNX Runtime runs inference only")
        if case.layout == CHANNELS_LAST:
            raise NotApplicable("ONNX BatchNormalization is channels-first")
        session = self._session(self._model(op == "fused", case, a))
        binding = session.io_binding()
        binding.bind_cpu_input("x", a.x)
        if op == "fused":
            binding.bind_cpu_input("residual", a.residual)
        binding.bind_output("y", "cpu", 0, a.out.dtype, a.out.shape, a.out.ctypes.data)
        return Prepared(lambda: session.run_with_iobinding(binding), _returns_out(a.out))

    def _model(self, fused: bool, case: Case, a: Arrays):
        helper, numpy_helper = self.onnx.helper, self.onnx.numpy_helper
        element = helper.np_dtype_to_tensor_dtype(np.dtype(case.dtype))
        inputs = [helper.make_tensor_value_info("x", element, case.shape)]
        params = {"scale": a.weight, "bias": a.bias, "mean": a.running_mean, "var": a.running_var}
        initializers = [numpy_helper.from_array(value, name) for name, value in params.items()]
        bn_output = "bn" if fused else "y"
        nodes = [helper.make_node("BatchNormalization", ["x", *params], [bn_output], epsilon=EPS)]
        if fused:
            inputs.append(helper.make_tensor_value_info("residual", element, case.shape))
            nodes += [
                helper.make_node("Add", ["bn", "residual"], ["sum"]),
                helper.make_node("Relu", ["sum"], ["y"]),
            ]
        outputs = [helper.make_tensor_value_info("y", element, case.shape)]
        graph = helper.make_graph(nodes, "bench", inputs, outputs, initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.OPSET)])

    def _session(self, model):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive":
            # Wait like the OpenMP pools of torch and batchnorm: sleep, do not spin.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self.ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )


class NumPy(Impl):
    """The straightforward vectorized code a NumPy user writes; single-threaded."""

    name = "numpy"
    version = np.__version__

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        per_channel = lambda v: v.reshape(case.channel_view_shape)
        axes, y = case.reduce_axes, a.out
        n = case.numel // case.channels

        def normalize(mean, var):
            alpha = a.weight / np.sqrt(var + EPS)
            np.subtract(a.x, per_channel(mean), out=y)
            np.multiply(y, per_channel(alpha), out=y)
            np.add(y, per_channel(a.bias), out=y)
            return y

        def train():
            mean = a.x.mean(axis=axes)
            var = a.x.var(axis=axes)
            a.running_mean[...] = (1 - MOMENTUM) * a.running_mean + MOMENTUM * mean
            a.running_var[...] = (1 - MOMENTUM) * a.running_var + MOMENTUM * var * (n / (n - 1))
            return normalize(mean, var)

        def fused():
            normalize(a.running_mean, a.running_var)
            np.add(y, a.residual, out=y)
            return np.maximum(y, 0, out=y)

        def backward():
            mean, invstd = per_channel(a.save_mean), per_channel(a.save_invstd)
            x_mu = a.x - mean
            sum_dy = a.grad_y.sum(axis=axes, keepdims=True)
            sum_dy_xmu = (a.grad_y * x_mu).sum(axis=axes, keepdims=True)
            grad_x = a.grad_y - sum_dy / n
            grad_x -= x_mu * (invstd * invstd * sum_dy_xmu / n)
            grad_x *= per_channel(a.weight) * invstd
            return grad_x, (sum_dy_xmu * invstd).ravel(), sum_dy.ravel()

        if op == "backward":
            return Prepared(backward, lambda result: result[0])
        runs = {"eval": lambda: normalize(a.running_mean, a.running_var), "train": train, "fused": fused}
        if op not in runs:
            raise NotApplicable(op)
        return Prepared(runs[op], _returns_out(y))


IMPLEMENTATIONS = (Batchnorm, Torch, OnnxRuntime, NumPy)
NAMES = tuple(cls.name for cls in IMPLEMENTATIONS)


def load(names=NAMES) -> list[Impl]:
    """Instantiate the selected adapters in report order; unavailable ones say why."""
    return [cls() for cls in IMPLEMENTATIONS if cls.name in names]
