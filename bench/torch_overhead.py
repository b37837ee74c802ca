"""``python -m bench.torch_overhead``: per-call cost of one norm layer, torch vs batchnorm.torch.

Small feature maps, where a call is mostly per-call overhead (Python, dispatch, autograd):
an eval-mode forward under ``torch.no_grad()`` (entered per call, and once around all the
calls, as a model's layers run) and a training forward + backward (the
layer's own ``forward`` and ``backward``, input and parameter gradients), through the
module (``torch.nn.BatchNorm2d`` vs ``batchnorm.torch.BatchNorm2d``), NCHW and
channels_last, at 1 and 2 threads (``torch.set_num_threads`` and
``batchnorm.set_num_threads`` together). Both layers are timed in the same run,
interleaved round by round (``bench.timing.interleaved``); the figure is the median
per-call time over rounds, the ratio the median of per-round ratios (> 1: batchnorm faster).

    python -m bench.torch_overhead                # every cell, 15 rounds
    python -m bench.torch_overhead --quick        # fewer rounds, shorter samples
    python -m bench.torch_overhead --family norms # LayerNorm, RMSNorm, GroupNorm, InstanceNorm2d
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Sequence, Tuple

from . import machine, timing
from .arguments import add_threads, positive_float, positive_int

SHAPES = [(32, 64, 8, 8), (32, 256, 4, 4), (1, 64, 7, 7)]
# the layer's own eval call: the whole sample runs in one no_grad block (the other eval cell
# enters and leaves one per call, about 1.5 us of its figure on both sides)
IN_NO_GRAD_BLOCK = "eval fwd, in a no_grad block, NCHW (1, 64, 7, 7)"
# the other norms: (class, constructor args, input shape), small calls and a transformer block's
NORM_CELLS = [("LayerNorm", (64,), (8, 49, 64)), ("LayerNorm", (768,), (4, 128, 768)),
              ("RMSNorm", (768,), (4, 128, 768)), ("GroupNorm", (8, 64), (1, 64, 7, 7)),
              ("GroupNorm", (32, 320), (2, 320, 16, 16)), ("InstanceNorm2d", (64,), (1, 64, 7, 7)),
              ("InstanceNorm2d", (64,), (4, 64, 32, 32))]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.torch_overhead",
                                description=__doc__.split("\n")[0])
    add_threads(p)
    p.add_argument("--rounds", type=positive_int, default=15)
    p.add_argument("--sample-s", type=positive_float, default=0.05, help="seconds of calls per sample")
    p.add_argument("--quick", action="store_true", help="5 rounds of 0.02 s samples")
    p.add_argument("--family", choices=["batch", "norms"], default="batch",
                   help="BatchNorm2d (default) or the other norms' drop-ins")
    return p.parse_args(argv)


def cells(torch, bnt) -> List[Tuple[str, Dict[str, Callable[[], object]]]]:  # type: ignore[no-untyped-def]
    """(label, {"torch": call, "batchnorm": call}) for every cell, same data for both."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for fmt in ("NCHW", "channels_last"):
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        for shape in SHAPES:
            x = torch.randn(shape, generator=gen).to(memory_format=memory_format)
            gy = torch.randn(shape, generator=gen).to(memory_format=memory_format)
            runs = {}
            for name, cls in (("torch", torch.nn.BatchNorm2d), ("batchnorm", bnt.BatchNorm2d)):
                layer = cls(shape[1])
                xg = x.clone().requires_grad_(True)

                def train_step(layer=layer, xg=xg, gy=gy) -> object:  # type: ignore[no-untyped-def]
                    """forward + backward of the layer (gradients accumulate, as in training)"""
                    y = layer(xg)
                    y.backward(gy)
                    return y

                runs[name] = train_step
            out.append((f"train fwd+bwd {fmt} {shape}", runs))
    x = torch.randn(1, 64, 7, 7, generator=gen)
    evals, in_block = {}, {}
    for name, cls in (("torch", torch.nn.BatchNorm2d), ("batchnorm", bnt.BatchNorm2d)):
        layer = cls(64).eval()

        def eval_call(layer=layer) -> object:  # type: ignore[no-untyped-def]
            """eval forward, each call in its own no_grad block"""
            with torch.no_grad():
                return layer(x)

        def layer_call(layer=layer) -> object:  # type: ignore[no-untyped-def]
            """eval forward alone (``main`` times it inside one no_grad block, as a model's layers run)"""
            return layer(x)

        evals[name], in_block[name] = eval_call, layer_call
    out[:0] = [("eval fwd no_grad NCHW (1, 64, 7, 7)", evals), (IN_NO_GRAD_BLOCK, in_block)]
    return out


