"""The normalization family: LayerNorm (with the fused residual add), RMSNorm, GroupNorm on
channels-last data and InstanceNorm with running statistics, checked against NumPy."""

import numpy as np

import batchnorm as bn

rng = np.random.default_rng(0)

# A transformer block's residual add and LayerNorm in one pass.
x = rng.standard_normal((4, 16, 64)).astype(np.float32)
residual = rng.standard_normal(x.shape).astype(np.float32)
ln = bn.LayerNorm(64)
total = np.empty_like(x)
y = bn.layer_norm(x, 64, ln.weight, ln.bias, residual=residual, sum_out=total)
s = x.astype(np.float64) + residual
expected = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
assert np.allclose(y, expected, atol=1e-5) and np.allclose(total, s, atol=1e-5)

# RMSNorm: x / rms(x), eps the machine epsilon of float32 by default.
rms = bn.RMSNorm(64)
y = rms(x)
assert np.allclose(y, x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True)), atol=1e-5)
rms.backward(np.ones_like(y))
print("RMSNorm weight_grad[:3]:", rms.weight_grad[:3])

# GroupNorm on channels-last images, with a fused ReLU.
img = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
gn = bn.GroupNorm(4, 32, axis=-1)
y = gn(img, activation="relu")
assert (y >= 0).all()

# InstanceNorm with running statistics: train, then evaluate with them.
inorm = bn.InstanceNorm2d(32, track_running_stats=True, axis=-1)
for _ in range(3):
    inorm(img)
inorm.eval()
y = inorm(img)
print("InstanceNorm2d running_mean[:3]:", inorm.running_mean[:3], "state:", list(inorm.state_dict()))
