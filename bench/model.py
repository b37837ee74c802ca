"""``python -m bench.model``: whole torch models with and without ``batchnorm.torch.convert``.

Two models, both defined here (no download):

- ``resnet18``: the ResNet-18 shape (torchvision's: 7x7/2 stem conv - BN - ReLU - max
  pool, BasicBlocks [2, 2, 2, 2] at 64/128/256/512 channels with 1x1 downsample - BN,
  average pool, linear head; 20 BatchNorm2d), on small images (default 8 x 3 x 64 x 64);
- ``bnstack``: a BN-heavy residual stack (pointwise conv - BN - ReLU - depthwise 3x3 conv
  - BN, + skip, ReLU), where batch norm is a large share of the time.

Modes: ``train`` = one step (``zero_grad``, forward, cross-entropy, backward,
``SGD.step``), ``infer`` = an eval-mode forward under ``torch.inference_mode()``. Each
runs eager and ``torch.compile``-d (inductor; the model is compiled, the optimizer step
stays eager), NCHW and channels_last, at 1 and 2 threads (``torch.set_num_threads`` and
``batchnorm.set_num_threads`` together). The two copies of a model (same seed) are timed
in the same run, interleaved round by round (``bench.timing.interleaved``); figures are
median ms per step over rounds, the speedup the median of per-round ratios torch /
converted (> 1: converted faster).

    python -m bench.model                          # every cell of both models (minutes)
    python -m bench.model --quick                  # fewer rounds, shorter samples
    python -m bench.model --models resnet18 --modes infer --backends eager
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from . import machine, timing
from .arguments import add_threads, positive_float, positive_int


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=["resnet18", "bnstack"], default=["resnet18", "bnstack"])
    p.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    p.add_argument("--backends", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--formats", nargs="+", choices=["NCHW", "channels_last"], default=["NCHW", "channels_last"])
    add_threads(p)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--size", type=positive_int, default=64, help="height and width of the input images")
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--sample-s", type=positive_float, default=0.25, help="seconds of steps per sample")
    p.add_argument("--quick", action="store_true", help="3 rounds of 0.1 s samples")
    return p.parse_args(argv)


def resnet18(torch, num_classes: int = 10, seed: int = 0):  # type: ignore[no-untyped-def]
    """ResNet-18 (torchvision's layout) with torch's own BatchNorm2d layers."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        """conv3x3 - BN - ReLU - conv3x3 - BN, + (downsampled) skip, ReLU."""

        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x):  # type: ignore[no-untyped-def]
            """The block on x."""
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    torch.manual_seed(seed)
    layers: List[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def bnstack(torch, channels: int = 64, blocks: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    """The BN-heavy residual stack (a 1x1 stem to ``channels``), torch's BatchNorm2d layers."""
    nn = torch.nn

    class Block(nn.Module):
        """pointwise conv - BN - ReLU - depthwise 3x3 conv - BN, + skip, ReLU."""

        def __init__(self) -> None:
            super().__init__()
            self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x):  # type: ignore[no-untyped-def]
            """The block on x."""
            y = torch.relu(self.bn1(self.pointwise(x)))
            return torch.relu(self.bn2(self.depthwise(y)) + x)

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, channels, 1), *[Block() for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))


MODELS = {"resnet18": resnet18, "bnstack": bnstack}


def make_step(torch, model, x, target) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    """A training step of ``model`` on (x, target) with its own SGD optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> object:
        """zero_grad, forward, loss, backward, SGD step; returns the loss."""
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def make_inference(torch, model, x) -> Callable[[], object]:  # type: ignore[no-untyped-def]
    """An eval-mode forward under inference_mode."""
    def infer() -> object:
        """model(x) without autograd."""
        with torch.inference_mode():
            return model(x)

    return infer


def pair(torch, bnt, args: argparse.Namespace, name: str, mode: str, fmt: str,  # type: ignore[no-untyped-def]
         compiled: bool) -> Dict[str, Callable[[], object]]:
    """{"torch": call, "converted": call} for one cell, after checking that both agree."""
    memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(memory_format=memory_format)
    target = torch.randint(0, 10, (args.batch,), generator=gen)
    models = {"torch": MODELS[name](torch).to(memory_format=memory_format),
              "converted": bnt.convert(MODELS[name](torch).to(memory_format=memory_format))}
    calls = {}
    if compiled:
        torch._dynamo.reset()  # each cell compiles afresh (no recompile limit across cells)
    for key, model in models.items():
        if mode == "infer":
            model.eval()
        run_model = torch.compile(model) if compiled else model
        calls[key] = (make_step(torch, run_model, x, target) if mode == "train"
                      else make_inference(torch, run_model, x))
    first = {key: call() for key, call in calls.items()}  # compiles, when compiled
    a, b = first["torch"], first["converted"]
    if not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4):
        sys.exit(f"WRONG: {name} {mode} {fmt} {'compiled' if compiled else 'eager'}: "
                 "the converted model's first result differs from torch's")
    return calls


def main(argv: Sequence[str] | None = None) -> None:
    """Every requested cell, both models interleaved; print one table."""
    args = _parse(argv)
    if args.quick:
        args.rounds, args.sample_s = 3, 0.1
    before = machine.conditions()  # before this process starts any thread pool
    try:
        import torch
    except ImportError:
        sys.exit("bench.model needs torch: pip install torch==2.13.0")
    import batchnorm
    import batchnorm.torch as bnt

    print(f"input ({args.batch}, 3, {args.size}, {args.size}) float32; SGD(momentum=0.9); "
          f"torch {torch.__version__}, batchnorm {batchnorm.__version__} ({batchnorm.isa()}), "
          f"CPU: {machine.cpu_name()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load before: {before['load_1min']}, CPUs busy before: {before['cpu_busy']}")
    print(f"median ms per call over {args.rounds} interleaved rounds (IQR in brackets); "
          "speedup = torch / converted, median of per-round ratios")
    print()
    print("| model | mode | backend | format | threads | torch | converted | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    rows: List[Tuple[str, float]] = []
    for name in args.models:
        for mode in args.modes:
            for backend in args.backends:
                for fmt in args.formats:
                    calls = pair(torch, bnt, args, name, mode, fmt, backend == "compiled")
                    for n in args.threads:
                        torch.set_num_threads(n)
                        batchnorm.set_num_threads(n)
                        samples = timing.interleaved(calls, rounds=args.rounds, target_s=args.sample_s,
                                                     settle_s=0.005)
                        a, b = timing.Spread.of(samples["torch"]), timing.Spread.of(samples["converted"])
                        speedup = timing.paired_ratio(samples["torch"], samples["converted"]).median
                        rows.append((f"{name} {mode} {backend} {fmt} {n}", speedup))
                        print(f"| {name} | {mode} | {backend} | {fmt} | {n} | {a.median * 1e3:.2f} "
                              f"({a.iqr * 1e3:.2f}) | {b.median * 1e3:.2f} ({b.iqr * 1e3:.2f}) | "
                              f"{speedup:.2f}x |", flush=True)
    after = machine.conditions()
    print()
    print(f"geometric mean speedup over {len(rows)} cells: "
          f"{float(np.exp(np.mean(np.log([r[1] for r in rows])))):.2f}x; slowest: "
          f"{min(rows, key=lambda r: r[1])[0]} at {min(r[1] for r in rows):.2f}x")
    print(f"load after: {after['load_1min']}, CPUs busy after: {after['cpu_busy']}"
          + ("  (DISTURBED: other processes were busy, rerun on a quiet machine)"
             if machine.disturbed(before) or machine.disturbed(after) else ""))


if __name__ == "__main__":
    main()
