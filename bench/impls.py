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
import warnings
from typing import Any, Callable

import numpy as np

from .cases import (CHANNELS_LAST, EPS, HALF_DTYPES, MOMENTUM, Arrays, Case, NormArrays, NormCase, torch_to_numpy,
                    torch_view)


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

    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        raise NotApplicable(f"{self.name} has no {case.layout}")

    def prepare_case(self, op: str, case: Case | NormCase, a: Arrays | NormArrays) -> Prepared:
        """``prepare`` for batch norm's cases, ``prepare_norm`` for the other norms'."""
        if isinstance(case, NormCase):
            return self.prepare_norm(op, case, a)  # type: ignore[arg-type]
        return self.prepare(op, case, a)  # type: ignore[arg-type]


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
                a.grad_y, a.x, a.save_mean, a.save_invstd, a.weight, axis=axis, out=a.out
            )
            return Prepared(run, lambda result: np.asarray(result[0]))
        else:
            raise NotApplicable(op)
        return Prepared(run, _returns_out(a.out))

    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        bn, x, w, b, out = self.bn, a.x, a.weight, a.bias, a.out
        d, stats_shape = (case.shape[-1],), case.shape[:-1]
        if op == "norm_forward":
            run = {
                "layer": lambda: bn.layer_norm(x, d, w, b, EPS, out=out),
                "rms": lambda: bn.rms_norm(x, d, w, EPS, out=out),
                "group": lambda: bn.group_norm(x, case.groups, w, b, EPS, out=out),
                "instance": lambda: bn.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS, out=out),
            }[case.norm]
            return Prepared(run, _returns_out(out))
        if op != "norm_backward":
            raise NotApplicable(op)
        gy, n = a.grad_y, case.shape[0]
        mean, invstd = a.save_mean, a.save_invstd
        run = {
            "layer": lambda: bn.layer_norm_backward(gy, x, d, mean.reshape(stats_shape),
                                                    invstd.reshape(stats_shape), w, out=out),
            "rms": lambda: bn.rms_norm_backward(gy, x, d, invstd.reshape(stats_shape), w, out=out),
            "group": lambda: bn.group_norm_backward(gy, x, case.groups, mean.reshape(n, -1),
                                                    invstd.reshape(n, -1), w, out=out),
            "instance": lambda: bn.instance_norm_backward(gy, x, mean.reshape(n, -1),
                                                          invstd.reshape(n, -1), w, out=out),
        }[case.norm]
        return Prepared(run, lambda result: np.asarray(result[0]))


