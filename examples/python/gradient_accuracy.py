"""How accurate batch norm's input gradient is at a large mean, and why (docs/numerics.md,
"Gradients").

backward takes the mean as the forward saved it, rounded to float32 (torch's save_mean is too).
x - mean stays exact, but the saved mean is off from the batch's by up to half a float32 ulp, so
the gradient is that of data centred a little off. The table compares batchnorm's grad_x (and
torch's, when it is installed) with the float64 gradient of the same float32 data, and with the
float64 formula evaluated at the float32-rounded mean: batchnorm meets the latter to float32
rounding at every mean, so the rounded mean is the whole of its error.

Run: python examples/python/gradient_accuracy.py
"""

import numpy as np

import batchnorm as bn

try:
    import torch
except ImportError:
    torch = None

AXES = (0, 2, 3)


def gradient(x, grad_y, mean):
    """Training batch norm's input gradient in float64 (weight 1), centred on ``mean``."""
    invstd = 1 / np.sqrt(x.var(AXES, keepdims=True) + 1e-5)
    x_hat = (x - mean) * invstd
    return invstd * (grad_y - grad_y.mean(AXES, keepdims=True) - x_hat * (grad_y * x_hat).mean(AXES, keepdims=True))


rng = np.random.default_rng(0)
print("| mean | max abs grad_x | batchnorm error | torch error | float64 at float32(mean) vs exact | batchnorm vs that |")
print("|---:|---:|---:|---:|---:|---:|")
for offset in (0.0, 1e2, 1e4, 1e6):
    x = (offset + rng.standard_normal((8, 4, 6, 6))).astype(np.float32)
    grad_y = rng.standard_normal(x.shape).astype(np.float32)
    module = bn.BatchNorm2d(4)
    module(x)
    got = module.backward(grad_y)
    x64, g64 = x.astype(np.float64), grad_y.astype(np.float64)
    exact_mean = x64.mean(AXES, keepdims=True)
    exact = gradient(x64, g64, exact_mean)
    at_rounded = gradient(x64, g64, exact_mean.astype(np.float32).astype(np.float64))
    torch_error = "n/a"
    if torch is not None:
        leaf = torch.from_numpy(x).requires_grad_()
        torch.nn.BatchNorm2d(4)(leaf).backward(torch.from_numpy(grad_y))
        torch_error = f"{np.abs(leaf.grad.numpy() - exact).max():.2e}"
    beside = np.abs(got - at_rounded).max()
    assert beside < 1e-6 * np.abs(exact).max(), beside  # float32 rounding: the mean is the rest
    print(f"| {offset:.0e} | {np.abs(exact).max():.2f} | {np.abs(got - exact).max():.2e} | {torch_error} | "
          f"{np.abs(at_rounded - exact).max():.2e} | {beside:.2e} |")
