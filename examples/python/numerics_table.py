"""Accuracy of float32 batch norm at large means: batchnorm against PyTorch.

For data ``offset + N(0, 1)`` per channel in float32, one training-mode forward with
``momentum=1`` (so ``running_var`` is the batch's unbiased variance), compared with the
exact answer for the same float32 values computed in float64:

- variance relative error: max over channels of ``|running_var - var| / var``;
- output error: max over elements of ``|y - (x - mean) / sqrt(var_biased + eps)|``.

Both layouts: NCHW (channels-first) and channels_last (NHWC memory: a torch
``channels_last`` tensor; the same memory as a NumPy array with ``axis=-1`` for batchnorm).
Prints a Markdown table (docs/numerics.md holds one). Run:
``python examples/python/numerics_table.py [--shape 8 16 64 64]``.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

import batchnorm as bn

OFFSETS = (0.0, 1e2, 1e4, 1e6)
EPS = 1e-5
Array = npt.NDArray[Any]


def exact(x: Array) -> Tuple[Array, Array]:
    """Per-channel unbiased variance and the normalized output, in float64 (NCHW x)."""
    x64 = x.astype(np.float64)
    axes = (0, 2, 3)
    n = x.size // x.shape[1]
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).sum(axis=axes, keepdims=True) / n
    y = (x64 - mean) / np.sqrt(var + EPS)
    return (var * n / (n - 1)).ravel(), y


def run_batchnorm(x: Array, channels_last: bool) -> Tuple[Array, Array]:
    """batchnorm's running_var (momentum 1) and output, in NCHW order."""
    c = x.shape[1]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    if channels_last:
        nhwc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        y = np.moveaxis(bn.batch_norm(nhwc, rm, rv, training=True, momentum=1.0, axis=-1), -1, 1)
    else:
        y = bn.batch_norm(x, rm, rv, training=True, momentum=1.0)
    return rv, y


def torch_runner() -> Optional[Callable[[Array, bool], Tuple[Array, Array]]]:
    """The same measurement with torch.nn.functional.batch_norm, or None without torch."""
    try:
        import torch
    except ImportError:
        return None

    def run(x: Array, channels_last: bool) -> Tuple[Array, Array]:
        """torch's running_var (momentum 1) and output, in NCHW order."""
        t = torch.from_numpy(x)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        c = x.shape[1]
        rm, rv = torch.zeros(c), torch.ones(c)
        y = torch.nn.functional.batch_norm(t, rm, rv, training=True, momentum=1.0, eps=EPS)
        return rv.numpy(), y.numpy()

    return run


def measure(shape: Tuple[int, ...], seed: int = 0) -> List[Dict[str, Any]]:
    """One row per (offset, layout): each library's variance and output errors."""
    rng = np.random.default_rng(seed)
    runners: Dict[str, Callable[[Array, bool], Tuple[Array, Array]]] = {"batchnorm": run_batchnorm}
    torch_run = torch_runner()
    if torch_run is not None:
        runners["torch"] = torch_run
    rows = []
    for offset in OFFSETS:
        x = (offset + rng.standard_normal(shape)).astype(np.float32)
        var, y_exact = exact(x)
        for layout, channels_last in (("NCHW", False), ("channels_last", True)):
            row: Dict[str, Any] = {"offset": offset, "layout": layout}
            for name, run in runners.items():
                rv, y = run(x, channels_last)
                row[f"{name}_var"] = float(np.max(np.abs(rv.astype(np.float64) - var) / var))
                row[f"{name}_out"] = float(np.max(np.abs(y.astype(np.float64) - y_exact)))
            rows.append(row)
    return rows


def markdown(rows: List[Dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    names = [k[:-4] for k in rows[0] if k.endswith("_var")]
    head = ["mean (offset)", "layout"]
    head += [f"{n} variance rel. error" for n in names] + [f"{n} output error" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['offset']:g}", r["layout"]]
        cells += [f"{r[n + '_var']:.1e}" for n in names] + [f"{r[n + '_out']:.1e}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse --shape, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(8, 16, 32, 32),
                        metavar=("N", "C", "H", "W"))
    args = parser.parse_args()
    shape = tuple(args.shape)
    print(f"float32 input {shape} (N, C, H, W), std 1, eps {EPS}; batchnorm {bn.__version__} "
          f"({bn.isa()})")
    print()
    print(markdown(measure(shape)))


if __name__ == "__main__":
    main()
