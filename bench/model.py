"""``python -m bench.model``: a torch training step with and without ``batchnorm.torch.convert``.

One step = ``zero_grad``, forward, cross-entropy loss, backward, ``SGD.step``. The model
is BN-heavy on purpose: residual blocks of pointwise conv - BN - ReLU - depthwise 3x3
conv - BN (+ skip) - ReLU, so batch norm is a large share of the step (ResNets with dense
3x3 convolutions spend most of their time in the convolutions). Two copies of the same
model (same seed) are timed in the same run, interleaved round by round
(``bench.timing.interleaved``); the figure is the median per-step time over rounds, at
1 and 2 threads (``torch.set_num_threads`` and ``batchnorm.set_num_threads`` together).

    python -m bench.model                       # (16, 64, 32, 32), 4 blocks, 1 and 2 threads
    python -m bench.model --channels-last --rounds 11
    OMP_WAIT_POLICY=passive python -m bench.model
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Sequence, Tuple

import numpy as np

from . import machine, timing


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="height and width of the input")
    p.add_argument("--blocks", type=int, default=4, help="residual blocks (2 BatchNorm2d each)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--sample-s", type=float, default=0.25, help="seconds of steps per sample")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    return p.parse_args(argv)


def build(torch, channels: int, blocks: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """The BN-heavy residual stack, with torch's own BatchNorm2d layers."""
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
    return nn.Sequential(*[Block() for _ in range(blocks)], nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(channels, 10))


def make_step(torch, model, x, target) -> Tuple[Callable[[], object], object]:  # type: ignore[no-untyped-def]
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

    return step, opt


def main(argv: Sequence[str] | None = None) -> None:
    """Check that both models agree, then time them at each thread count; print a table."""
    args = _parse(argv)
    before = machine.conditions()  # before this process starts any thread pool
    try:
        import torch
    except ImportError:
        sys.exit("bench.model needs torch: pip install torch==2.13.0")
    import batchnorm
    import batchnorm.torch as bnt

    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    shape = (args.batch, args.channels, args.size, args.size)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(memory_format=memory_format)
    target = torch.randint(0, 10, (args.batch,), generator=gen)
    plain = build(torch, args.channels, args.blocks).to(memory_format=memory_format)
    converted = bnt.convert(build(torch, args.channels, args.blocks).to(memory_format=memory_format))
    swapped = sum(type(m) is bnt.BatchNorm2d for m in converted.modules())

    # Same model, same data: the first losses must agree (float32 rounding apart).
    step_plain, _ = make_step(torch, plain, x, target)
    step_converted, _ = make_step(torch, converted, x, target)
    first = [float(step_plain()), float(step_converted())]
    if not np.isclose(first[0], first[1], rtol=1e-4):
        sys.exit(f"WRONG: first-step losses differ: torch {first[0]}, converted {first[1]}")

    print(f"model: {args.blocks} blocks of conv1x1-BN-ReLU-dwconv3x3-BN(+skip)-ReLU "
          f"({swapped} BatchNorm2d), linear head; input {shape} float32 "
          f"{'channels_last' if args.channels_last else 'NCHW'}; SGD(momentum=0.9)")
    print(f"torch {torch.__version__}, batchnorm {batchnorm.__version__} ({batchnorm.isa()}), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"load before: {before['load_1min']}, CPUs busy before: {before['cpu_busy']}")
    print(f"median ms per training step over {args.rounds} interleaved rounds (IQR in brackets)")
    print()
    print("| threads | torch BatchNorm2d | batchnorm.torch.convert | speedup |")
    print("|---|---|---|---|")
    rows: List[Tuple[int, timing.Spread, timing.Spread]] = []
    for n in args.threads:
        torch.set_num_threads(n)
        batchnorm.set_num_threads(n)
        samples = timing.interleaved({"torch": step_plain, "converted": step_converted},
                                     rounds=args.rounds, target_s=args.sample_s, settle_s=0.005)
        a, b = timing.Spread.of(samples["torch"]), timing.Spread.of(samples["converted"])
        speedup = timing.Spread.of([s / c for s, c in zip(samples["torch"], samples["converted"])])
        rows.append((n, a, b))
        print(f"| {n} | {a.median * 1e3:.2f} ({a.iqr * 1e3:.2f}) | {b.median * 1e3:.2f} "
              f"({b.iqr * 1e3:.2f}) | {speedup.median:.2f}x |", flush=True)
    after = machine.conditions()
    print()
    print(f"load after: {after['load_1min']}, CPUs busy after: {after['cpu_busy']}"
          + ("  (DISTURBED: other processes were busy, rerun on a quiet machine)"
             if machine.disturbed(before) or machine.disturbed(after) else ""))


if __name__ == "__main__":
    main()
