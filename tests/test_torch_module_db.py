"""PyTorch's own BatchNorm test cases (torch/testing/_internal/common_modules.py:
module_inputs_torch_nn_BatchNorm1d/2d/3d and module_error_inputs_torch_nn_BatchNorm1d_2d_3d,
torch 2.13), run on batchnorm.torch against torch's modules: constructor arguments and
input shapes as there; forward, input/parameter gradients, running statistics over two
training steps and an eval step, in float32 and float64. (The module database itself
cannot be imported without torch's test-only dependencies, so its table is copied here.)
"""

import pytest

torch = pytest.importorskip("torch")

import batchnorm.torch as bnt  # noqa: E402

# (dim, constructor args, constructor kwargs, input shape, desc)
CASES = [
    (1, (10,), {}, (4, 10), "affine"),
    (1, (5,), {}, (4, 5, 3), "3d_input"),
    (1, (10, 1e-3, None), {}, (4, 10), "affine_simple_average"),
    (1, (10, 1e-3, 0.3, False), {}, (4, 10), "not_affine"),
    (1, (10, 1e-3, 0.3, True, False), {}, (4, 10), "not_tracking_stats"),
    (1, (5, 1e-3, 0.3, False), {}, (4, 5, 3), "3d_input_not_affine"),
    (1, (5, 1e-3, 0.3, False), {}, (0, 5, 9), "zero_batch"),
    (1, (10,), {"bias": False}, (4, 10), "affine_not_bias"),
    (2, (3,), {}, (2, 3, 6, 6), "default"),
    (2, (3, 1e-3, None), {}, (2, 3, 6, 6), "2d_simple_average"),
    (2, (3, 1e-3, 0.8), {}, (2, 3, 6, 6), "momentum"),
    (2, (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6), "not_affine"),
    (2, (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6), "not_tracking_stats"),
    (2, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2), "zero_batch"),
    (2, (3,), {"bias": False}, (2, 3, 6, 6), "affine_not_bias"),
    (3, (3,), {}, (2, 3, 4, 4, 4), "default"),
    (3, (3, 1e-3, None), {}, (2, 3, 4, 4, 4), "3d_simple_average"),
    (3, (3, 1e-3, 0.7), {}, (2, 3, 4, 4, 4), "momentum"),
    (3, (3, 1e-3, 0.7, False), {}, (2, 3, 4, 4, 4), "not_affine"),
    (3, (3, 1e-3, 0.7, True, False), {}, (2, 3, 4, 4, 4), "not_tracking_stats"),
    (3, (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2, 2), "zero_batch"),
    (3, (3,), {"bias": False}, (2, 3, 4, 4, 4), "affine_not_bias"),
]
CLASSES = {1: (bnt.BatchNorm1d, torch.nn.BatchNorm1d), 2: (bnt.BatchNorm2d, torch.nn.BatchNorm2d),
           3: (bnt.BatchNorm3d, torch.nn.BatchNorm3d)}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{c[4]}" for c in CASES])
def test_torch_module_db_case(case, dtype):
    dim, args, kwargs, shape, _ = case
    ours_cls, torch_cls = CLASSES[dim]
    ref = torch_cls(*args, dtype=dtype, **kwargs)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    for training in (True, True, False):
        ref.train(training)
        ours.train(training)
        x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1  # torch's make_tensor: [-9, 9]
        gy = torch.randn(shape, generator=gen, dtype=dtype)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, **TOL[dtype])
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])
        for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, **TOL[dtype], msg=name)
            a.grad = b.grad = None
        for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=name)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("eps", [-1.0, 0.0])
def test_torch_module_db_error_case(dim, eps):
    """Training with eps <= 0 is torch's ValueError; eval mode does what torch does (eps < 0:
    its ValueError; eps = 0: a result)."""
    shape = {1: (2, 10), 2: (2, 10, 5, 5), 3: (2, 10, 4, 4, 4)}[dim]
    ours_cls, torch_cls = CLASSES[dim]
    x = torch.rand(shape) + 1
    with pytest.raises(ValueError, match="eps must be positive"):
        ours_cls(10, eps=eps)(x)
    ref, ours = torch_cls(10, eps=eps).eval(), ours_cls(10, eps=eps).eval()
    try:
        expected = ref(x)
    except ValueError as e:
        with pytest.raises(ValueError, match=str(e)):
            ours(x)
        return
    torch.testing.assert_close(ours(x), expected)
