"""batchnorm's NumPy API given torch tensors: tensors that require grad are refused (the API
would cut their autograd graph), and out= a tensor bumps its version counter as torch's
in-place ops do, so an earlier-recorded backward that saved it raises."""

import sys

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


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=["None", "str", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_numpy_modules_take_torch_device_and_dtype(device, dtype):
    m = batchnorm.BatchNorm2d(3, device=device, dtype=dtype)
    expected = np.float32 if dtype == torch.float32 else np.float64
    assert m.dtype == expected and m.weight.dtype == expected
    y = m(np.ones((2, 3, 2, 2), expected))
    assert y.dtype == expected


@pytest.mark.parametrize("device", ["cuda", "meta", torch.device("meta"), "cpu:1"])
def test_numpy_modules_name_other_devices(device):
    with pytest.raises(ValueError, match=f"device.*{device}"):
        batchnorm.BatchNorm1d(3, device=device)


def test_numpy_modules_refuse_other_torch_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        batchnorm.BatchNorm1d(3, dtype=torch.float16)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_drop_ins_take_cpu_device_and_torch_dtype(device):
    import batchnorm.torch as bnt
    for dtype in (torch.float32, torch.float64):
        m = bnt.BatchNorm2d(3, device=device, dtype=dtype)
        assert m.weight.dtype == dtype and m.weight.device.type == "cpu"
        x = torch.randn(2, 3, 4, 4, dtype=dtype)
        torch.testing.assert_close(m(x), torch.nn.functional.batch_norm(x, None, None, training=True))


NUMPY_MODULES = [("BatchNorm2d", (3,), {}), ("LayerNorm", (5,), {}), ("RMSNorm", (5,), {}), ("GroupNorm", (1, 3), {}),
                 ("InstanceNorm2d", (3,), {"affine": True})]


@pytest.mark.parametrize("name,args,kwargs", NUMPY_MODULES, ids=[m[0] for m in NUMPY_MODULES])
def test_every_numpy_module_takes_torchs_device_and_dtype_none(name, args, kwargs):
    """device= (the CPU as torch names it) and dtype=None (torch's default, float32) on every
    module class, as torch's constructors take them; the module then computes what torch's does."""
    x = torch.randn(2, 3, 4, 5)
    for device in (None, "cpu", torch.device("cpu")):
        ours = getattr(batchnorm, name)(*args, **kwargs, device=device, dtype=None)
        ref = getattr(torch.nn, name)(*args, **kwargs, device=device, dtype=None)
        assert ours.dtype == np.float32 and ours.weight.dtype == np.float32 and ref.weight.dtype == torch.float32
        y = ours(x.numpy())
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), ref(x), rtol=1e-5, atol=1e-5)
            y64 = ref.double()(x.double())  # the same module in float64
        np.testing.assert_allclose(y, y64.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="device.*meta"):
        getattr(batchnorm, name)(*args, **kwargs, device="meta")


def test_sync_batch_norm_takes_torchs_device_and_dtype_none():
    """SyncBatchNorm's constructor takes device= and dtype=None as the other modules (and
    torch's SyncBatchNorm) do; in eval it is batch norm."""
    x = torch.randn(2, 3, 4, 5)
    ref = torch.nn.BatchNorm2d(3).eval()
    for device in (None, "cpu", torch.device("cpu")):
        ours = batchnorm.SyncBatchNorm(3, device=device, dtype=None).eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(ours(x.numpy())), ref(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="device.*meta"):
        batchnorm.SyncBatchNorm(3, device="meta")


def test_a_subclass_of_tensor_gets_a_tensor_back():
    """The result of a torch tensor's subclass (a user's own, or Parameter) is a torch tensor,
    as for torch.Tensor itself, not a NumPy array."""
    class Tagged(torch.Tensor):
        pass

    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    for given in (x.as_subclass(Tagged), torch.nn.Parameter(x, requires_grad=False)):
        y = batchnorm.batch_norm(given, None, None, training=True)
        assert type(y) is torch.Tensor
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_without_ml_dtypes_a_bfloat16_tensor_gets_the_real_error(monkeypatch):
    """Without ml_dtypes a torch bfloat16 tensor cannot become a NumPy array; the errors that
    look at its dtype (a module of another dtype, a checkpoint's entry) still say what is wrong
    and name the argument or key."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    x = torch.randn(4, 3, 5, 5).bfloat16()
    for module, words in ((batchnorm.BatchNorm2d(3, dtype=np.float64), "BatchNorm2d is float64"),
                          (batchnorm.GroupNorm(1, 3, dtype=np.float64), "GroupNorm is float64")):
        with pytest.raises(TypeError, match=f"^x has dtype bfloat16 but this {words}"):
            module(x)
    state = torch.nn.BatchNorm2d(3).state_dict()
    state["weight"] = torch.ones(3).bfloat16()
    m = batchnorm.BatchNorm2d(3)
    before = m.weight.copy()
    with pytest.raises(TypeError, match="^weight: a torch bfloat16 tensor"):
        m.load_state_dict(state)
    np.testing.assert_array_equal(m.weight, before)


def test_batchnorm_torch_without_torch_says_what_it_needs():
    import subprocess

    code = "import sys; sys.modules['torch'] = None; import batchnorm; import batchnorm.torch"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "ImportError: batchnorm.torch (the drop-ins for torch models) needs PyTorch" in done.stderr, done.stderr
