"""ONNX conformance: the node test cases that ship with the ``onnx`` package for
BatchNormalization (eval and training mode), LayerNormalization, RMSNormalization,
GroupNormalization and InstanceNormalization pass through batchnorm's functional API.

LayerNormalization's ``axis`` is the first normalized dim: ``normalized_shape`` is
``X.shape[axis:]``; its Mean and InvStdDev outputs (shape ``X.shape[:axis]`` followed by
ones) come from ``_core.layer_norm``, the binding ``bn.layer_norm`` wraps, which returns
the statistics beside the output. RMSNormalization, GroupNormalization (opset 21: per-channel
scale and bias) and InstanceNormalization map one to one onto ``rms_norm``, ``group_norm``
and ``instance_norm``.

ONNX's conventions differ from PyTorch's (and batchnorm's) in two places, both mapped in
``onnx_batch_normalization`` below and documented in docs/inference.md:

- momentum: ONNX keeps ``momentum`` of the old running statistic (default 0.9); PyTorch
  moves ``momentum`` of the way to the batch's (default 0.1): ``momentum_torch = 1 - M``.
- running variance: ONNX blends in the *biased* batch variance, PyTorch the unbiased one
  (``var * n / (n - 1)``); the biased one is what ``bn.batch_norm_stats`` returns.

The test cases are collected from onnx's own generator (``collect_testcases``), which draws
fresh random inputs and computes the expected outputs with ONNX's reference formulas.
Tolerance: float32 element-wise rtol = atol = 1e-5, as everywhere in this suite.
"""

import warnings

import numpy as np
import pytest

import batchnorm as bn

onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402


def onnx_batch_normalization(node, inputs):
    """Evaluate one ONNX BatchNormalization node with batchnorm's functional API."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    eps = attributes.get("epsilon", 1e-5)
    onnx_momentum = attributes.get("momentum", 0.9)
    x, scale, bias, mean, var = inputs
    if not attributes.get("training_mode", 0):
        return [bn.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)]
    y = bn.batch_norm(x, None, None, scale, bias, training=True, eps=eps)
    batch_mean, batch_var = bn.batch_norm_stats(x)  # biased variance, as ONNX blends it
    keep = np.float32(onnx_momentum)
    return [y, mean * keep + batch_mean * (1 - keep), var * keep + batch_var * (1 - keep)]


def onnx_layer_normalization(node, inputs):
    """LayerNormalization: Y, and the Mean and InvStdDev outputs when the node has them."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    eps = attributes.get("epsilon", 1e-5)
    x, scale = inputs[:2]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attributes.get("axis", -1) % x.ndim
    y = bn.layer_norm(x, x.shape[axis:], scale, bias, eps)
    if len(node.output) == 1:
        return [y]
    _, mean, invstd = bn._core.layer_norm(x, x.ndim - axis, scale, bias, eps)
    stats_shape = x.shape[:axis] + (1,) * (x.ndim - axis)
    return [y, mean.reshape(stats_shape), invstd.reshape(stats_shape)][:len(node.output)]


def onnx_rms_normalization(node, inputs):
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, scale = inputs
    axis = attributes.get("axis", -1) % x.ndim
    return [bn.rms_norm(x, x.shape[axis:], scale, attributes.get("epsilon", 1e-5))]


def onnx_group_normalization(node, inputs):
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, scale, bias = inputs
    return [bn.group_norm(x, attributes["num_groups"], scale, bias, attributes.get("epsilon", 1e-5))]


def onnx_instance_normalization(node, inputs):
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, scale, bias = inputs
    return [bn.instance_norm(x, None, None, scale, bias, eps=attributes.get("epsilon", 1e-5))]


EVALUATORS = {
    "BatchNormalization": onnx_batch_normalization,
    "LayerNormalization": onnx_layer_normalization,
    "RMSNormalization": onnx_rms_normalization,
    "GroupNormalization": onnx_group_normalization,
    "InstanceNormalization": onnx_instance_normalization,
}


def node_cases():
    """The single-node cases of the operators above (their "_expanded" variants are graphs
    of other operators). Collected once: onnx's collector keeps state between calls."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # other operators' generators warn about their own casts
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    return [c for c in cases
            if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in EVALUATORS]


CASES = node_cases()


def test_the_onnx_cases_are_there():
    names = {c.name for c in CASES}
    assert {"test_batchnorm_example", "test_batchnorm_epsilon", "test_batchnorm_example_training_mode",
            "test_batchnorm_epsilon_training_mode"} <= names
    ops = {c.model.graph.node[0].op_type for c in CASES}
    assert ops == set(EVALUATORS), set(EVALUATORS) - ops


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnx_node_case(case):
    (node,) = case.model.graph.node
    for inputs, expected in case.data_sets:
        got = EVALUATORS[node.op_type](node, inputs)
        assert len(got) == len(expected)
        for name, g, e in zip(node.output, got, expected):
            assert g.dtype == e.dtype, name
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"{case.name}: {name}")
