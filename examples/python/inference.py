"""Inference: a fused ``relu(bn(x) + residual)`` in one pass, and folding a BN into a conv.

Run: ``python examples/python/inference.py``.
"""

import numpy as np

import batchnorm as bn

rng = np.random.default_rng(0)
x = rng.standard_normal((4, 8, 16, 16)).astype(np.float32)
residual = rng.standard_normal(x.shape).astype(np.float32)

m = bn.BatchNorm2d(8)
m.running_mean[:] = rng.normal(size=8)
m.running_var[:] = rng.uniform(0.5, 2.0, size=8)
m.weight[:] = rng.uniform(0.5, 1.5, size=8)
m.eval()

# One pass over x and residual instead of three (bn, add, relu); out= avoids an allocation.
out = np.empty_like(x)
m(x, out=out, residual=residual, activation="relu")
unfused = np.maximum(m(x) + residual, 0)
print(f"fused residual+relu: max |fused - unfused| = {np.abs(out - unfused).max():.1e}")

# Fold the eval-mode BN into the convolution that feeds it: conv'(x) == bn(conv(x)).
conv_weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # (C_out, C_in, kH, kW)
conv_bias = rng.standard_normal(8).astype(np.float32)
w, b = bn.fold(m, conv_weight, conv_bias)
patch = rng.standard_normal((1, 3, 3, 3)).astype(np.float32)  # a 3x3 image: the conv gives 1x1


def conv(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The convolution of ``patch``: an (N=1, C_out, 1, 1) feature map."""
    return (np.einsum("oikl,nikl->no", weight, patch) + bias)[:, :, None, None]


error = np.abs(conv(w, b) - m(conv(conv_weight, conv_bias))).max()
print(f"fold: max |conv'(x) - bn(conv(x))| = {error:.1e}")

# The same with a torch convolution, if torch is installed: fold returns tensors for tensors.
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    conv = torch.nn.Conv2d(3, 8, 3)
    w_t, b_t = bn.fold(m, conv.weight, conv.bias)
    folded = torch.nn.Conv2d(3, 8, 3)
    with torch.no_grad():
        folded.weight.copy_(w_t)
        folded.bias.copy_(b_t)
        image = torch.randn(2, 3, 10, 10)
        reference = torch.from_numpy(m(conv(image).numpy()))
        print(f"fold into torch.nn.Conv2d: max error {(folded(image) - reference).abs().max():.1e}")
