"""batchnorm.torch: run an existing PyTorch model's batch norms on batchnorm's kernels.

``convert`` swaps every torch.nn.BatchNorm1d/2d/3d in place, keeping parameters and
buffers (the very same tensors), so an optimizer made before still works. Training gives
torch's results (float32 rounding apart). Run: ``python examples/python/torch_dropin.py``.
"""

import torch

import batchnorm.torch as bnt


def make_model() -> torch.nn.Module:
    """A small CNN with two BatchNorm2d, the same weights on every call (seed 0)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )


def train(model: torch.nn.Module, steps: int = 5) -> list:
    """A few SGD steps on the same data each time; returns the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 3, 16, 16, generator=gen)
        target = x.mean((2, 3)).argmax(1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 5))
    return losses


plain = make_model()
converted = bnt.convert(make_model())
print(converted[1], type(converted[1]))
print("torch:    ", train(plain))
print("converted:", train(converted))

# The state_dict is torch's: load it into plain torch modules and back.
fresh = make_model()
fresh.load_state_dict(converted.state_dict())
assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), converted.state_dict().values()))

# New layers can be built directly, with torch's constructor.
layer = bnt.BatchNorm1d(8, momentum=None)
print(layer, layer(torch.randn(4, 8)).shape)
