"""torch.onnx.export of a converted model: ONNX has no batchnorm:: ops, so while exporting the
drop-ins run torch's own functions, which the exporters translate into ONNX's normalization
operators. Both exporters (the default torch.export-based one, which needs onnxscript, and the
TorchScript one) must give a graph ONNX Runtime runs to the model's outputs; the float64 torch
model is the reference."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import batchnorm.torch as bnt  # noqa: E402


def model(rms=True):
    """Every norm; RMSNorm where the exporter has it (the TorchScript one has no aten::rms_norm,
    for torch's own module neither)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8),
        torch.nn.InstanceNorm2d(8, affine=True), torch.nn.LayerNorm([8, 6, 6]), torch.nn.Flatten(),
        torch.nn.Linear(288, 16), torch.nn.BatchNorm1d(16), torch.nn.RMSNorm(16) if rms else torch.nn.Identity())
    with torch.no_grad():  # statistics and parameters away from their initial values
        for mod in m.modules():
            for name in ("running_mean", "weight", "bias"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor) and mod.__class__.__name__ != "Linear":
                    t.uniform_(-0.5, 0.5).add_(1.0 if name == "weight" else 0.0)
            if getattr(mod, "running_var", None) is not None:
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export", "torchscript"])
def test_converted_model_exports_to_onnx(dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")  # what torch.onnx's default exporter translates with
    reference = model(rms=dynamo)
    converted = bnt.convert(model(rms=dynamo))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if dynamo:
        proto = torch.onnx.export(converted, (x,), dynamo=True, verbose=False).model_proto
    else:
        buffer = io.BytesIO()
        torch.onnx.export(converted, (x,), buffer, dynamo=False)
        proto = onnx.load_from_string(buffer.getvalue())
    assert all(n.domain in ("", "ai.onnx", "pkg.onnxscript.torch_lib.common") for n in proto.graph.node), \
        {n.domain for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = reference.double()(x.double()).numpy()
        ours = converted(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    assert converted[1].running_mean.equal(model()[1].running_mean)  # eval export changed no state
