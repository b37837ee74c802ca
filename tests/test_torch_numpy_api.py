"""batchnorm's NumPy API given torch tensors: tensors that require grad are refused (the API
would cut their autograd graph), and out= a tensor bumps its version counter as torch's
in-place ops do, so an earlier-recorded backward that saved it raises."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import batchnorm  # noqa: E402


@pytest.mark.parametrize("argument", ["input", "weight", "bias"])
def test_tensors_that_require_grad_are_refused(argument):
    args = {"input": torch.randn(4, 3), "weight": torch.ones(3), "bias": torch.zeros(3)}
    args[argument] = args[argument].requires_grad_(True)
    with pytest.raises(TypeError, match=rf"{argument}.*requires grad.*detach\(\).*batchnorm\.torch"):
        batchnorm.batch_norm(args["input"], None, None, args["weight"], args["bias"], training=True)


def test_module_refuses_input_that_requires_grad():
    m = batchnorm.BatchNorm1d(3)
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match="requires grad"):
        m(x)
    y = m(x.detach())  # detached: accepted, a plain tensor out
    assert isinstance(y, torch.Tensor) and not y.requires_grad


def test_out_tensor_that_requires_grad_is_refused_and_unchanged():
    out = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match="out.*requires grad"):
        batchnorm.batch_norm(torch.randn(4, 3), None, None, training=True, out=out)
    assert torch.equal(out, torch.zeros(4, 3))


def test_out_tensor_version_counter_is_bumped():
    x = torch.randn(4, 3)
    out = torch.empty(4, 3)
    w = torch.ones(4, 3, requires_grad=True)
    loss = (w * out).sum()  # saves `out` for backward
    version = out._version
    y = batchnorm.batch_norm(x, None, None, training=True, out=out)
    assert y is out and out._version > version
    np.testing.assert_allclose(out.numpy().mean(0), 0, atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # NumPy out: unchanged behaviour
    out_np = np.empty((4, 3), np.float32)
    assert batchnorm.batch_norm(x.numpy(), None, None, training=True, out=out_np) is out_np
