"""``python -m batchnorm``: version, backend and a short demo; or build paths for CMake."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

import numpy as np
import numpy.typing as npt

import batchnorm


def _channel_stats(label: str, y: npt.NDArray[Any]) -> None:
    """Print per-channel mean and std over every axis but 1."""
    mean = np.round(y.mean(axis=(0, 2, 3)), 3) + 0.0  # + 0.0 turns -0.0 into 0.0
    std = np.round(y.std(axis=(0, 2, 3)), 3)
    print(f"  {label}: mean {mean}  std {std}")


def demo() -> None:
    """Normalize a batch in training mode, then a new batch in eval mode."""
    rng = np.random.default_rng(0)
    m = batchnorm.BatchNorm2d(3)
    x = rng.normal(5.0, 3.0, size=(8, 3, 4, 4)).astype(np.float32)
    print(f"\n{m}")
    print(f"training mode, a batch of shape {x.shape} with mean 5, std 3 (batch statistics):")
    _channel_stats("input ", x)
    _channel_stats("output", m(x))
    assert m.running_mean is not None and m.running_var is not None
    print(f"  running_mean {m.running_mean}  running_var {m.running_var}")
    print(f"  num_batches_tracked {m.num_batches_tracked}")

    m.eval()
    x2 = rng.normal(5.0, 3.0, size=(8, 3, 4, 4)).astype(np.float32)
    y2 = m(x2)
    mean, var = m.running_mean.reshape(1, 3, 1, 1), m.running_var.reshape(1, 3, 1, 1)
    error = np.abs(y2 - (x2 - mean) / np.sqrt(var + m.eps)).max()
    print("\neval mode, a new batch (running statistics, left unchanged):")
    _channel_stats("output", y2)
    print(f"  max |output - (x - running_mean)/sqrt(running_var + eps)| = {error:.1e}")
    print("  (one step at momentum 0.1 moved the running statistics a tenth of the way")
    print("   towards the batch's, so this output is not yet mean 0, std 1)")


def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m batchnorm",  # the docstring, without its reST quotes
                                     description=(__doc__ or "").replace("``", ""))
    parser.add_argument("--version", action="version", version=f"batchnorm {batchnorm.__version__}")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--cmakedir", action="store_true", help="print the CMake config directory")
    paths.add_argument("--includedir", action="store_true", help="print the C++ include directory")
    args = parser.parse_args(argv)
    if args.cmakedir:
        print(batchnorm.get_cmake_dir())
        return
    if args.includedir:
        print(batchnorm.get_include())
        return
    print(f"batchnorm {batchnorm.__version__}")
    variant = batchnorm._core.isa()
    detail = f" ({variant} kernels)" if variant != batchnorm.isa() else ""
    print(f"ISA:     {batchnorm.isa()}{detail}")
    print(f"threads: {batchnorm.get_num_threads()}")
    demo()


if __name__ == "__main__":
    try:
        main()
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:  # the reader went away (python -m batchnorm | head -1): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush writes nowhere
        sys.exit(1)