def norm_cells(torch, bnt) -> List[Tuple[str, Dict[str, Callable[[], object]]]]:  # type: ignore[no-untyped-def]
    """Per NORM_CELLS entry: an eval forward without grad and a training forward + backward."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for cls_name, args, shape in NORM_CELLS:
        x = torch.randn(shape, generator=gen)
        gy = torch.randn(shape, generator=gen)
        evals, steps = {}, {}
        for name, lib in (("torch", torch.nn), ("batchnorm", bnt)):
            layer = getattr(lib, cls_name)(*args, **({"affine": True} if "Instance" in cls_name else {}))
            xg = x.clone().requires_grad_(True)

            def eval_call(layer=layer, x=x) -> object:  # type: ignore[no-untyped-def]
                with torch.no_grad():
                    return layer(x)

            def train_step(layer=layer, xg=xg, gy=gy) -> object:  # type: ignore[no-untyped-def]
                y = layer(xg)
                y.backward(gy)
                return y

            evals[name], steps[name] = eval_call, train_step
        out += [(f"{cls_name}{args} eval fwd no_grad {shape}", evals), (f"{cls_name}{args} train fwd+bwd {shape}", steps)]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Time every cell at every thread count; print one table."""
    args = _parse(argv)
    if args.quick:
        args.rounds, args.sample_s = 5, 0.02
    before = machine.conditions()
    try:
        import torch
    except ImportError:
        sys.exit("bench.torch_overhead needs torch: pip install torch==2.13.0")
    import batchnorm
    import batchnorm.torch as bnt

    print(f"torch {torch.__version__}, batchnorm {batchnorm.__version__} ({batchnorm.isa()}), "
          f"CPU: {machine.cpu_name()}; load before: {before['load_1min']}, "
          f"CPUs busy before: {before['cpu_busy']}")
    print(f"median us per call over {args.rounds} interleaved rounds (IQR in brackets); "
          "ratio = torch / batchnorm per round, median")
    print()
    print("| cell | threads | torch | batchnorm.torch | ratio |")
    print("|---|---|---|---|---|")
    table = cells(torch, bnt) if args.family == "batch" else norm_cells(torch, bnt)
    for n in args.threads:
        torch.set_num_threads(n)
        batchnorm.set_num_threads(n)
        for label, runs in table:
            with torch.set_grad_enabled(label != IN_NO_GRAD_BLOCK):
                samples = timing.interleaved(runs, rounds=args.rounds, target_s=args.sample_s)
            a, b = timing.Spread.of(samples["torch"]), timing.Spread.of(samples["batchnorm"])
            ratio = timing.paired_ratio(samples["torch"], samples["batchnorm"])
            print(f"| {label} | {n} | {a.median * 1e6:.1f} ({a.iqr * 1e6:.1f}) | "
                  f"{b.median * 1e6:.1f} ({b.iqr * 1e6:.1f}) | {ratio.median:.2f}x |", flush=True)
    after = machine.conditions()
    print()
    print(f"load after: {after['load_1min']}, CPUs busy after: {after['cpu_busy']}"
          + ("  (DISTURBED: other processes were busy, rerun on a quiet machine)"
             if machine.disturbed(before) or machine.disturbed(after) else ""))


if __name__ == "__main__":
    main()