class BatchnormFloat32(Batchnorm):
    """batchnorm on float32 copies of a half-precision case's arrays: the float32 call on the
    same shape, which a half call's time is compared with (issue 13's goal: 0.6 or less)."""

    name = "batchnorm f32"

    def prepare(self, op: str, case: Case, a: Arrays) -> Prepared:
        if case.dtype not in HALF_DTYPES:
            raise NotApplicable("the float32 twin of a half-precision case")
        single = {name: getattr(a, name).astype(np.float32) for name in ("x", "grad_y", "residual", "out")}
        return super().prepare(op, case, dataclasses.replace(a, **single))

    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        if case.dtype not in HALF_DTYPES:
            raise NotApplicable("the float32 twin of a half-precision case")
        single = {name: getattr(a, name).astype(np.float32) for name in ("x", "grad_y", "out")}
        return super().prepare_norm(op, case, dataclasses.replace(a, **single))


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
        # half data with a float32 weight: F.rms_norm takes its composite (unfused) path and
        # warns so; that path is what the bench measures (bench/README.md)
        warnings.filterwarnings("ignore", "Mismatch dtype between input and weight", UserWarning)

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

    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        F, torch = self.F, self.torch
        x, gy, w, b = (torch_view(v) for v in (a.x, a.grad_y, a.weight, a.bias))
        d, n, c = [case.shape[-1]], case.shape[0], case.shape[1]
        if op == "norm_forward":
            run = {
                "layer": lambda: F.layer_norm(x, d, w, b, EPS),
                "rms": lambda: F.rms_norm(x, d, w, EPS),
                "group": lambda: F.group_norm(x, case.groups, w, b, EPS),
                "instance": lambda: F.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS),
            }[case.norm]
            return Prepared(run, torch_to_numpy)
        if op != "norm_backward":
            raise NotApplicable(op)
        # ATen's backward kernels themselves (RMSNorm: its autograd graph): no forward recomputation
        aten = torch.ops.aten
        mean, invstd = torch.from_numpy(a.save_mean), torch.from_numpy(a.save_invstd)
        stats = (*case.shape[:-1], 1)
        spatial = case.numel // (n * c)
        if case.norm == "rms":
            return Prepared(self._rms_backward(x, gy, w, d), lambda result: torch_to_numpy(result[0]))
        run = {
            "layer": lambda: aten.native_layer_norm_backward(
                gy, x, d, mean.view(stats), invstd.view(stats), w, b, [True, True, True]),
            "group": lambda: aten.native_group_norm_backward(
                gy, x, mean.view(n, -1), invstd.view(n, -1), w, n, c, spatial, case.groups, [True, True, True]),
            "instance": lambda: aten.native_group_norm_backward(
                gy, x, mean.view(n, -1), invstd.view(n, -1), w, n, c, spatial, c, [True, True, True]),
        }[case.norm]
        return Prepared(run, lambda result: torch_to_numpy(result[0]))

    def _rms_backward(self, x, gy, w, d):
        """torch has no CPU backward kernel for RMSNorm: its autograd graph (recorded once,
        replayed by each call; the forward is not recomputed)."""
        torch = self.torch
        x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = self.F.rms_norm(x, d, w, EPS)
        return lambda: torch.autograd.grad(y, (x, w), gy, retain_graph=True)


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
        if case.dtype in HALF_DTYPES:
            raise NotApplicable("half precision is measured for batchnorm and torch")
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

    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        if op != "norm_forward":
            raise NotApplicable("ONNX Runtime runs inference only")
        if case.dtype == "bfloat16":
            raise NotApplicable("ONNX Runtime's CPU provider has no bfloat16 normalization kernels")
        helper, numpy_helper = self.onnx.helper, self.onnx.numpy_helper
        element = helper.np_dtype_to_tensor_dtype(np.dtype(case.dtype))
        # ONNX types scale and B as x (no float32 parameters for float16 data): float16 copies
        weight, bias = a.weight.astype(a.x.dtype), a.bias.astype(a.x.dtype)
        # node, opset (domain "" unless com.microsoft), attributes, and whether it takes a bias
        node, opset, attributes, with_bias = {
            "layer": ("LayerNormalization", 17, {"axis": -1}, True),
            "rms": ("RMSNormalization", 23, {"axis": -1}, False),
            "group": ("GroupNormalization", 21, {"num_groups": case.groups}, True),
            "instance": ("InstanceNormalization", 17, {}, True),
        }[case.norm]
        params = {"scale": weight, "B": bias} if with_bias else {"scale": weight}
        initializers = [numpy_helper.from_array(value, name) for name, value in params.items()]
        nodes = [helper.make_node(node, ["x", *params], ["y"], epsilon=EPS, **attributes)]
        graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", element, case.shape)],
                                  [helper.make_tensor_value_info("y", element, case.shape)], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        session = self._session(model)
        binding = session.io_binding()
        binding.bind_cpu_input("x", a.x)
        binding.bind_output("y", "cpu", 0, a.out.dtype, a.out.shape, a.out.ctypes.data)
        return Prepared(lambda: session.run_with_iobinding(binding), _returns_out(a.out))

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
        if case.dtype in HALF_DTYPES:
            raise NotApplicable("half precision is measured for batchnorm and torch")
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


    def prepare_norm(self, op: str, case: NormCase, a: NormArrays) -> Prepared:
        w, b = a.weight.reshape(case.param_shape), a.bias.reshape(case.param_shape)
        rms = case.norm == "rms"
        # half data: float32 math on float32 copies of x and grad_y, the result rounded back
        # into the half output (NumPy's half arithmetic would round after every operation)
        half = case.dtype in HALF_DTYPES
        x_rows = a.x.reshape(case.rows, -1)

        def store(y):
            if not half:
                return y
            a.out[...] = y
            return a.out

        def forward():
            rows = x_rows.astype(np.float32) if half else x_rows
            centred = rows if rms else rows - rows.mean(axis=1, keepdims=True)
            second = (centred * centred).mean(axis=1, keepdims=True)
            y = (centred / np.sqrt(second + EPS)).reshape(case.shape) * w
            return store(y if rms else np.add(y, b, out=y))

        def backward():
            rows = x_rows.astype(np.float32) if half else x_rows
            gy = a.grad_y.astype(np.float32) if half else a.grad_y
            invstd = a.save_invstd[:, None]
            xhat = (rows if rms else rows - a.save_mean[:, None]) * invstd
            g = (gy * w).reshape(case.rows, -1)
            centred = g if rms else g - g.mean(axis=1, keepdims=True)
            grad_x = invstd * (centred - xhat * (g * xhat).mean(axis=1, keepdims=True))
            gy_xhat = gy * xhat.reshape(case.shape)
            axes = tuple(range(len(case.shape) - 1)) if case.norm in ("layer", "rms") else \
                (0, *range(2, len(case.shape)))
            return store(grad_x.reshape(case.shape)), gy_xhat.sum(axis=axes), gy.sum(axis=axes)

        runs = {"norm_forward": forward, "norm_backward": backward}
        if op not in runs:
            raise NotApplicable(op)
        if op == "norm_backward":
            return Prepared(backward, lambda result: result[0])
        return Prepared(forward, lambda y: y)


IMPLEMENTATIONS = (Batchnorm, BatchnormFloat32, Torch, OnnxRuntime, NumPy)
NAMES = tuple(cls.name for cls in IMPLEMENTATIONS)


def load(names=NAMES) -> list[Impl]:
    """Instantiate the selected adapters in report order; unavailable ones say why."""
    return [cls() for cls in IMPLEMENTATIONS if cls.name in names]
