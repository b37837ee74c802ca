"""ONNX conformance: the BatchNormalization node test cases that ship with the ``onnx``
package (test_batchnorm_*, eval and training mode) pass through batchnorm's functional API.

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


def batchnorm_cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # other operators' generators warn about their own casts
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases("BatchNormalization") if c.name.startswith("test_batchnorm")]


CASES = batchnorm_cases()


def test_the_onnx_cases_are_there():
    names = {c.name for c in CASES}
    assert {"test_batchnorm_example", "test_batchnorm_epsilon", "test_batchnorm_example_training_mode",
            "test_batchnorm_epsilon_training_mode"} <= names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_onnx_node_case(case):
    (node,) = case.model.graph.node
    assert node.op_type == "BatchNormalization"
    for inputs, expected in case.data_sets:
        got = onnx_batch_normalization(node, inputs)
        assert len(got) == len(expected)
        for name, g, e in zip(node.output, got, expected):
            assert g.dtype == e.dtype, name
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"{case.name}: {name}")
