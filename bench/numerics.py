"""Accuracy matrix: worst errors per offset x layout x ISA x threads (issue targets).

For x = offset + std * N(0, 1) in float32 (and float64), compares batchnorm's batch
statistics and training output with float64 statistics of the SAME values:

- var: max over channels of |var - var_exact| / var_exact (biased variance);
- out: max over elements of |y - (x - mean_exact) / sqrt(var_exact + eps)|.

The exact statistics are computed in long double (x87 extended precision on x86-64): a float64
sum over strided axes is itself off by ~1e-10 at offset 1e6, more than float64's target.

The other norms get the same rows (issue 11): LayerNorm and RMSNorm over the last dim
(RMSNorm's "var" is the mean square), GroupNorm and InstanceNorm channels-first and
channels-last; their statistics come from the kernels' saved invstd (var = 1/invstd^2 - eps).

Targets: float32 var <= 1e-6 and out <= 1e-5; float64 var <= 1e-12 (and out <= 1e-10 here). Each ISA runs in its own
process (the backend is chosen once per process, BATCHNORM_ISA). Run: python -m bench.numerics
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List

import numpy as np

EPS = 1e-5
DISTRIBUTIONS = [(0.0, 1.0), (1e2, 1.0), (1e4, 1.0), (1e6, 1.0), (1e3, 1e-2)]
# (name, shape, axis): NCHW, channels-last memory read with axis=-1, (N, C)
LAYOUTS = [("NCHW", (8, 16, 28, 28), 1), ("NHWC", (8, 28, 28, 16), -1), ("NC", (4096, 16), 1)]


# (layout label, norm, shape, axis or groups): the other norms, each memory layout it reads
NORM_LAYOUTS = [
    ("LayerNorm", "layer", (64, 768), None),
    ("RMSNorm", "rms", (64, 768), None),
    ("GroupNorm NCHW", "group", (4, 32, 16, 16), 1),
    ("GroupNorm NHWC", "group", (4, 16, 16, 32), -1),
    ("InstanceNorm NCHW", "instance", (4, 16, 28, 28), 1),
    ("InstanceNorm NHWC", "instance", (4, 28, 28, 16), -1),
]
GROUPS = 8


def _norm_row(norm: str, x: np.ndarray, axis: Any) -> Dict[str, float]:
    """Worst var and output errors of one norm call against long-double statistics."""
    from batchnorm import _core

    if norm in ("layer", "rms"):
        y, _, invstd = _core.layer_norm(x, 1, None, None, EPS, norm == "rms")
        xc = x
    elif norm == "group":
        y, _, invstd = _core.group_norm(x, GROUPS, None, None, EPS, axis)
        xc, y = np.moveaxis(x, axis, 1), np.moveaxis(y, axis, 1)
    else:
        y, _, invstd = _core.instance_norm(x, None, None, None, None, 0.1, EPS, axis)
        xc, y = np.moveaxis(x, axis, 1), np.moveaxis(y, axis, 1)
    rows = invstd.size
    xl = np.ascontiguousarray(xc).astype(np.longdouble).reshape(rows, -1)
    mean = 0 if norm == "rms" else xl.mean(axis=1, keepdims=True)
    var = ((xl - mean) ** 2).mean(axis=1, keepdims=True)
    y_exact = ((xl - mean) / np.sqrt(var + EPS)).reshape(xc.shape)
    got_var = 1.0 / invstd.astype(np.longdouble).ravel() ** 2 - EPS
    return {"var": float(np.max(np.abs(got_var - var.ravel()) / var.ravel())),
            "out": float(np.max(np.abs(y.astype(np.longdouble) - y_exact)))}


def measure_norms(dtype: Any, threads: int) -> List[Dict[str, Any]]:
    """The rows of the other norms (see NORM_LAYOUTS), in this process's ISA."""
    import batchnorm as bn

    bn.set_num_threads(threads)
    rng = np.random.default_rng(1)
    rows = []
    for offset, std in DISTRIBUTIONS:
        for name, norm, shape, axis in NORM_LAYOUTS:
            x = (offset + std * rng.standard_normal(shape)).astype(dtype)
            rows.append({"offset": offset, "std": std, "layout": name, "threads": threads,
                         "dtype": np.dtype(dtype).name, "isa": bn.isa(), **_norm_row(norm, x, axis)})
    return rows


def measure(dtype: Any, threads: int) -> List[Dict[str, Any]]:
    """Worst errors for every distribution and layout, in this process's ISA."""
    import batchnorm as bn

    bn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for offset, std in DISTRIBUTIONS:
        for name, shape, axis in LAYOUTS:
            x = (offset + std * rng.standard_normal(shape)).astype(dtype)
            reduce_axes = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
            xl = x.astype(np.longdouble)
            mean = xl.mean(axis=reduce_axes, keepdims=True)
            var = ((xl - mean) ** 2).mean(axis=reduce_axes, keepdims=True)
            y_exact = (xl - mean) / np.sqrt(var + EPS)
            _, got_var = bn.batch_norm_stats(x, axis=axis)
            y = bn.batch_norm(x, None, None, training=True, eps=EPS, axis=axis)
            rows.append({
                "offset": offset, "std": std, "layout": name, "threads": threads,
                "dtype": np.dtype(dtype).name, "isa": bn.isa(),
                "var": float(np.max(np.abs(got_var - var.ravel()) / var.ravel())),
                "out": float(np.max(np.abs(y.astype(np.longdouble) - y_exact))),
            })
    return rows


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.numerics",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    # Internal: one ISA's rows as JSON, run by the parent with BATCHNORM_ISA set.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_args(argv).worker:
        rows = [r for dtype in (np.float32, np.float64) for t in (1, 2)
                for r in measure(dtype, t) + measure_norms(dtype, t)]
        print(json.dumps(rows))
        return
    import batchnorm._core as core

    rows: List[Dict[str, Any]] = []
    for isa in core.available_isas():
        env = dict(os.environ, BATCHNORM_ISA=isa)
        out = subprocess.run([sys.executable, "-m", "bench.numerics", "--worker"], env=env,
                             check=True, capture_output=True, text=True).stdout
        rows += json.loads(out)
    limits = {"float32": (1e-6, 1e-5), "float64": (1e-12, 1e-10)}
    print("| dtype | offset | std | layout | ISA | threads | var rel. error | output error | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst_ok = True
    for r in rows:
        var_limit, out_limit = limits[r["dtype"]]
        ok = r["var"] <= var_limit and (out_limit is None or r["out"] <= out_limit)
        worst_ok &= ok
        print(f"| {r['dtype']} | {r['offset']:g} | {r['std']:g} | {r['layout']} | {r['isa']} | {r['threads']} "
              f"| {r['var']:.1e} | {r['out']:.1e} | {'yes' if ok else 'NO'} |")
    print(f"\n{len(rows)} rows; all within targets: {worst_ok}")


if __name__ == "__main__":
    main()
