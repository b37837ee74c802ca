"""torch tensors in, torch tensors out: DLPack without copies (no torch.nn module involved).

Every batchnorm function reads CPU tensors in place and returns tensors for tensors (NumPy
for NumPy), in the input's memory format. Run: ``python examples/python/torch_interop.py``.
"""

import torch

import batchnorm as bn

x = torch.randn(8, 16, 10, 10).to(memory_format=torch.channels_last)
running_mean, running_var = torch.zeros(16), torch.ones(16)

# Training mode: running statistics (torch tensors) are updated in their own memory.
y = bn.batch_norm(x, running_mean, running_var, training=True, momentum=0.1)
assert isinstance(y, torch.Tensor) and y.is_contiguous(memory_format=torch.channels_last)
expected = torch.nn.functional.batch_norm(x, torch.zeros(16), torch.ones(16), training=True)
print(f"same as torch: max |y - expected| = {(y - expected).abs().max():.1e}")
print(f"running_mean updated in place: {running_mean[:3]}")

# out= a tensor: written in place and returned as is (here: the input itself).
address = x.data_ptr()
same = bn.batch_norm(x, running_mean, running_var, out=x)
assert same is x and x.data_ptr() == address
print(f"in place on a channels_last tensor: data_ptr unchanged, mean {x.mean():+.3f}")

# Modules take tensors too; their own state stays NumPy.
m = bn.BatchNorm1d(4)
t = torch.randn(32, 4)
out = m(t)
grad = m.backward(torch.ones(32, 4))
print(f"module: output {type(out).__name__}, grad {type(grad).__name__}, "
      f"weight_grad {type(m.weight_grad).__name__}")

# Statistics in float64 as tensors
mean, var = bn.batch_norm_stats(torch.randn(64, 3, dtype=torch.float64) + 1e6)
print(f"stats at mean 1e6: mean {mean.tolist()}, var {var.tolist()}")
