"""Fast, accurate CPU batch normalization with PyTorch semantics.

``BatchNorm1d/2d/3d`` are stateful layers like ``torch.nn.BatchNorm*``;
``batch_norm`` is ``torch.nn.functional.batch_norm``; ``fold`` merges an eval-mode
batch norm into the preceding layer. Its siblings ``LayerNorm``, ``RMSNorm``, ``GroupNorm``
and ``InstanceNorm1d/2d/3d`` (and their functional forms) follow ``torch.nn`` likewise. Arrays are NumPy arrays or DLPack producers
(torch CPU tensors); results come back as the kind given (a torch tensor for a tensor).
"""

from __future__ import annotations

import os

from . import _core  # type: ignore[attr-defined, unused-ignore]
from ._version import __version__  # written by the build from cpp/include/batchnorm/version.hpp
from .distributed import SyncBatchNorm
from .fold import fold
from .functional import _integer, batch_norm, batch_norm_backward, batch_norm_stats
from .group_norm import GroupNorm, group_norm, group_norm_backward
from .instance_norm import (
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    instance_norm,
    instance_norm_backward,
)
from .layer_norm import (
    LayerNorm,
    RMSNorm,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
)
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, IncompatibleKeys

try:
    import threadpoolctl as _threadpoolctl  # type: ignore[import-untyped, unused-ignore]
except ImportError:  # optional: without it there is nothing to register with
    pass
else:
    from ._threadpool import register as _register_with_threadpoolctl

    _register_with_threadpoolctl(_threadpoolctl)

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
    "LayerNorm",
    "RMSNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "layer_norm",
    "layer_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
]

# The headers and the CMake package are installed next to the extension module. That is this
# package's directory in a regular install, but not in an editable one, where this file stays
# in the source tree and the built files live in site-packages.
_DATA_DIR = os.path.dirname(os.path.abspath(_core.__file__))


def isa() -> str:
    """Active SIMD backend: "avx512", "avx2", "neon" or "scalar".

    Chosen once from the CPU; ``BATCHNORM_ISA`` forces a supported one. On CPUs with
    AVX512-BF16 the AVX-512 kernels narrow to bfloat16 with that instruction; they are still
    the "avx512" backend (``_core.isa()`` names the variant, "avx512_bf16").
    """
    variant = str(_core.isa())
    return "avx512" if variant == "avx512_bf16" else variant


_MAX_THREADS = 2**31 - 1  # the C++ count is an int


def set_num_threads(n: int) -> None:
    """Set the number of threads used by the kernels (``n >= 1``), for the whole process.

    Like ``torch.set_num_threads``, one setting seen by calls from every Python thread, and
    independent of torch's. Small problems still run on one thread, and so does a process
    created by fork (its parent's OpenMP pool cannot be used there).
    """
    n = _integer("n", n)  # a bool or a float is a TypeError, as in torch
    if n > _MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be at most {_MAX_THREADS}, got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads the kernels may use.

    Default: the first value of ``OMP_NUM_THREADS``, else the CPUs this process may run on;
    1 in a forked child.
    """
    return int(_core.get_num_threads())


def get_include() -> str:
    """Directory to add to the include path for ``#include <batchnorm/batchnorm.hpp>``."""
    return os.path.join(_DATA_DIR, "include")


def get_cmake_dir() -> str:
    """Directory holding ``batchnorm-config.cmake``: pass it as ``batchnorm_DIR`` to CMake."""
    return os.path.join(_DATA_DIR, "share", "cmake", "batchnorm")
