"""Fast, accurate CPU batch normalization with PyTorch semantics.

``BatchNorm1d/2d/3d`` are stateful layers like ``torch.nn.BatchNorm*``;
``batch_norm`` is ``torch.nn.functional.batch_norm``; ``fold`` merges an eval-mode
batch norm into the preceding layer. Arrays are NumPy arrays or DLPack producers
(torch CPU tensors); results come back as the kind given (a torch tensor for a tensor).
"""

from __future__ import annotations

import os
from importlib import metadata

from . import _core  # type: ignore[attr-defined, unused-ignore]
from .distributed import SyncBatchNorm
from .fold import fold
from .functional import batch_norm, batch_norm_backward, batch_norm_stats
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys

try:
    __version__: str = metadata.version("batchnorm")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = [
    "__version__",
    "isa",
    "set_num_threads",
    "get_num_threads",
    "get_include",
    "get_cmake_dir",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "IncompatibleKeys",
    "batch_norm",
    "batch_norm_stats",
    "batch_norm_backward",
    "fold",
]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def isa() -> str:
    """Active SIMD backend: "avx512", "avx2", "neon" or "scalar".

    Chosen once from the CPU; ``BATCHNORM_ISA`` forces a supported one.
    """
    return str(_core.isa())


def set_num_threads(n: int) -> None:
    """Set the number of threads used by the kernels (``n >= 1``).

    Like ``torch.set_num_threads``; small problems still run on one thread.
    """
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads the kernels may use (default: ``OMP_NUM_THREADS`` or the cores)."""
    return int(_core.get_num_threads())


def get_include() -> str:
    """Directory to add to the include path for ``#include <batchnorm/batchnorm.hpp>``."""
    return os.path.join(_PACKAGE_DIR, "include")


def get_cmake_dir() -> str:
    """Directory holding ``batchnorm-config.cmake``: pass it as ``batchnorm_DIR`` to CMake."""
    return os.path.join(_PACKAGE_DIR, "share", "cmake", "batchnorm")
