"""batchnorm from NumPy: a layer, its gradient, eval mode, state, the functional API.

Run: ``python examples/python/quickstart.py``.
"""

import numpy as np

import batchnorm as bn

rng = np.random.default_rng(0)
x = rng.normal(5.0, 3.0, size=(16, 8, 12, 12)).astype(np.float32)  # (N, C, H, W)

# A layer with torch's semantics: batch statistics in training, running ones in eval.
m = bn.BatchNorm2d(8)
y = m(x)
print(m)
print(f"train: output mean {y.mean():+.2e}, std {y.std():.4f}; running_mean[0] {m.running_mean[0]:.3f}")

# Gradient of the last forward; weight_grad and bias_grad are set on the layer.
grad_y = rng.standard_normal(x.shape).astype(np.float32)
grad_x = m.backward(grad_y)
print(f"backward: grad_x {grad_x.shape}, weight_grad[:3] {m.weight_grad[:3]}")

# Parameters are the module's own arrays: writing them changes the next call.
m.weight[:] = 2.0
m.eval()
y_eval = m(x)
print(f"eval (running statistics, weight 2): output std {y_eval.std():.3f}")

# State in PyTorch's keys; load into a fresh layer.
restored = bn.BatchNorm2d(8)
restored.load_state_dict(m.state_dict())
assert np.array_equal(restored.eval()(x), y_eval)

# Channels-last data: name the channel axis.
nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
y_nhwc = bn.BatchNorm2d(8, axis=-1)(nhwc)
assert np.allclose(np.moveaxis(y_nhwc, -1, 1), y, atol=1e-5)

# The functional API is torch.nn.functional.batch_norm's, plus axis= and out=.
mean, var = bn.batch_norm_stats(x)
out = np.empty_like(x)
bn.batch_norm(x, mean, var, training=False, out=out)
print(f"functional eval into out=: max |out - y| = {np.abs(out - y).max():.1e}")
